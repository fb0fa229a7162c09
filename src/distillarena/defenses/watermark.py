"""The green-list watermark (Kirchenbauer et al., 2023, "A Watermark for Large Language Models") as a logits
processor, and the pure primitives that score it.

At every step the previous ``context`` tokens (the *window*) and a secret ``key`` select a pseudo-random green list
of the vocabulary; ``delta`` is added to the green tokens' logits before the sampler's temperature and truncation.
A text is tested by counting green tokens: under the null hypothesis (the text does not depend on the key) each
distinct (window, token) pair is green with probability ``gamma``, independently, so the count over ``n`` distinct
pairs is Binomial(n, gamma) and :func:`binomial_tail` gives an exact p-value.

**The green list.** Each token is green independently with probability ``gamma``: its bit is the token's entry in
the SplitMix64 stream seeded by a keyed BLAKE2b hash of the window (an integer in [0, 2^53) compared with
``gamma * 2^53``). Kirchenbauer et al. draw a list of exactly ``gamma |V|`` tokens instead; then two pairs that share
a window are negatively correlated and the binomial p-value is only conservative. With independent bits it is
exact (the list's size is Binomial(|V|, gamma), which changes nothing the processor needs). Everything here is
integer arithmetic on the CPU, so a green list is the same on every machine, device and library version.

**Deduplication** (Fernandez et al., "Three Bricks", and Sander et al., "Radioactive"): the same (window, token)
pair scored twice is the same coin flipped twice, not a new one; the detectors in :mod:`distillarena.forensics`
score each pair once (:class:`PairTally`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO53 = float(2**53)
_MASK64 = (1 << 64) - 1
_GOLDEN_INT, _MIX1_INT, _MIX2_INT = int(_GOLDEN), int(_MIX1), int(_MIX2)


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 states (wrapping arithmetic, as the reference C code)."""
    z = state.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def check_scheme(gamma: float, context: int) -> None:
    if not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"watermark gamma (the green fraction) must be in (0, 1), got {gamma}")
    if isinstance(context, bool) or int(context) != context or not 1 <= int(context) <= 64:
        raise ValueError(f"watermark context (tokens hashed into the green list) must be an integer in [1, 64], "
                         f"got {context}")


@dataclass(frozen=True)
class WatermarkScheme:
    """What a green list depends on: the secret ``key``, the green fraction ``gamma`` and the window width
    ``context``. (``delta``, the strength, only matters when sampling.)"""

    key: str
    gamma: float = 0.5
    context: int = 2
    _key_bytes: bytes = field(init=False, repr=False, compare=False)
    _threshold: np.uint64 = field(init=False, repr=False, compare=False)
    _threshold_int: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"watermark key must be a non-empty string, got {self.key!r}")
        check_scheme(self.gamma, self.context)
        object.__setattr__(self, "context", int(self.context))
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "_key_bytes", hashlib.sha256(self.key.encode()).digest())
        object.__setattr__(self, "_threshold", np.uint64(math.ceil(self.gamma * _TWO53)))
        object.__setattr__(self, "_threshold_int", math.ceil(self.gamma * _TWO53))

    def window(self, ids: Sequence[int], i: int, start: int = 0) -> tuple[int, ...]:
        """The window of position ``i`` of ``ids``: the ``context`` tokens before it, none before ``start`` (the
        first real token of a left-padded row)."""
        return tuple(int(t) for t in ids[max(start, i - self.context) : i])

    def seed(self, window: Sequence[int]) -> int:
        """The window's 64-bit seed: BLAKE2b keyed with the secret, over the window's token ids (8 bytes each)."""
        data = struct.pack(f"<{len(window)}q", *window)
        return int.from_bytes(hashlib.blake2b(data, key=self._key_bytes, digest_size=8).digest(), "little")

    def green_bits(self, window: Sequence[int], tokens: np.ndarray | Sequence[int]) -> np.ndarray:
        """bool array: whether each of ``tokens`` is green after ``window``."""
        t = np.asarray(tokens, dtype=np.int64)
        if t.size and int(t.min()) < 0:
            raise ValueError("token ids must be >= 0")
        state = np.uint64(self.seed(window)) + (t.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        return (_splitmix64(np.atleast_1d(state)) >> np.uint64(11)) < self._threshold

    def green_mask(self, window: Sequence[int], vocab_size: int) -> np.ndarray:
        """bool ``[vocab_size]``: the green list after ``window``."""
        return self.green_bits(window, np.arange(vocab_size))

    def is_green(self, window: Sequence[int], token: int) -> bool:
        """One pair's bit, in plain integers (the same value as :meth:`green_bits`, without numpy's overhead)."""
        if token < 0:
            raise ValueError("token ids must be >= 0")
        z = (self.seed(window) + (int(token) + 1) * _GOLDEN_INT) & _MASK64
        z = ((z ^ (z >> 30)) * _MIX1_INT) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2_INT) & _MASK64
        z ^= z >> 31
        return (z >> 11) < self._threshold_int


# --- the test -------------------------------------------------------------------------------------------------------


def binomial_tail(k: int, n: int, p: float) -> tuple[float, float]:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, exactly (a log-space sum of the terms), and its log10 (finite
    where the probability underflows to 0). ``k <= 0`` gives 1."""
    if n < 0 or not 0.0 < p < 1.0:
        raise ValueError(f"binomial_tail needs n >= 0 and 0 < p < 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0, 0.0
    if k > n:
        return 0.0, float("-inf")
    i = np.arange(k, n + 1, dtype=np.float64)
    log_terms = (math.lgamma(n + 1) - _lgamma(i + 1) - _lgamma(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p))
    top = float(log_terms.max())
    log_tail = top + math.log(float(np.exp(log_terms - top).sum()))
    log_tail = min(log_tail, 0.0)
    return math.exp(log_tail), log_tail / math.log(10)


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.lgamma, otypes=[np.float64])(x)


def z_score(green: int, n: int, gamma: float) -> float:
    """Kirchenbauer's z: ``(green - gamma n) / sqrt(n gamma (1 - gamma))`` (0 for no pair)."""
    if n == 0:
        return 0.0
    return (green - gamma * n) / math.sqrt(n * gamma * (1.0 - gamma))


@dataclass
class PairTally:
    """Distinct (window, token) pairs and how many of them are green; a pair seen again is not scored again."""

    scheme: WatermarkScheme
    seen: set[tuple[tuple[int, ...], int]] = field(default_factory=set)
    green: int = 0
    offered: int = 0  # pairs offered, duplicates included

    def add(self, window: Sequence[int], token: int) -> bool | None:
        """Score the pair once: True / False (green or not) if new, None if already scored."""
        self.offered += 1
        pair = (tuple(window), int(token))
        if pair in self.seen:
            return None
        self.seen.add(pair)
        g = self.scheme.is_green(pair[0], pair[1])
        self.green += g
        return g

    @property
    def scored(self) -> int:
        return len(self.seen)


# --- the processor --------------------------------------------------------------------------------------------------

class WatermarkProcessor(LogitsProcessor):
    """``scores + delta * green(window)`` (Hugging Face signature; for :func:`~distillarena.decoding.sample` and
    ``model.generate``). ``delta = 0`` leaves the scores unchanged.

    The window is the row's last ``context`` tokens; with :meth:`begin` (called by the project's sampler) it never
    reaches into a left-padded row's padding, so a detector that sees the prompt and the completion without padding
    finds the same windows. Green lists are cached per window (bounded)."""

    def __init__(self, key: str, delta: float = 2.0, gamma: float = 0.5, context: int = 2, *,
                 cache_bytes: int = 1 << 26):
        if not math.isfinite(float(delta)) or float(delta) < 0:
            raise ValueError(f"watermark delta must be a finite number >= 0, got {delta}")
        self.scheme = WatermarkScheme(str(key), gamma, context)
        self.delta = float(delta)
        self._starts: list[int] | None = None
        self._cache: OrderedDict[tuple[tuple[int, ...], int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes

    def begin(self, input_ids, attention_mask=None, max_new_tokens: int = 64) -> None:
        if attention_mask is None:
            self._starts = None
            return
        # left padding: a row's first real token is its first 1 in the mask
        self._starts = attention_mask.to(torch.long).argmax(dim=-1).tolist()

    def reset(self) -> None:
        self._starts = None

    def mask(self, window: tuple[int, ...], vocab_size: int) -> np.ndarray:
        k = (window, vocab_size)
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        m = self.scheme.green_mask(window, vocab_size)
        self._cache[k] = m
        if len(self._cache) * vocab_size > self._cache_bytes:
            self._cache.popitem(last=False)
        return m

    def __call__(self, input_ids, scores):
        if self.delta == 0.0:
            return scores
        b, v = scores.shape
        rows = input_ids.tolist()
        starts = self._starts if self._starts is not None and len(self._starts) == b else [0] * b
        masks = np.stack([self.mask(self.scheme.window(row, len(row), s), v) for row, s in zip(rows, starts,
                                                                                                strict=True)])
        bias = torch.from_numpy(masks).to(device=scores.device, dtype=scores.dtype) * self.delta
        return scores + bias


__all__ = ["PairTally", "WatermarkProcessor", "WatermarkScheme", "binomial_tail", "check_scheme", "z_score"]
