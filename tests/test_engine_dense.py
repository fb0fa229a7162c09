"""The loss path chosen by size: when one chunk holds every position (positions x vocabulary within the chunk
budget, all positions valid) the engine hands the chunk's gradient over as the input's gradient (the dense case);
otherwise it loops over chunks into a zero-filled buffer. Both must give the same loss and gradients: compared here
in float64, on the logits path and the fused (hidden states + output layer) path."""

from __future__ import annotations

import pytest
import torch

from distillarena.objectives import LMHeadInput, TeacherSignal, compute_objective
from distillarena.objectives.engine import DEFAULT_CHUNK_ELEMENTS

F64 = torch.float64
CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("tvd", {}), ("sft", {}), ("hpd", {})]


def _problem(n: int, v: int, h: int, *, masked: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = {"h": torch.randn(n, h, generator=g, dtype=F64), "W": torch.randn(v, h, generator=g, dtype=F64) * 0.5,
         "ht": torch.randn(n, h, generator=g, dtype=F64), "Wt": torch.randn(v, h, generator=g, dtype=F64) * 0.7,
         "labels": torch.randint(0, v, (n,), generator=g), "sampled": torch.randint(0, v, (n,), generator=g)}
    if masked:
        d["labels"][torch.rand(n, generator=g) < 0.3] = -100
    return d


def _run(name: str, kw: dict, d: dict, path: str, chunk_size: int | None, temperature: float):
    h, W = d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_()
    extra = {"sampled_ids": d["sampled"]} if name == "hpd" else {}
    if path == "fused":
        student = LMHeadInput(h, W)
        teacher = TeacherSignal.dense(LMHeadInput(d["ht"], d["Wt"]))
    else:
        student = h @ W.T
        teacher = TeacherSignal.dense(d["ht"] @ d["Wt"].T)
    out = compute_objective(name, student, teacher, d["labels"], temperature=temperature, chunk_size=chunk_size,
                            **kw, **extra)
    (out.loss_sum * 0.7).backward()  # an incoming gradient other than 1 scales the handed-over gradient too
    return out.loss_sum.detach(), h.grad, W.grad


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name,kw", CASES)
def test_dense_equals_chunked_in_float64(name: str, kw: dict, path: str, masked: bool) -> None:
    n, v = 29, 41
    assert DEFAULT_CHUNK_ELEMENTS // v >= n  # the default chunk holds every position: the dense case
    d = _problem(n, v, 8, masked=masked)
    for temperature in (1.0, 1.7):
        dense = _run(name, kw, d, path, None, temperature)
        chunked = _run(name, kw, d, path, 4, temperature)
        for a, b in zip(dense, chunked, strict=True):
            assert a.dtype == F64
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_dense_gradient_has_the_input_shape_and_a_padded_vocabulary() -> None:
    # [B, T, V] logits, every position valid, and a student vocabulary padded past the teacher's
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, 12, generator=g, dtype=F64)
    s[..., 10:] = -40.0  # padding rows of the output layer: no probability mass
    s.requires_grad_()
    t = torch.randn(3, 5, 10, generator=g, dtype=F64)
    labels = torch.randint(0, 10, (3, 5), generator=g)
    grads = []
    for chunk_size in (None, 2):
        s.grad = None
        compute_objective("fkl", s, t, labels, chunk_size=chunk_size, align_vocab=True).loss_sum.backward()
        assert s.grad is not None and s.grad.shape == s.shape
        grads.append(s.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-13)
    assert grads[0][..., 10:].abs().max() == 0
