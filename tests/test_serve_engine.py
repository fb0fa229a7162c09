"""The batching engine on its own: batching, per-request limits in a shared batch, seeds, defenses, reveal."""

import threading

import pytest
import torch

from distillarena.core.errors import UserError
from distillarena.serve.config import PolicyConfig, ServeConfig
from distillarena.serve.engine import Engine, GenJob, ServerMisconfigured, TokenTable
from distillarena.serve.testing import save_tiny_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, task_tok):
    root = tmp_path_factory.mktemp("engine")
    return save_tiny_model(root / "teacher", seed=0), save_tiny_model(root / "proxy", seed=1), root


@pytest.fixture(scope="module")
def engine(dirs):
    teacher, proxy, _ = dirs
    with Engine.from_config(ServeConfig(model=str(teacher), proxy=str(proxy))) as e:
        yield e


def prompt(engine, text="What is 2+3?"):
    return engine.chat_prompt([{"role": "user", "content": text}])


def test_compatible_jobs_share_a_batch_and_keep_their_own_limits(engine):
    p = prompt(engine)
    jobs = [GenJob([p], n=1, max_tokens=m, temperature=1.0, logprobs=k) for m, k in
            [(3, None), (9, 2), (5, 0), (9, None)]]
    with engine.tracking(), engine.tracking(), engine.tracking(), engine.tracking():
        futures = [engine.submit(j) for j in jobs]
        results = [f.result(60) for f in futures]
    assert {r.batch_rows for r in results} == {4}  # one sampler call for the four
    for job, r in zip(jobs, results, strict=True):
        s = r.sequences[0]
        assert len(s.token_ids) <= job.max_tokens and r.completion_tokens == len(s.token_ids)
        assert (s.logprobs is None) == (job.logprobs is None)
        if job.logprobs is not None:
            assert len(s.logprobs) == s.shown and all(len(t) == job.logprobs for t in s.top)
    other = GenJob([p], n=2, max_tokens=4, temperature=0.5)  # another temperature: another batch
    assert engine.generate(other, 60).batch_rows == 2


def test_seeded_requests_reproduce_whatever_else_runs(engine):
    p = prompt(engine, "What is 7*6?")

    def seeded():
        return GenJob([p], n=2, max_tokens=10, temperature=1.0, seed=123, logprobs=1)

    alone = engine.generate(seeded(), 60)
    noise = [GenJob([prompt(engine, f"{i}+{i}")], n=1, max_tokens=10, temperature=1.0) for i in range(6)]
    futures = [engine.submit(j) for j in noise[:3]] + [engine.submit(seeded())] + \
        [engine.submit(j) for j in noise[3:]]
    busy = futures[3].result(60)
    for f in futures:
        f.result(60)
    assert [s.token_ids for s in busy.sequences] == [s.token_ids for s in alone.sequences]
    assert [s.logprobs for s in busy.sequences] == [s.logprobs for s in alone.sequences]
    assert alone.sequences[0].token_ids != alone.sequences[1].token_ids  # n samples differ from each other


def test_defenses_change_the_sampled_distribution(engine):
    p = prompt(engine)
    base = engine.generate(GenJob([p], n=1, max_tokens=6, temperature=0.0, logprobs=3, all_tokens=True),
                           60).sequences[0]

    def defended(policy, **kw):
        job = GenJob([p], n=1, max_tokens=6, temperature=1.0, seed=3, logprobs=3, all_tokens=True, policy=policy)
        for k, v in kw.items():
            setattr(job, k, v)
        return engine.generate(job, 60).sequences[0]

    top1 = defended(PolicyConfig(defense="truncation", params={"top_k": 1}))
    assert top1.token_ids == base.token_ids  # sampling a top-1 truncation is the teacher's greedy answer...
    assert all(t[0][1] == 0.0 and t[1][1] == -9999.0 for t in top1.top)  # ...and it reveals a point mass
    poe = defended(PolicyConfig(defense="poe", strength=1.0))
    proxy_alone = Engine(engine.proxy, engine.tokenizer).start()
    try:
        ref = proxy_alone.generate(GenJob([p], n=1, max_tokens=6, temperature=1.0, seed=3, logprobs=3,
                                          all_tokens=True), 60).sequences[0]
    finally:
        proxy_alone.close()
    assert poe.token_ids == ref.token_ids  # gamma = 1: the proxy's own distribution
    assert poe.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    hot = defended(PolicyConfig(defense="temperature", strength=4.0))
    assert hot.top[0][0][0] == base.top[0][0][0] and hot.top[0][0][1] < base.top[0][0][1]  # flatter, same argmax
    # a defended key's distribution is the sharpest a job gets: no greedy, no temperature below 1, no top_p
    for policy in (PolicyConfig(defense="temperature", strength=4.0), PolicyConfig(defense="poe", strength=1.0)):
        for kw in ({"temperature": 0.0}, {"temperature": 0.5}, {"top_p": 0.9}):
            with pytest.raises(UserError, match="fixes its sampling distribution"):
                defended(policy, **kw)


def test_antidistillation_policy(dirs, tmp_path):
    from distillarena.defenses import compute_proxy_gradient
    from distillarena.models.presets import load_model

    teacher, proxy_dir, _ = dirs
    proxy = load_model(str(proxy_dir))
    ids = torch.randint(4, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    compute_proxy_gradient(proxy, [{"input_ids": ids}], path=tmp_path / "g.safetensors")
    cfg = ServeConfig(model=str(teacher), proxy=str(proxy_dir), proxy_gradient=str(tmp_path / "g.safetensors"))
    policy = PolicyConfig(defense="antidistillation", strength=50.0)
    with Engine.from_config(cfg) as e:
        p = prompt(e)
        a = e.generate(GenJob([p], n=1, max_tokens=5, temperature=1.0, seed=1, logprobs=2, policy=policy), 60)
        b = e.generate(GenJob([p], n=1, max_tokens=5, temperature=1.0, seed=1, logprobs=2), 60)
        for t in (0.0, 0.7, 1.5):  # the processor's own temperature is the policy's: a job cannot change it
            with pytest.raises(UserError, match="only 1 is"):
                e.generate(GenJob([p], n=1, max_tokens=5, temperature=t, policy=policy), 60)
    assert a.sequences[0].logprobs != b.sequences[0].logprobs
    with Engine.from_config(ServeConfig(model=str(teacher))) as e, pytest.raises(ServerMisconfigured, match="proxy"):
        e.check_policy(PolicyConfig(defense="poe"))


def test_token_table_offsets_match_decoding(engine, task_tok):
    table = TokenTable(task_tok, engine.vocab_size)
    assert table.byte_level
    text = "What is 12+30? Answer: 42 — ünïcode ✓"
    ids = task_tok(text, add_special_tokens=False)["input_ids"]
    decoded, offsets = table.decode(ids + [task_tok.eos_token_id])
    assert decoded == task_tok.decode(ids) == text
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] == len(text)
    assert b"".join(table.bytes[i] for i in ids).decode() == text


def test_jobs_waiting_at_shutdown_are_failed_not_lost(dirs):
    teacher, _, _ = dirs
    e = Engine.from_config(ServeConfig(model=str(teacher))).start()
    jobs = [GenJob([[5, 6, 7]], n=1, max_tokens=4, temperature=1.0) for _ in range(3)]
    futures = [e.submit(j) for j in jobs]
    done = threading.Event()
    threading.Thread(target=lambda: (e.close(), done.set())).start()
    assert done.wait(60)
    for f in futures:
        assert f.done()  # answered, or failed with EngineClosed: never left hanging


def test_sampler_additions_change_nothing_for_existing_callers(engine):
    """``on_step``, ``reveal_from="processed"`` and ``force`` are additive: without them (and with an observer) the
    sampler returns bit for bit what it returned before; forced along its own sample it scores the same values."""
    from distillarena.decoding import sample

    p = prompt(engine)
    ids = torch.tensor([p, p])

    def run(**kw):
        return sample(engine.model, ids, max_new_tokens=8, generator=torch.Generator().manual_seed(5), reveal=3, **kw)

    plain = run()
    steps = []
    observed = run(on_step=steps.append)
    processed = run(reveal_from="processed")
    for field in ("tokens", "logprobs", "teacher_logprobs", "kl", "top_ids", "top_logprobs"):
        assert torch.equal(getattr(plain, field), getattr(observed, field)), field
        assert torch.equal(getattr(plain, field), getattr(processed, field)), field  # temperature 1: the same
    assert len(steps) == plain.steps and torch.equal(torch.stack([s.tokens for s in steps], 1), plain.tokens)
    assert torch.equal(plain.reveal_logprobs, plain.logprobs)
    forced = sample(engine.model, ids, max_new_tokens=8, temperature=0.0, reveal=3, reveal_from="processed",
                    force=plain.tokens.masked_fill(~plain.mask, -1))
    assert torch.equal(forced.tokens[plain.mask], plain.tokens[plain.mask])
    assert torch.allclose(forced.reveal_logprobs[plain.mask], plain.logprobs[plain.mask], atol=1e-5)


def test_a_stream_gets_its_tokens_while_the_batch_is_sampled(engine):
    p = prompt(engine)
    seen = []
    before = engine.batches

    def on_delta(deltas):
        seen.append((engine.batches, deltas))

    job = GenJob([p], n=2, max_tokens=12, temperature=1.0, logprobs=2, on_delta=on_delta)  # no seed: shared
    other = GenJob([prompt(engine, "7*8=")], n=1, max_tokens=12, temperature=1.0)
    with engine.tracking(), engine.tracking():
        futures = [engine.submit(job), engine.submit(other)]
        res = futures[0].result(60)
        futures[1].result(60)
    assert res.batch_rows == 3  # batched with the other request, streaming or not
    assert seen and seen[0][0] == before  # the first tokens came before the sampler call returned
    for i, s in enumerate(res.sequences):  # and the pieces make up exactly the answer
        deltas = [d for _, ds in seen for d in ds if d.index == i]
        assert "".join(x for d in deltas for x in d.pieces) == s.text
        assert [v for d in deltas for v in d.logprobs] == s.logprobs
        assert [d.finish_reason for d in deltas if d.finish_reason] == [s.finish_reason]
