"""A teacher whose tokenizer differs from the student's: its signal, lined up with the student's positions.

Every training example is held in both tokenizations of the same text (the student's, and its *teacher twin*:
``batch["teacher_batch"]``, built by the data setup from the same prompt and completion, or by
:func:`retokenize` from generated text). :class:`CrossTokenizerTeacher` asks the wrapped teacher (a live model or a
top-k cache) for its signal at the twin's positions, aligns the two completions by byte offsets
(:mod:`.alignment`), and gathers the teacher's rows at the student's positions, with a
:class:`~distillarena.objectives.CrossVocab` saying which positions are paired, which are one-to-one spans, the
vocabulary map, and the teacher's log-prob of each span. Objectives registered with ``cross_vocab`` (uld, aligned)
read it.

Pairing (``pairing``): ``offsets`` (default) compares a student token with the teacher token that covers the same
characters (one-to-one spans), or, inside a span that one side splits further, with the teacher token holding the
student token's first character; ``position`` compares the i-th completion token with the i-th, as the ULD paper
does (no spans: nothing is one-to-one).

An API teacher's collected records (text, the teacher's token strings and their top-k alternatives as strings)
become the same kind of signal with :func:`api_records_signal`: the teacher's vocabulary is then the set of
strings the records hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.objectives import CrossVocab, LMHeadInput, TeacherSignal
from distillarena.objectives.signals import head_logits, topk_token_logprobs
from distillarena.tasks.data import IGNORE_INDEX
from distillarena.teachers.alignment import TokenTable, align, pair_positions, token_table, vocab_map

__all__ = ["CrossTokenizerTeacher", "retokenize", "TokenizerPair", "api_records_signal", "PAIRINGS"]

PAIRINGS = ("offsets", "position")


def retokenize(ids: Sequence[int], src_tok, dst_tok) -> list[int]:
    """The completion ``ids`` of ``src_tok`` in ``dst_tok``'s ids: the text decoded (special tokens dropped) and
    encoded again; a final end-of-sequence token stays a final end-of-sequence token."""
    ids = list(ids)
    eos = bool(ids) and src_tok.eos_token_id is not None and ids[-1] == src_tok.eos_token_id
    body = ids[:-1] if eos else ids
    text = src_tok.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    out = dst_tok(text, add_special_tokens=False)["input_ids"] if text else []
    if eos and dst_tok.eos_token_id is not None:
        out = out + [dst_tok.eos_token_id]
    return out


@dataclass
class TokenizerPair:
    """The student's and the teacher's token tables, the vocabulary map between them (teacher id -> student id),
    and the tokenizers themselves when there are (:meth:`of`)."""

    student_table: TokenTable
    teacher_table: TokenTable
    vocab_map: Tensor
    student: Any = None
    teacher: Any = None

    @classmethod
    def of(cls, student, teacher) -> TokenizerPair:
        s, t = token_table(student), token_table(teacher)
        return cls(s, t, vocab_map(t, s), student, teacher)

    def to_teacher(self, ids: Sequence[int]) -> list[int]:
        return retokenize(ids, self.student, self.teacher)

    def to_student(self, ids: Sequence[int]) -> list[int]:
        return retokenize(ids, self.teacher, self.student)

    def prompt_to_student(self, teacher_prompt_ids: Sequence[int]) -> list[int]:
        """A prompt in the teacher's ids as the student reads it (decoded text, encoded with the student's own
        special tokens). Chat prompts keep the teacher's rendering of the template as plain text."""
        text = self.teacher.decode(list(teacher_prompt_ids), skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
        return self.student(text, add_special_tokens=True)["input_ids"]

    @property
    def shared_fraction(self) -> float:
        """Share of the student's vocabulary that the map reaches."""
        return float((self.vocab_map >= 0).sum()) / max(len(self.student_table), 1)


@dataclass
class _Lineup:
    index: Tensor  # [B, Ps] flat teacher position of each student position (0 where unpaired)
    paired: Tensor  # [B, Ps] bool
    matched: Tensor  # [B, Ps] bool
    span_logprob: Tensor  # [B, Ps]


def line_up(pair: TokenizerPair, s_labels: Tensor, t_labels: Tensor, t_label_logprobs: Tensor,
            pairing: str = "offsets") -> _Lineup:
    """Pair every valid student target position with a teacher target position (see the module doc).

    s_labels ``[B, Ps]``, t_labels ``[B, Pt]``: the shifted labels (the token each position predicts, -100 to
    ignore) of the two tokenizations of the same examples; ``t_label_logprobs`` ``[B, Pt]``: the teacher's log-prob
    of each of its own label tokens (for the spans' merged probability)."""
    if pairing not in PAIRINGS:
        raise UserError(f"unknown pairing {pairing!r}; expected one of {', '.join(PAIRINGS)}")
    B, Ps = s_labels.shape
    Pt = t_labels.shape[1]
    index = torch.zeros(B, Ps, dtype=torch.long)
    paired = torch.zeros(B, Ps, dtype=torch.bool)
    matched = torch.zeros(B, Ps, dtype=torch.bool)
    span_lp = torch.full((B, Ps), float("-inf"))
    s_lab, t_lab, t_lp = s_labels.cpu(), t_labels.cpu(), t_label_logprobs.detach().double().cpu()
    vmap = pair.vocab_map.tolist()
    for b in range(B):
        sp = (s_lab[b] != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
        tp = (t_lab[b] != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
        a_tok = s_lab[b, sp].tolist()
        b_tok = t_lab[b, tp].tolist()
        pa = [pair.student_table.piece(i) for i in a_tok]
        pb = [pair.teacher_table.piece(i) for i in b_tok]
        spans = align(pa, pb)
        pr = pair_positions(pa, pb, spans, pairing)
        lp_b = t_lp[b, tp].tolist()
        span_sums = [math.fsum(lp_b[s.b0:s.b1]) for s in spans]
        for i, j in enumerate(pr.partner):
            if j < 0:
                continue
            p = sp[i]
            index[b, p] = b * Pt + tp[j]
            paired[b, p] = True
            matched[b, p] = pr.one_to_one[i] and vmap[b_tok[j]] == a_tok[i]
            if pr.span[i] >= 0:
                span_lp[b, p] = span_sums[pr.span[i]]
    return _Lineup(index, paired, matched, span_lp)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x ``[B, Pt, ...]`` -> rows ``index`` ``[B, Ps]`` (flat positions) -> ``[B, Ps, ...]``."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat[index.reshape(-1).to(flat.device)].reshape(*index.shape, *x.shape[2:])


def _dense_label_logprobs(head: LMHeadInput, labels: Tensor) -> Tensor:
    """The teacher's log-prob of each of its label tokens ``[B, P]`` from a fused dense signal (chunked)."""
    valid = labels != IGNORE_INDEX
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    hidden = head.hidden[valid.to(head.hidden.device)]
    lab = labels[valid].to(hidden.device)
    rows = max(1, (1 << 24) // max(head.vocab_size, 1))
    parts = []
    for c0 in range(0, hidden.shape[0], rows):
        z = head_logits(head, hidden[c0:c0 + rows])
        parts.append((z.gather(-1, lab[c0:c0 + rows, None]) - torch.logsumexp(z, -1, keepdim=True)).squeeze(-1))
    if parts:
        out[valid] = torch.cat(parts).to(out.device, out.dtype)
    return out


class CrossTokenizerTeacher:
    """A teacher access (:class:`~distillarena.teachers.LocalTeacher` or :class:`~distillarena.teachers.TopKCache`)
    whose tokenizer differs from the student's. ``signal(batch)`` needs ``batch["teacher_batch"]`` (the teacher
    twin: ``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, inner, student_tokenizer, teacher_tokenizer, *, pairing: str = "offsets"):
        if pairing not in PAIRINGS:
            raise UserError(f"cross_tokenizer.pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
        self.inner = inner
        self.kind = inner.kind
        self.pairing = pairing
        self.pair = TokenizerPair.of(student_tokenizer, teacher_tokenizer)
        self.tokenizer = teacher_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.pair.teacher_table)

    def signal(self, batch: dict[str, Any], device: torch.device | None = None) -> TeacherSignal:
        tb = batch.get("teacher_batch")
        if tb is None:
            raise UserError("a teacher with another tokenizer needs each example in its own tokenization too "
                            "(batch['teacher_batch']); build the data with the cross_tokenizer setting")
        tb = dict(tb)
        if "example_index" in batch:
            tb["example_index"] = batch["example_index"]
        sig = self.inner.signal(tb, device)
        s_labels = batch["labels"][:, 1:]
        t_labels = tb["labels"][:, 1:]
        dev = device or s_labels.device
        if sig.kind == "dense":
            assert sig.head is not None
            head = sig.head
            t_lp = _dense_label_logprobs(head, t_labels.to(head.hidden.device))
        elif sig.kind == "topk":
            assert sig.topk_ids is not None and sig.topk_logprobs is not None and sig.tail_logprob is not None
            t_lp = topk_token_logprobs(sig.topk_ids, sig.topk_logprobs, sig.tail_logprob,
                                       t_labels.clamp(min=0).to(sig.topk_ids.device), self.vocab_size)
        else:
            raise UserError(f"a {sig.kind!r} teacher signal cannot be lined up across tokenizers")
        lu = line_up(self.pair, s_labels, t_labels, t_lp, self.pairing)
        cross = CrossVocab(vocab_map=self.pair.vocab_map.to(dev), paired=lu.paired.to(dev),
                           matched=lu.matched.to(dev), span_logprob=lu.span_logprob.to(dev))
        if sig.kind == "dense":
            h = _gather_rows(head.hidden, lu.index)
            return TeacherSignal.dense(LMHeadInput(h, head.weight, head.bias, head.logit_scale, head.softcap),
                                       cross=cross)
        return TeacherSignal.topk(_gather_rows(sig.topk_ids, lu.index), _gather_rows(sig.topk_logprobs, lu.index),
                                  _gather_rows(sig.tail_logprob, lu.index), cross=cross)


# --------------------------------------------------------------------------------------------------------------
# An API teacher's records
# --------------------------------------------------------------------------------------------------------------


def api_records_signal(records: list[dict[str, Any]], student_tokenizer, *, pairing: str = "offsets",
                       choice: int = 0) -> tuple[dict[str, Tensor], TeacherSignal]:
    """A training batch for the student and its cross-tokenizer top-k signal from an API teacher's collected
    records (:class:`~distillarena.teachers.api_client.APITeacher`, with ``top_logprobs`` asked for).

    Each record's completion text is the student's target (encoded with its tokenizer after the record's prompt);
    the teacher's tokens are the record's ``tokens`` (their UTF-8 bytes, or ``token_bytes`` when the API gives them)
    and each position's top-k alternatives are the strings in ``top_logprobs``. The teacher's "vocabulary" is the set
    of strings the records hold; a string the student's vocabulary also holds maps to that token. The tail mass is
    what the top-k leaves. Returns the batch (``input_ids``, ``attention_mask``, ``labels``) and the signal."""
    from distillarena.tasks.data import collate

    s_table = token_table(student_tokenizer)
    s_index: dict[bytes, int] = {}
    dup: set[bytes] = set()
    for i, p in enumerate(s_table.pieces):
        if p is not None and not s_table.special[i]:
            if p in s_index:
                dup.add(p)
            s_index[p] = i
    strings: dict[bytes, int] = {}

    def sid(piece: bytes) -> int:
        if piece not in strings:
            strings[piece] = len(strings)
        return strings[piece]

    encoded, teacher_rows = [], []
    for r in records:
        ch = (r.get("choices") or [None])[choice] if len(r.get("choices") or []) > choice else None
        if ch is None or ch.get("tokens") is None or ch.get("top_logprobs") is None:
            raise UserError(f"API record {r.get('id')!r} has no token log-probs: collect with top_logprobs >= 1")
        if "prompt" not in r or not isinstance(r["prompt"], str):
            raise UserError(f"API record {r.get('id')!r}: only text prompts (/completions or a user prompt) are "
                            "supported here")
        p_ids = student_tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
        c_ids = student_tokenizer(ch["text"], add_special_tokens=False)["input_ids"]
        encoded.append((p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids))
        tb = ch.get("token_bytes")
        pieces = [bytes(tb[k]) if tb and tb[k] is not None else t.encode() for k, t in enumerate(ch["tokens"])]
        tops = [[(a.encode(), float(v)) for a, v in row] for row in ch["top_logprobs"]]
        teacher_rows.append((pieces, [float(x) for x in ch["token_logprobs"]], tops))
    pad = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else 0
    batch = collate(encoded, pad)
    s_labels = batch["labels"][:, 1:]
    B, Ps = s_labels.shape
    k = max((len(row) for _, _, tops in teacher_rows for row in tops), default=1)
    k = max(k, 1)
    Pt = max((len(p) for p, _, _ in teacher_rows), default=1)
    t_ids = torch.zeros(B, Pt, k, dtype=torch.long)
    t_lps = torch.full((B, Pt, k), float("-inf"))
    t_tail = torch.full((B, Pt), float("-inf"))
    t_lab = torch.full((B, Pt), IGNORE_INDEX, dtype=torch.long)
    t_lab_lp = torch.zeros(B, Pt)
    for b, (pieces, tok_lps, tops) in enumerate(teacher_rows):
        for j, piece in enumerate(pieces):
            t_lab[b, j] = sid(piece)
            t_lab_lp[b, j] = tok_lps[j]
            row = sorted(tops[j], key=lambda x: -x[1])[:k] if j < len(tops) else []
            seen: set[int] = set()
            col = 0
            for a, v in row:
                i = sid(a)
                if i in seen:
                    continue
                seen.add(i)
                t_ids[b, j, col], t_lps[b, j, col] = i, min(v, 0.0)
                col += 1
            # the empty slots: distinct placeholder ids with zero probability
            for c in range(col, k):
                t_ids[b, j, c] = sid(b"\x00empty" + str(c).encode())
            mass = float(torch.logsumexp(t_lps[b, j, :col], 0).exp()) if col else 0.0
            t_tail[b, j] = math.log1p(-min(mass, 1.0)) if mass < 1.0 else float("-inf")
    vmap = torch.full((len(strings),), -1, dtype=torch.long)
    for piece, i in strings.items():
        if piece in s_index and piece not in dup:
            vmap[i] = s_index[piece]
    t_table = TokenTable([p for p, _ in sorted(strings.items(), key=lambda x: x[1])], [False] * len(strings), None)
    pair = TokenizerPair(s_table, t_table, vmap, student_tokenizer, None)
    # the teacher's labels as positions [B, Pt] (its tokens, in order); the student's completion as [B, Ps]
    lu = line_up(pair, s_labels, t_lab, t_lab_lp, pairing)
    cross = CrossVocab(vocab_map=vmap, paired=lu.paired, matched=lu.matched, span_logprob=lu.span_logprob)
    sig = TeacherSignal.topk(_gather_rows(t_ids, lu.index), _gather_rows(t_lps, lu.index),
                             _gather_rows(t_tail, lu.index), cross=cross)
    return batch, sig
