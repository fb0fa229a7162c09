"""The batching engine on its own: batching, per-request limits in a shared batch, seeds, defenses, reveal."""

import threading

import pytest
import torch

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
    top1 = engine.generate(GenJob([p], n=1, max_tokens=6, temperature=0.0, logprobs=3,
                                  policy=PolicyConfig(defense="truncation", params={"top_k": 1})), 60).sequences[0]
    assert top1.token_ids == base.token_ids  # greedy is the same under a top-1 truncation...
    assert all(t[0][1] == 0.0 and t[1][1] == -9999.0 for t in top1.top)  # ...but it reveals a point mass
    poe = engine.generate(GenJob([p], n=1, max_tokens=6, temperature=0.0, logprobs=3,
                                 policy=PolicyConfig(defense="poe", strength=1.0)), 60).sequences[0]
    proxy_alone = Engine(engine.proxy, engine.tokenizer).start()
    try:
        ref = proxy_alone.generate(GenJob([p], n=1, max_tokens=6, temperature=0.0), 60).sequences[0]
    finally:
        proxy_alone.close()
    assert poe.token_ids == ref.token_ids  # gamma = 1: the proxy's own greedy answer
    hot = engine.generate(GenJob([p], n=1, max_tokens=6, temperature=0.0, logprobs=3, all_tokens=True,
                                 policy=PolicyConfig(defense="temperature", strength=4.0)), 60).sequences[0]
    assert hot.token_ids == base.token_ids and hot.logprobs[0] < base.logprobs[0]  # flatter, same argmax


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
        a = e.generate(GenJob([p], n=1, max_tokens=5, temperature=0.7, seed=1, logprobs=2, policy=policy), 60)
        b = e.generate(GenJob([p], n=1, max_tokens=5, temperature=0.7, seed=1, logprobs=2), 60)
        g = e.generate(GenJob([p], n=1, max_tokens=5, temperature=0.0, policy=policy), 60)
    assert a.sequences[0].logprobs != b.sequences[0].logprobs and len(g.sequences[0].token_ids) == 5
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
