"""The top-k teacher cache: run the teacher once over a dataset, train from its stored top-k log-probs.

Layout of a cache folder (written atomically, as one folder)::

    manifest.json          what it holds, for which teacher / tokenizer / data, shard checksums, quality stats
    tokenizer/             the tokenizer the ids belong to (save_pretrained)
    shard-00000.safetensors ...

Each shard holds a run of examples: their token ids, labels and weights, and for every *target position*
(shifted label != -100) the teacher's top-k token ids, their log-probs and the log of the remaining (tail) mass.

Encoding (per target position, fixed size, so rows are random access):

* ids, sorted ascending, as a bitmask over the vocabulary or Elias-Fano (``k * l`` low bits plus a ``k + V >> l``
  bit unary upper part, ``l = floor(log2(V / k))``), whichever is smaller: about ``k * (2 + log2(V / k))`` bits;
* log-probs quantized as ``p ** (1/3)`` on a uniform 8- or 16-bit grid (see :meth:`TopKCodec.encode_logprobs`);
* the tail log-prob as float16.

On reading, the top-k probabilities are rescaled to sum to ``1 - tail`` exactly, so every position is a proper
(k + 1)-bucket distribution. Quality is measured when the cache is built, against the teacher's full
distribution: ``KL(p_teacher || p_cached)`` where ``p_cached`` spreads the tail mass uniformly over the other
``V - k`` tokens (the expansion of the stored signal with the least assumption), averaged over target positions.

Every shard's SHA-256 is in the manifest and is checked when the cache is opened; the manifest carries its own
checksum. A corrupted or mismatched cache is a :class:`~distillarena.core.errors.UserError`, never silently wrong
targets.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir
from distillarena.models.fingerprint import tokenizer_profile
from distillarena.objectives import TeacherSignal
from distillarena.tasks.data import IGNORE_INDEX, collate

FORMAT = "distillarena-topk-cache"
VERSION = 2  # 2: the teacher and tokenizer identities of models.fingerprint
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------------------------
# The codec
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKCodec:
    vocab_size: int
    k: int
    bits: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.vocab_size:
            raise UserError(f"top-k cache: k must be between 1 and the vocabulary size {self.vocab_size}, "
                            f"got {self.k}")
        if self.bits not in (8, 16):
            raise UserError(f"top-k cache: log-prob bits must be 8 or 16, got {self.bits}")

    # -- ids
    @property
    def ef_low_bits(self) -> int:
        return max(0, int(math.floor(math.log2(self.vocab_size / self.k))))

    @property
    def _ef_upper_bits(self) -> int:
        return ((self.vocab_size - 1) >> self.ef_low_bits) + self.k

    @property
    def id_encoding(self) -> str:
        ef = math.ceil(self._ef_upper_bits / 8) + math.ceil(self.k * self.ef_low_bits / 8)
        return "bitmask" if math.ceil(self.vocab_size / 8) <= ef else "elias-fano"

    @property
    def id_bytes(self) -> int:
        if self.id_encoding == "bitmask":
            return math.ceil(self.vocab_size / 8)
        return math.ceil(self._ef_upper_bits / 8) + math.ceil(self.k * self.ef_low_bits / 8)

    @property
    def bytes_per_position(self) -> int:
        return self.id_bytes + self.k * self.bits // 8 + 2

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids: [N, k] distinct, sorted ascending -> [N, id_bytes] uint8."""
        n, k = ids.shape
        rows = np.arange(n)[:, None]
        if self.id_encoding == "bitmask":
            mask = np.zeros((n, self.vocab_size), dtype=bool)
            mask[rows, ids] = True
            return np.packbits(mask, axis=1)
        lo_bits = self.ef_low_bits
        upper = np.zeros((n, self._ef_upper_bits), dtype=bool)
        upper[rows, (ids >> lo_bits) + np.arange(k)] = True
        parts = [np.packbits(upper, axis=1)]
        if lo_bits:
            low = ids & ((1 << lo_bits) - 1)
            bits = (low[..., None] >> np.arange(lo_bits - 1, -1, -1)) & 1
            parts.append(np.packbits(bits.astype(bool).reshape(n, k * lo_bits), axis=1))
        return np.concatenate(parts, axis=1)

    def decode_ids(self, codes: np.ndarray) -> np.ndarray:
        """[N, id_bytes] uint8 -> [N, k] int64, sorted ascending."""
        n, k = codes.shape[0], self.k
        if self.id_encoding == "bitmask":
            mask = np.unpackbits(codes, axis=1, count=self.vocab_size)
            r, c = np.nonzero(mask)
            if len(c) != n * k:
                raise UserError("top-k cache: a position does not hold exactly k token ids (corrupted data)")
            return c.reshape(n, k).astype(np.int64)
        lo_bits = self.ef_low_bits
        ub = math.ceil(self._ef_upper_bits / 8)
        upper = np.unpackbits(codes[:, :ub], axis=1, count=self._ef_upper_bits)
        r, c = np.nonzero(upper)
        if len(c) != n * k:
            raise UserError("top-k cache: a position does not hold exactly k token ids (corrupted data)")
        high = c.reshape(n, k).astype(np.int64) - np.arange(k)
        ids = high << lo_bits
        if lo_bits:
            bits = np.unpackbits(codes[:, ub:], axis=1, count=k * lo_bits).reshape(n, k, lo_bits)
            ids |= (bits.astype(np.int64) << np.arange(lo_bits - 1, -1, -1)).sum(-1)
        return ids

    # -- log-probs
    # Quantized as the cube root of the probability, uniformly: the error a token's log-prob may carry then
    # shrinks as its probability grows (the KL cost of an error is ~ p * err**2, and p**(1/3) spacing minimises
    # its sum), so 8 bits give a KL about 3x smaller than a uniform grid on log-probs. Code 0 (a probability
    # below ~(0.5 / levels)**3) decodes to half a step, never to zero, so every cached log-prob is finite.
    def encode_logprobs(self, lps: np.ndarray) -> np.ndarray:
        levels = (1 << self.bits) - 1
        u = np.exp(np.minimum(lps.astype(np.float64), 0.0) / 3.0)
        q = np.rint(u * levels).astype(np.uint8 if self.bits == 8 else np.uint16)
        return q.view(np.uint8).reshape(lps.shape[0], -1)

    def decode_logprobs(self, codes: np.ndarray) -> np.ndarray:
        levels = (1 << self.bits) - 1
        q = codes.view(np.uint8 if self.bits == 8 else np.uint16).reshape(codes.shape[0], self.k)
        u = np.maximum(q.astype(np.float64), 0.5) / levels
        return (3.0 * np.log(u)).astype(np.float32)

    # -- whole rows
    def encode(self, ids: Tensor, logprobs: Tensor, tail: Tensor) -> dict[str, np.ndarray]:
        """ids, logprobs: [N, k]; tail: [N] (log of the mass outside the top k)."""
        order = ids.argsort(dim=-1)
        ids = ids.gather(-1, order).cpu().numpy().astype(np.int64)
        lps = logprobs.gather(-1, order).float().cpu().numpy()
        return {"id_codes": self.encode_ids(ids), "lp_codes": self.encode_logprobs(lps),
                "tail": tail.float().cpu().numpy().astype(np.float16)}

    def decode(self, id_codes: np.ndarray, lp_codes: np.ndarray, tail: np.ndarray
               ) -> tuple[Tensor, Tensor, Tensor]:
        """-> ids [N, k] long, log-probs [N, k] float32 rescaled to sum to 1 - tail, tail [N] float32."""
        ids = torch.from_numpy(self.decode_ids(id_codes))
        lps = torch.from_numpy(self.decode_logprobs(lp_codes))
        t = torch.from_numpy(tail.astype(np.float32)).clamp(max=0.0)
        if self.k >= self.vocab_size:
            t = torch.full_like(t, float("-inf"))
        top_mass = torch.where(t > -math.log(2.0), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t)))
        lps = lps + (top_mass - torch.logsumexp(lps, dim=-1)).unsqueeze(-1)
        return ids, lps, t


def cached_kl(full_logprobs: Tensor, ids: Tensor, lps: Tensor, tail: Tensor) -> Tensor:
    """KL(p || p_cached) per position [N], where p_cached gives the top-k tokens their cached probabilities and
    spreads the tail mass uniformly over the other V - k tokens."""
    n, v = full_logprobs.shape
    k = ids.shape[-1]
    if k < v:
        rest = tail - math.log(v - k)
        approx = rest.unsqueeze(-1).expand(n, v).clone()
    else:
        approx = torch.full_like(full_logprobs, float("-inf"))
    approx.scatter_(-1, ids, lps)
    p = full_logprobs.exp()
    return (p * (full_logprobs - approx)).nan_to_num(nan=0.0).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def data_fingerprint(encoded: list[tuple[list[int], list[int]]], weights: list[float]) -> str:
    h = hashlib.sha256()
    for (ids, labels), w in zip(encoded, weights, strict=True):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(np.float64(w).tobytes())
    return h.hexdigest()[:16]


@dataclass
class CacheStats:
    positions: int
    signal_bytes_per_token: float
    file_bytes_per_token: float
    kl_mean: float | None  # None: not measured (a served teacher reveals only its top k)
    kl_max: float | None
    tail_mass_mean: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@torch.no_grad()
def build_topk_cache(out: Path, teacher, encoded: list[tuple[list[int], list[int]]], *,
                     weights: list[float] | None = None, k: int = 128, bits: int = 8,
                     batch_size: int = 32, examples_per_shard: int = 4096,
                     teacher_id: str = "", meta: dict[str, Any] | None = None,
                     progress: Any | None = None) -> CacheStats:
    """Run ``teacher`` (a :class:`~distillarena.teachers.local.LocalTeacher`) once over ``encoded`` examples
    (``(ids, labels)`` pairs) and write the cache folder ``out`` atomically."""
    if not encoded:
        raise UserError("cannot build a top-k cache over an empty dataset")
    weights = list(weights) if weights is not None else [1.0] * len(encoded)
    vocab = teacher.vocab_size
    codec = TopKCodec(vocab, min(k, vocab), bits)
    tok = teacher.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kl_sum, kl_max, tail_sum, n_pos = 0.0, 0.0, 0.0, 0
    shards: list[dict[str, Any]] = []
    chunk_rows = max(1, (1 << 24) // vocab)
    task = progress.add_task("caching the teacher", total=len(encoded), status="") if progress else None
    with atomic_dir(Path(out)) as tmp:
        for s0 in range(0, len(encoded), examples_per_shard):
            part = encoded[s0:s0 + examples_per_shard]
            arrays: dict[str, list[np.ndarray]] = {"id_codes": [], "lp_codes": [], "tail": []}
            pos_counts = []
            for b0 in range(0, len(part), batch_size):
                batch = collate(part[b0:b0 + batch_size], pad)
                head = teacher.head(batch["input_ids"], batch["attention_mask"], device=teacher.device)
                valid = batch["labels"][:, 1:] != IGNORE_INDEX
                pos_counts.extend(valid.sum(1).tolist())
                hidden = head.hidden[:, :-1][valid.to(head.hidden.device)]
                for c0 in range(0, hidden.shape[0], chunk_rows):
                    h = hidden[c0:c0 + chunk_rows]
                    z = (h @ head.weight.T).float()
                    if head.bias is not None:
                        z = z + head.bias.float()
                    z = z * head.logit_scale
                    if head.softcap is not None:
                        z = head.softcap * torch.tanh(z / head.softcap)
                    full = torch.log_softmax(z, dim=-1)
                    top_lp, top_ids = full.topk(codec.k, dim=-1)
                    if codec.k < vocab:
                        tail = torch.logsumexp(full.scatter(-1, top_ids, float("-inf")), dim=-1)
                    else:
                        tail = torch.full(top_lp.shape[:1], float("-inf"))
                    enc = codec.encode(top_ids, top_lp, tail)
                    for name in arrays:
                        arrays[name].append(enc[name])
                    ids_d, lps_d, tail_d = codec.decode(enc["id_codes"], enc["lp_codes"], enc["tail"])
                    kl = cached_kl(full.cpu(), ids_d, lps_d, tail_d)
                    kl_sum += float(kl.sum())
                    kl_max = max(kl_max, float(kl.max())) if kl.numel() else kl_max
                    tail_sum += float(tail.exp().sum())
                    n_pos += int(kl.numel())
                if task is not None:
                    progress.advance(task, len(batch["input_ids"]))
            _save_shard(tmp, shards, codec, part, s0, pos_counts, weights[s0:s0 + examples_per_shard], arrays)
        stats = CacheStats(
            positions=n_pos,
            signal_bytes_per_token=float(codec.bytes_per_position),
            file_bytes_per_token=sum(s["bytes"] for s in shards) / max(n_pos, 1),
            kl_mean=kl_sum / max(n_pos, 1), kl_max=kl_max, tail_mass_mean=tail_sum / max(n_pos, 1))
        _write_manifest(tmp, codec, tok, teacher_id, encoded, weights, meta, shards, stats)
    return stats


def _save_shard(tmp: Path, shards: list[dict[str, Any]], codec: TopKCodec, part: list[tuple[list[int], list[int]]],
                s0: int, pos_counts: list[int], weights: list[float], arrays: dict[str, list[np.ndarray]]) -> None:
    """Write examples ``s0 ..`` (``part``) and their encoded top-k rows as the next shard; list it in ``shards``."""
    empty = {"id_codes": np.zeros((0, codec.id_bytes), np.uint8),
             "lp_codes": np.zeros((0, codec.k * codec.bits // 8), np.uint8), "tail": np.zeros((0,), np.float16)}
    seq_lens = [len(ids) for ids, _ in part]
    shard = {
        "input_ids": np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in part]),
        "labels": np.concatenate([np.asarray(lab, dtype=np.int32) for _, lab in part]),
        "seq_offsets": np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int64),
        "pos_offsets": np.concatenate([[0], np.cumsum(pos_counts)]).astype(np.int64),
        "weights": np.asarray(weights, dtype=np.float32),
        **{n: np.concatenate(a) if a else empty[n] for n, a in arrays.items()},
    }
    name = f"shard-{len(shards):05d}.safetensors"
    save_file(shard, str(tmp / name))
    shards.append({"file": name, "sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size,
                   "examples": [s0, s0 + len(part)], "positions": int(sum(pos_counts))})


def _write_manifest(tmp: Path, codec: TopKCodec, tokenizer, teacher_id: str,
                    encoded: list[tuple[list[int], list[int]]], weights: list[float], meta: dict[str, Any] | None,
                    shards: list[dict[str, Any]], stats: CacheStats) -> None:
    """The cache's tokenizer and manifest (checksummed), the last files written into the folder."""
    tokenizer.save_pretrained(tmp / "tokenizer")
    manifest = {
        "format": FORMAT, "version": VERSION,
        "codec": {"vocab_size": codec.vocab_size, "k": codec.k, "bits": codec.bits, "logprob_encoding": "cube-root",
                  "id_encoding": codec.id_encoding, "id_bytes": codec.id_bytes},
        "teacher": teacher_id,
        "tokenizer": tokenizer_profile(tokenizer),
        "data": {"fingerprint": data_fingerprint(encoded, weights), "n_examples": len(encoded)},
        "meta": meta or {},
        "shards": shards,
        "stats": stats.as_dict(),
    }
    manifest["checksum"] = _manifest_checksum(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_topk_cache(out: Path, *, tokenizer, vocab_size: int, k: int, bits: int,
                     encoded: list[tuple[list[int], list[int]]], weights: list[float],
                     rows: list[tuple[Tensor, Tensor, Tensor]], teacher_id: str, meta: dict[str, Any] | None = None,
                     examples_per_shard: int = 4096) -> CacheStats:
    """Write a cache folder from top-k rows already known (a served teacher's revealed log-probs): ``rows[i]`` is
    ``(ids [P, k], log-probs [P, k], tail log-prob [P])`` over example ``i``'s target positions, in order. The same
    format as :func:`build_topk_cache`; the quality statistics that need the full distribution are ``None``."""
    if not encoded:
        raise UserError("cannot build a top-k cache over an empty dataset")
    codec = TopKCodec(vocab_size, k, bits)
    shards: list[dict[str, Any]] = []
    n_pos, tail_sum = 0, 0.0
    with atomic_dir(Path(out)) as tmp:
        for s0 in range(0, len(encoded), examples_per_shard):
            part = encoded[s0:s0 + examples_per_shard]
            arrays: dict[str, list[np.ndarray]] = {"id_codes": [], "lp_codes": [], "tail": []}
            pos_counts = []
            for i, (_ids, labels) in enumerate(part):
                top_ids, top_lps, tail = rows[s0 + i]
                want = sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)
                if top_ids.shape != (want, k):
                    raise UserError(f"top-k rows of example {s0 + i}: shape {tuple(top_ids.shape)}, expected "
                                    f"({want}, {k})")
                pos_counts.append(want)
                if want:
                    enc = codec.encode(top_ids, top_lps, tail)
                    for name in arrays:
                        arrays[name].append(enc[name])
                    tail_sum += float(tail.float().exp().sum())
                n_pos += want
            _save_shard(tmp, shards, codec, part, s0, pos_counts, weights[s0:s0 + examples_per_shard], arrays)
        stats = CacheStats(positions=n_pos, signal_bytes_per_token=float(codec.bytes_per_position),
                           file_bytes_per_token=sum(s["bytes"] for s in shards) / max(n_pos, 1), kl_mean=None,
                           kl_max=None, tail_mass_mean=tail_sum / max(n_pos, 1))
        _write_manifest(tmp, codec, tokenizer, teacher_id, encoded, weights, meta, shards, stats)
    return stats


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


class TopKCache:
    """A cache folder opened for training: checksums verified, examples in memory, top-k rows read on demand
    (memory-mapped). ``signal(batch)`` gives the top-k TeacherSignal of a batch of the cache's own examples
    (``batch["example_index"]``)."""

    kind = "topk"

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise UserError(f"{self.path} is not a top-k teacher cache (no {MANIFEST}); build one with "
                            "`distillarena cache-teacher`")
        try:
            manifest = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"top-k cache {self.path}: {MANIFEST} is corrupted ({e}); rebuild the cache") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"top-k cache {self.path}: {MANIFEST} is not a distillarena top-k cache manifest")
        if manifest.get("version") != VERSION:
            raise UserError(f"top-k cache {self.path} has version {manifest.get('version')}; this distillarena "
                            f"reads version {VERSION}: rebuild the cache")
        if manifest.get("checksum") != _manifest_checksum(manifest):
            raise UserError(f"top-k cache {self.path}: {MANIFEST} fails its checksum (edited or corrupted); "
                            "rebuild the cache")
        self.manifest = manifest
        c = manifest["codec"]
        self.codec = TopKCodec(c["vocab_size"], c["k"], c["bits"])
        if verify:
            self.verify()
        self._files = [safe_open(str(self.path / s["file"]), framework="numpy") for s in manifest["shards"]]
        self.examples: list[tuple[list[int], list[int]]] = []
        self.weights: list[float] = []
        self._rows: list[tuple[int, int, int]] = []  # example -> (shard, first row, n rows)
        for si, f in enumerate(self._files):
            ids, labels = f.get_tensor("input_ids"), f.get_tensor("labels")
            so, po = f.get_tensor("seq_offsets"), f.get_tensor("pos_offsets")
            self.weights.extend(f.get_tensor("weights").tolist())
            for i in range(len(so) - 1):
                self.examples.append((ids[so[i]:so[i + 1]].tolist(), labels[so[i]:so[i + 1]].tolist()))
                self._rows.append((si, int(po[i]), int(po[i + 1] - po[i])))
        if len(self.examples) != manifest["data"]["n_examples"]:
            raise UserError(f"top-k cache {self.path}: holds {len(self.examples)} examples, its manifest says "
                            f"{manifest['data']['n_examples']}; rebuild the cache")
        self._tokenizer = None

    def verify(self) -> None:
        for s in self.manifest["shards"]:
            p = self.path / s["file"]
            if not p.is_file():
                raise UserError(f"top-k cache {self.path}: shard {s['file']} is missing; rebuild the cache")
            if _sha256(p) != s["sha256"]:
                raise UserError(f"top-k cache {self.path}: shard {s['file']} fails its SHA-256 checksum "
                                "(corrupted or modified); rebuild the cache with `distillarena cache-teacher`")

    @property
    def k(self) -> int:
        return self.codec.k

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    @property
    def teacher_id(self) -> str:
        return self.manifest["teacher"]

    @property
    def stats(self) -> dict[str, float]:
        return self.manifest["stats"]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from distillarena.models.presets import load_tokenizer

            self._tokenizer = load_tokenizer(str(self.path / "tokenizer"))
            if tokenizer_profile(self._tokenizer) != self.manifest["tokenizer"]:
                raise UserError(f"top-k cache {self.path}: its tokenizer folder does not match the manifest "
                                "(corrupted or replaced); rebuild the cache")
        return self._tokenizer

    def rows(self, example_indices: Iterable[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Decoded top-k rows of the given examples, concatenated in order: ids, log-probs [P, k], tail [P]."""
        parts: dict[str, list[np.ndarray]] = {"id_codes": [], "lp_codes": [], "tail": []}
        for e in example_indices:
            si, r0, n = self._rows[int(e)]
            f = self._files[si]
            for name in parts:
                parts[name].append(f.get_slice(name)[r0:r0 + n])
        return self.codec.decode(*(np.concatenate(parts[n]) for n in ("id_codes", "lp_codes", "tail")))

    def signal(self, batch: dict[str, Any], device: torch.device | None = None) -> TeacherSignal:
        if "example_index" not in batch:
            raise UserError("a top-k cache teacher only scores the cache's own examples (off-policy data)")
        labels = batch["labels"][:, 1:]
        valid = labels != IGNORE_INDEX
        idx = batch["example_index"].tolist()
        counts = valid.sum(1).tolist()
        for e, c in zip(idx, counts, strict=True):
            if self._rows[int(e)][2] != c:
                raise UserError(f"top-k cache {self.path}: example {e} has {self._rows[int(e)][2]} cached target "
                                f"positions but the batch has {c}: the data does not match the cache")
        ids, lps, tail = self.rows(idx)
        device = device or labels.device
        shape = (*labels.shape, self.k)
        full_ids = torch.zeros(shape, dtype=torch.long, device=device)
        full_lps = torch.full(shape, -1.0, dtype=torch.float32, device=device)
        full_tail = torch.full(labels.shape, -1.0, dtype=torch.float32, device=device)
        v = valid.to(device)
        full_ids[v] = ids.to(device)
        full_lps[v] = lps.to(device)
        full_tail[v] = tail.to(device)
        return TeacherSignal.topk(full_ids, full_lps, full_tail)


