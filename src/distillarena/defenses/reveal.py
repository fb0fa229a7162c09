"""What an API *reveals* about each generated token, separate from what it samples.

A reveal policy is a callable ``logprobs [B, V] -> (ids [B, k], values [B, k]) | None``, given to
:func:`distillarena.decoding.sample` as ``reveal=`` (it sees the log-probs of the distribution actually sampled by
default). The sampled tokens themselves are unaffected by the policy.

- :class:`RevealNothing`: text only, no log-probs;
- :class:`RevealTopK`: the ``k`` most likely tokens (chosen on the exact log-probs) and their log-probs, optionally
  with Gaussian noise of standard deviation ``noise_std`` (seeded) added, then rounded to ``decimals`` decimals.
  Tokens that the sampled distribution excludes keep ``-inf``.
- :class:`KeyedNoise`: standard normal noise that is a keyed pseudo-random function of (context, token): the same
  token in the same context always gets the same noise, so asking again cannot average it away, and without the key
  nobody can compute it. The server draws its reveal noise from it, keyed by a secret of its store.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
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


class KeyedNoise:
    """Noise fixed per (key, context, token), computable only with ``key`` (32 bytes or more of secret).

    A context is summarised by a public running digest of its token ids (:meth:`start`, :meth:`extend`,
    :meth:`context`): a prompt scored token by token and the same tokens generated reach the same digest, so the
    value revealed for a token in a context is the same whichever way it is asked for. :meth:`normal` is then
    ``N(0, 1)``, drawn by Box-Muller from a keyed BLAKE2b of (digest, token): deterministic, independent across
    (context, token) pairs, and unpredictable without the key.
    """

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise UserError("a noise key needs at least 16 bytes")
        self._key = hashlib.blake2b(key, digest_size=32, person=b"distillarena-nz").digest()

    @staticmethod
    def start() -> bytes:
        """The digest of the empty context."""
        return hashlib.blake2b(b"", digest_size=16, person=b"distillarena-cx").digest()

    @staticmethod
    def extend(digest: bytes, token: int) -> bytes:
        """The digest of a context followed by ``token``."""
        return hashlib.blake2b(digest + int(token).to_bytes(8, "little"), digest_size=16,
                               person=b"distillarena-cx").digest()

    @classmethod
    def context(cls, ids: Iterable[int]) -> bytes:
        """The digest of the context ``ids``."""
        d = cls.start()
        for t in ids:
            d = cls.extend(d, t)
        return d

    def normal(self, digest: bytes, token: int) -> float:
        """The standard normal value of ``token`` in the context ``digest``."""
        h = hashlib.blake2b(digest + int(token).to_bytes(8, "little"), key=self._key, digest_size=16).digest()
        u1 = ((int.from_bytes(h[:8], "little") >> 11) + 0.5) / 2.0**53  # in (0, 1)
        u2 = (int.from_bytes(h[8:], "little") >> 11) / 2.0**53
        return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


__all__ = ["KeyedNoise", "RevealNothing", "RevealTopK"]
