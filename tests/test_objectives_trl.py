"""generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss (skipped when TRL is not installed;
``pip install -r requirements/bench.txt``). The transcribed semantics are tested in test_objectives.py either way."""

from __future__ import annotations

import os

import pytest
import torch

from distillarena.objectives import generalized_jsd_loss

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize(
    "reduction,num_items", [("batchmean", None), ("sum", None), ("mean", None), ("none", None), ("batchmean", 17)]
)
@pytest.mark.parametrize("with_labels", [True, False])
def test_same_numbers_as_trl(beta: float, reduction: str, num_items: int | None, with_labels: bool) -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 23, generator=g) * 4
    t = torch.randn(2, 6, 23, generator=g) * 4
    labels = torch.randint(0, 23, (2, 6), generator=g)
    labels[1, :3] = -100
    lab = labels if with_labels else None
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    kw = {"beta": beta, "temperature": 0.8, "reduction": reduction, "num_items_in_batch": num_items}
    ours = generalized_jsd_loss(x1, t, lab, chunk_size=5, **kw)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(x2, t, lab, **kw)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=2e-5, atol=1e-7)
