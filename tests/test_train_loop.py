import copy
import itertools

import torch

from distillarena.models.presets import build_preset
from distillarena.tasks.data import arithmetic_examples, collate, encode_example
from distillarena.train.loop import LoopConfig, causal_lm_loss_sum, count_targets, train


def batches_of(task_tok, sizes, seed=0):
    exs = arithmetic_examples("train", sum(sizes), [1, 2, 3, 4], seed=seed)
    out, i = [], 0
    for n in sizes:
        out.append(collate([encode_example(task_tok, e) for e in exs[i : i + n]], task_tok.pad_token_id))
        i += n
    return out


def test_accumulation_equals_one_big_batch(task_tok):
    """4 micro-batches of uneven sizes and lengths give the update of the one big batch."""
    micro = batches_of(task_tok, [1, 5, 2, 8])
    counts = [count_targets(b) for b in micro]
    assert len(set(counts)) == 4  # genuinely uneven valid-token counts
    whole = collate(
        [(ids[m.bool()].tolist(), lab[m.bool()].tolist())
         for b in micro for ids, lab, m in zip(b["input_ids"], b["labels"], b["attention_mask"], strict=True)],
        task_tok.pad_token_id,
    )
    assert count_targets(whole) == sum(counts)
    base = build_preset("tiny", task_tok, seed=0)
    cfg = dict(optimizer="sgd", lr=1.0, warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=0.0, log_every=1)
    a = train(copy.deepcopy(base), iter(micro), causal_lm_loss_sum, LoopConfig(steps=1, grad_accum=4, **cfg))
    b = train(copy.deepcopy(base), iter([whole]), causal_lm_loss_sum, LoopConfig(steps=1, grad_accum=1, **cfg))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    # and the step really moved the weights
    assert not torch.equal(next(a.parameters()), next(base.parameters()))


def test_loss_goes_down(task_tok):
    model = build_preset("tiny", task_tok, seed=0)
    data = itertools.cycle(batches_of(task_tok, [16] * 4))
    logs = []
    train(model, data, causal_lm_loss_sum, LoopConfig(steps=40, lr=1e-2, warmup_steps=5, log_every=1),
          on_log=logs.append)
    assert logs[-1].loss < 0.6 * logs[0].loss
    assert logs[-1].tokens > 0 and logs[-1].tokens_per_s > 0


def test_a_bf16_accelerator_left_in_the_process_does_not_leak_into_training(task_tok):
    """accelerate's state is process-wide: a trainer that asked for bf16 earlier in the process (TRL's and HF's
    TrainingArguments default to it on CPUs with bf16) made every later Accelerator() run under bf16 autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from distillarena.train.loop import full_precision_accelerator

    micro = batches_of(task_tok, [4])
    cfg = LoopConfig(steps=1, grad_accum=1, optimizer="sgd", lr=1.0, warmup_steps=0, min_lr_ratio=1.0,
                     max_grad_norm=0.0, log_every=1)
    base = build_preset("tiny", task_tok, seed=0)
    clean = train(copy.deepcopy(base), iter(micro), causal_lm_loss_sum, cfg)
    try:
        assert Accelerator(cpu=True).mixed_precision == "no"
        AcceleratorState._reset_state()
        Accelerator(cpu=True, mixed_precision="bf16")  # what the other trainer leaves behind
        assert Accelerator(cpu=True).mixed_precision == "bf16"  # accelerate's own behaviour, the reason for this
        assert full_precision_accelerator().mixed_precision == "no"
        after = train(copy.deepcopy(base), iter(micro), causal_lm_loss_sum, cfg)
        for (name, pa), pb in zip(clean.named_parameters(), after.parameters(), strict=True):
            assert torch.equal(pa, pb), name
    finally:
        AcceleratorState._reset_state()


def test_sampling_after_fused_optimizer_steps_uses_the_new_weights(task_tok):
    """Fused AdamW updates parameters without bumping their version counters; the KV-cached decoder's cached
    weights must not go stale (they did: every evaluation and on-policy sample during training used the weights of
    the first sampling)."""
    from distillarena.decoding import sample

    model = build_preset("tiny", task_tok, seed=0)
    prompts = batches_of(task_tok, [4])[0]

    def greedy_logits(m):
        res = sample(m, prompts["input_ids"][:, :6], prompts["attention_mask"][:, :6], max_new_tokens=3,
                     temperature=0.0, eos_token_id=None, pad_token_id=task_tok.pad_token_id, fast=True)
        return res.teacher_logprobs

    p = next(model.parameters())
    before = greedy_logits(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    v = p._version
    model(**{k: prompts[k] for k in ("input_ids", "attention_mask")}).logits.sum().backward()
    opt.step()
    assert p._version == v  # torch's fused kernel: the reason the decoder cannot trust version counters alone
    after = greedy_logits(model)
    fresh = greedy_logits(copy.deepcopy(model))  # a new object: no cache
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, fresh)
