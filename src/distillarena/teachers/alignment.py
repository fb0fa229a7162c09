"""Two tokenizations of the same text, lined up: token bytes, spans by byte offsets, a vocabulary map by strings.

A *piece* is what one token stands for in the text, as bytes:

- byte-level BPE tokenizers (GPT-2 style: this project's, SmolLM2, Llama 3, Qwen): the token string through the
  byte-to-unicode table, exactly, including tokens that hold part of a multi-byte character;
- SentencePiece-style tokenizers (``▁`` for a space, ``<0xNN>`` byte-fallback tokens): that rule;
- anything else: the token decoded alone (``None`` when that is not well defined, e.g. a replacement character).

Special tokens (added tokens marked special) stand for no text. Each gets a *marker*, a byte string no text can
contain, named by its role where it has one (``eos``, ``bos``, ``pad``, ``unk``) and by its content otherwise, so
the student's end-of-sequence token lines up with the teacher's even when their strings differ (``<|im_end|>``
vs ``<|endoftext|>``).

:func:`align` walks both piece sequences by byte offsets and cuts them into *spans*: the shortest runs of tokens,
one or more on each side, that cover the same bytes. A span of one token on each side is one-to-one. Where the
two byte streams stop agreeing (different text, an undecodable token), alignment stops: every token from there on
is left unaligned.

:func:`vocab_map` pairs the vocabularies: teacher token -> the student token with the same piece (a marker pairs
with the same marker). A piece that two tokens of one vocabulary share is left unmapped (ambiguous).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from distillarena.models.tokenizer import byte_level_decoder

__all__ = ["TokenTable", "token_table", "vocab_map", "align", "Span", "pair_positions", "Pairing"]

_ROLES = ("eos", "bos", "pad", "unk")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_kinds(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        dec = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return set()
    kinds: set[str] = set()

    def walk(d: dict) -> None:
        kinds.add(str(d.get("type")))
        if d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "▁":
            kinds.add("Metaspace")
        for sub in d.get("decoders") or []:
            walk(sub)

    walk(dec)
    return kinds


@dataclass(frozen=True)
class TokenTable:
    """Per token id: its piece (bytes; a marker for a special token; None if it has no fixed bytes)."""

    pieces: list[bytes | None]
    special: list[bool]
    eos_id: int | None

    def __len__(self) -> int:
        return len(self.pieces)

    def piece(self, i: int) -> bytes:
        """The piece of id ``i``, or a byte string that matches nothing (an id without fixed bytes)."""
        p = self.pieces[i] if 0 <= i < len(self.pieces) else None
        return p if p is not None else b"\x00?" + str(i).encode() + b"\x00"


def _marker(name: str) -> bytes:
    return b"\x00" + name.encode("utf-8", "replace") + b"\x00"


def token_table(tokenizer) -> TokenTable:
    """The pieces of every token of a Hugging Face tokenizer (see the module doc)."""
    n = len(tokenizer)
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or "ByteFallback" in kinds
    u2b = byte_level_decoder()
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    roles: dict[int, str] = {}
    for role in reversed(_ROLES):  # eos wins when one token has several roles (pad = eos)
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(tid, int):
            roles[tid] = role
    strings = tokenizer.convert_ids_to_tokens(list(range(n)))
    pieces: list[bytes | None] = []
    special: list[bool] = []
    for i, s in enumerate(strings):
        tok = added.get(i)
        if i in roles or (tok is not None and tok.special):
            pieces.append(_marker(roles.get(i) or (tok.content if tok is not None else str(s))))
            special.append(True)
            continue
        special.append(False)
        if s is None:
            pieces.append(None)
        elif tok is not None:  # an added, non-special token: its content is its text
            pieces.append(tok.content.encode())
        elif byte_level and all(c in u2b for c in s):
            pieces.append(bytes(u2b[c] for c in s))
        elif metaspace:
            m = _BYTE_FALLBACK.match(s)
            pieces.append(bytes([int(m.group(1), 16)]) if m else s.replace("▁", " ").encode())
        else:
            text = tokenizer.decode([i], clean_up_tokenization_spaces=False)
            pieces.append(None if "\ufffd" in text else text.encode())
    eos = getattr(tokenizer, "eos_token_id", None)
    return TokenTable(pieces, special, eos if isinstance(eos, int) else None)


def vocab_map(teacher: TokenTable, student: TokenTable) -> Tensor:
    """``[Vt]`` long: for each teacher token, the student token with the same piece, or -1 (no such token, or a
    piece that two tokens of either vocabulary share)."""

    def unique_index(t: TokenTable) -> dict[bytes, int]:
        seen: dict[bytes, int] = {}
        dup: set[bytes] = set()
        for i, p in enumerate(t.pieces):
            if p is None:
                continue
            if p in seen:
                dup.add(p)
            seen[p] = i
        return {p: i for p, i in seen.items() if p not in dup}

    s_index = unique_index(student)
    t_index = unique_index(teacher)
    out = torch.full((len(teacher),), -1, dtype=torch.long)
    for p, ti in t_index.items():
        si = s_index.get(p)
        if si is not None:
            out[ti] = si
    return out


@dataclass(frozen=True)
class Span:
    """Tokens ``a[a0:a1]`` and ``b[b0:b1]`` cover the same bytes (both runs non-empty)."""

    a0: int
    a1: int
    b0: int
    b1: int

    @property
    def one_to_one(self) -> bool:
        return self.a1 - self.a0 == 1 and self.b1 - self.b0 == 1


def align(a: list[bytes], b: list[bytes]) -> list[Span]:
    """The spans of two piece sequences (see the module doc), in order, up to the first disagreement."""
    A, B = b"".join(a), b"".join(b)
    agree = 0
    limit = min(len(A), len(B))
    while agree < limit and A[agree] == B[agree]:
        agree += 1
    spans: list[Span] = []
    i = j = 0
    ea = eb = 0
    n, m = len(a), len(b)
    while i < n and j < m:
        i0, j0 = i, j
        ea += len(a[i])
        i += 1
        eb += len(b[j])
        j += 1
        while ea != eb:
            if ea < eb and i < n:
                ea += len(a[i])
                i += 1
            elif eb < ea and j < m:
                eb += len(b[j])
                j += 1
            else:
                break
        if ea != eb or ea > agree:
            break
        spans.append(Span(i0, i, j0, j))
    return spans


@dataclass(frozen=True)
class Pairing:
    """Per token of sequence ``a`` (the student's): its partner in ``b`` (the teacher's; -1: none), whether its span
    is one-to-one, and its span's index into the spans (-1: none)."""

    partner: list[int]
    one_to_one: list[bool]
    span: list[int]


def pair_positions(a: list[bytes], b: list[bytes], spans: list[Span], mode: str = "offsets") -> Pairing:
    """Which token of ``b`` each token of ``a`` is compared with.

    ``offsets``: in a one-to-one span, its partner; in a longer span, the token of ``b`` that holds the first byte of
    the ``a`` token (the closest context that does not run past it); unaligned tokens have none.
    ``position``: the i-th token with the i-th (the ULD paper's pairing, as many as the shorter sequence has)."""
    n = len(a)
    partner, one, span_of = [-1] * n, [False] * n, [-1] * n
    if mode == "position":
        for i in range(min(n, len(b))):
            partner[i] = i
        return Pairing(partner, one, span_of)
    if mode != "offsets":
        raise ValueError(f"unknown pairing {mode!r}")
    for k, sp in enumerate(spans):
        if sp.one_to_one:
            partner[sp.a0], one[sp.a0], span_of[sp.a0] = sp.b0, True, k
            continue
        starts_b, pos = [], 0
        for j in range(sp.b0, sp.b1):
            starts_b.append(pos)
            pos += len(b[j])
        pos = 0
        jj = 0
        for i in range(sp.a0, sp.a1):
            while jj + 1 < len(starts_b) and starts_b[jj + 1] <= pos:
                jj += 1
            partner[i], span_of[i] = sp.b0 + jj, k
            pos += len(a[i])
    return Pairing(partner, one, span_of)
