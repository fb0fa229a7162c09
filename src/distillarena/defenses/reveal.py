"""What an API *reveals* about each generated token, separate from what it samples.

A reveal policy is a callable ``logprobs [B, V] -> (ids [B, k], values [B, k]) | None``, given to
:func:`distillarena.decoding.sample` as ``reveal=`` (it sees the log-probs of the distribution actually sampled by
default). The sampled tokens themselves are unaffected by the policy.

- :class:`RevealNothing`: text only, no log-probs;
- :class:`RevealTopK`: the ``k`` most likely tokens (chosen on the exact log-probs) and their log-probs, optionally
  with Gaussian noise of standard deviation ``noise_std`` (seeded) added, then rounded to ``decimals`` decimals.
  Tokens that the sampled distribution excludes keep ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distillarena.core.errors import UserError


@dataclass
class RevealNothing:
    def __call__(self, logprobs: Tensor) -> None:
        return None


@dataclass
class RevealTopK:
    k: int
    decimals: int | None = None
    noise_std: float = 0.0
    seed: int | None = None
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise UserError(f"reveal top-k needs an integer k >= 1, got {self.k}")
        if self.decimals is not None and (int(self.decimals) != self.decimals or self.decimals < 0):
            raise UserError(f"reveal decimals must be an integer >= 0, got {self.decimals}")
        if not (self.noise_std >= 0 and math.isfinite(self.noise_std)):
            raise UserError(f"reveal noise_std must be >= 0, got {self.noise_std}")

    def __call__(self, logprobs: Tensor) -> tuple[Tensor, Tensor]:
        values, ids = torch.topk(logprobs, min(int(self.k), logprobs.shape[-1]), dim=-1)
        if self.noise_std > 0:
            if self._generator is None:
                self._generator = torch.Generator(device=logprobs.device)
                self._generator.manual_seed(0 if self.seed is None else self.seed)
            noise = torch.randn(values.shape, generator=self._generator, device=values.device) * self.noise_std
            values = values + noise.to(values.dtype)
        if self.decimals is not None:
            values = torch.round(values, decimals=int(self.decimals))
        return ids, values


__all__ = ["RevealNothing", "RevealTopK"]
