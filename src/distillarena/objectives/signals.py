"""What the student learns from: the teacher signal, and the student's output-layer input.

Positions
---------
Every tensor here is indexed by *target position*. Objectives flatten them: ``[B, T, ...]`` becomes ``[B*T,
...]`` and a position is one row. Labels are aligned with these positions already: ``labels[i]`` is the token
that the logits at position ``i`` should predict. The caller does the causal shift (``logits[:, :-1]`` with
``input_ids[:, 1:]``) before calling an objective. ``-100`` in the labels marks a position to ignore.

Teacher signal kinds
--------------------
``"dense"``
    The full distribution: teacher logits ``[N, V]`` (log-probs work too, ``log_softmax`` is idempotent), or
    teacher hidden states ``[N, H]`` and lm_head weight ``[V, H]`` (:class:`LMHeadInput`), from which logits
    are computed chunk by chunk so that ``[N, V]`` never exists. Every objective accepts it.
``"topk"``
    The teacher's top-k token ids ``[N, k]`` and their log-probs ``[N, k]``, plus the log of the remaining
    mass (the *tail bucket*, ``log(1 - sum(exp(topk_logprobs)))``, computed if not given). Divergences are
    then computed between the (k+1)-bucket distributions (k tokens + tail) of teacher and student: an exact
    divergence of the coarse-grained distributions, and a lower bound of the full-vocabulary one
    (data-processing inequality). Accepted by fkl, rkl, jsd, tvd, skl, srkl.
``"token_logprobs"``
    Only the teacher log-prob of the label token ``[N]``, and optionally of one sampled token per position
    (``sampled_ids`` ``[N]``, ``sampled_logprobs`` ``[N]``): what an API teacher that scores given tokens
    returns. Accepted by the one-hot estimators (sft, seqkd, rkl_onehot, jsd_onehot) and hpd (which needs the
    sampled pair).

Another tokenizer
-----------------
A dense or top-k signal may come from a teacher whose tokenizer differs from the student's: its rows are then the
teacher's distributions (over the *teacher's* vocabulary) gathered at the student's positions, and ``cross``
(a :class:`CrossVocab`) says how the two tokenizations of the text line up there: which positions have a
teacher partner, which are one-to-one spans, the vocabulary map built from the token strings, and the teacher's
log-prob of each aligned span. Only objectives registered with ``cross_vocab=True`` (uld, aligned) accept it;
``distillarena.teachers.cross`` builds it.

The teacher is always treated as a constant (no gradient flows into it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from distillarena.core.errors import UserError

__all__ = ["LMHeadInput", "TeacherSignal", "CrossVocab", "SignalKind", "SIGNAL_KINDS", "IGNORE_INDEX"]

IGNORE_INDEX = -100
SignalKind = Literal["dense", "topk", "token_logprobs"]
SIGNAL_KINDS: tuple[str, ...] = ("dense", "topk", "token_logprobs")


@dataclass(frozen=True)
class LMHeadInput:
    """Hidden states and the output layer, so that logits are computed chunk by chunk (never all at once).

    ``logits = logit_scale * (hidden @ weight.T + bias)``, then, if ``softcap`` is set,
    ``softcap * tanh(logits / softcap)`` (Gemma-2 style final-logit soft-capping).

    hidden: ``[N, H]`` or ``[B, T, H]``, the final hidden states (after the final norm), aligned with the
    labels. weight: ``[V, H]``, the lm_head weight (``model.lm_head.weight``); may be tied to the input
    embedding. bias:   ``[V]`` or None.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, Tensor) or not isinstance(self.weight, Tensor):
            raise UserError("LMHeadInput: hidden and weight must be tensors")
        if self.hidden.dim() not in (2, 3):
            raise UserError(f"LMHeadInput: hidden must be [N, H] or [B, T, H], got shape {tuple(self.hidden.shape)}")
        if self.weight.dim() != 2:
            raise UserError(f"LMHeadInput: weight must be [V, H], got shape {tuple(self.weight.shape)}")
        if self.weight.shape[1] != self.hidden.shape[-1]:
            raise UserError(
                f"LMHeadInput: hidden size {self.hidden.shape[-1]} does not match weight "
                f"{tuple(self.weight.shape)} (expected weight [V, H])"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],):
            raise UserError(f"LMHeadInput: bias must be [V={self.weight.shape[0]}], got {tuple(self.bias.shape)}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise UserError(f"LMHeadInput: logit_scale must be a positive number, got {self.logit_scale}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise UserError(f"LMHeadInput: softcap must be a positive number or None, got {self.softcap}")

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def positions_shape(self) -> tuple[int, ...]:
        return tuple(self.hidden.shape[:-1])


def _check_float(name: str, t: Tensor | None, shape: tuple[int, ...] | None = None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise UserError(f"TeacherSignal: {name} must be a floating-point tensor")
    if shape is not None and tuple(t.shape) != shape:
        raise UserError(f"TeacherSignal: {name} has shape {tuple(t.shape)}, expected {shape}")


def _check_int(name: str, t: Tensor | None, shape: tuple[int, ...] | None = None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"TeacherSignal: {name} must be an integer tensor")
    if shape is not None and tuple(t.shape) != shape:
        raise UserError(f"TeacherSignal: {name} has shape {tuple(t.shape)}, expected {shape}")


@dataclass(frozen=True)
class CrossVocab:
    """How a teacher signal in another vocabulary lines up with the student's positions (shapes: ``P``, the
    positions shape of the labels; ``Vt``, the teacher's vocabulary size).

    vocab_map:    ``[Vt]`` int: the student id of the token with the same string, -1 where the student has none.
                  One-to-one (no two teacher tokens map to the same student token).
    paired:       ``[*P]`` bool: the position has a teacher partner; the signal's row there is that partner's
                  distribution (elsewhere the row is a placeholder that objectives never read).
    matched:      ``[*P]`` bool: the position is a one-to-one span (the same characters, one token on each side,
                  the same context before): its teacher row is the distribution over the *same* next token.
    span_logprob: ``[*P]`` float: the teacher's log-prob of the characters of the aligned span the position
                  belongs to (the sum over the teacher's tokens in it); 0 where there is none.
    """

    vocab_map: Tensor
    paired: Tensor
    matched: Tensor
    span_logprob: Tensor

    def __post_init__(self) -> None:
        _check_int("cross.vocab_map", self.vocab_map)
        if self.vocab_map.dim() != 1 or self.vocab_map.numel() < 1:
            raise UserError(f"CrossVocab: vocab_map must be [Vt], got {tuple(self.vocab_map.shape)}")
        shape = tuple(self.paired.shape)
        if not isinstance(self.paired, Tensor) or self.paired.dtype != torch.bool:
            raise UserError("CrossVocab: paired must be a bool tensor")
        matched = self.matched
        if not isinstance(matched, Tensor) or matched.dtype != torch.bool or tuple(matched.shape) != shape:
            raise UserError(f"CrossVocab: matched must be a bool tensor of shape {shape}")
        _check_float("cross.span_logprob", self.span_logprob, shape)
        mapped = self.vocab_map[self.vocab_map >= 0]
        if mapped.numel() != mapped.unique().numel():
            raise UserError("CrossVocab: vocab_map maps two teacher tokens to the same student token")

    @property
    def teacher_vocab_size(self) -> int:
        return int(self.vocab_map.numel())

    @property
    def positions_shape(self) -> tuple[int, ...]:
        return tuple(self.paired.shape)


@dataclass(frozen=True)
class TeacherSignal:
    """The teacher's side of one batch of target positions. Build it with the class methods:

    * ``TeacherSignal.dense(logits)`` or ``TeacherSignal.dense(LMHeadInput(hidden, weight))``
    * ``TeacherSignal.topk(ids, logprobs, tail_logprob=None)``
    * ``TeacherSignal.token_logprobs(label_logprobs, sampled_ids=None, sampled_logprobs=None)``

    Shapes use ``P`` for the positions shape (``[N]`` or ``[B, T]``), the same as the labels'.
    Values at ignored positions (label -100) are never read, so they may be anything (padding, NaN).
    """

    kind: SignalKind
    logits: Tensor | None = None  # dense: [*P, V]
    head: LMHeadInput | None = None  # dense: teacher hidden states + lm_head
    topk_ids: Tensor | None = None  # topk: [*P, k] int
    topk_logprobs: Tensor | None = None  # topk: [*P, k]
    tail_logprob: Tensor | None = None  # topk: [*P], log of the mass outside the top k
    label_logprobs: Tensor | None = None  # token_logprobs: [*P], teacher log p(label)
    sampled_ids: Tensor | None = None  # token_logprobs: [*P] int, one student sample per position
    sampled_logprobs: Tensor | None = None  # token_logprobs: [*P], teacher log p(sample)
    cross: CrossVocab | None = None  # dense/topk from a teacher with another tokenizer (see CrossVocab)

    def __post_init__(self) -> None:
        if self.kind not in SIGNAL_KINDS:
            raise UserError(f"TeacherSignal: unknown kind {self.kind!r}; expected one of {', '.join(SIGNAL_KINDS)}")
        fields = {
            "dense": ("logits", "head"),
            "topk": ("topk_ids", "topk_logprobs", "tail_logprob"),
            "token_logprobs": ("label_logprobs", "sampled_ids", "sampled_logprobs"),
        }
        for kind, names in fields.items():
            if kind != self.kind:
                for n in names:
                    if getattr(self, n) is not None:
                        raise UserError(f"TeacherSignal: field {n!r} belongs to kind {kind!r}, not {self.kind!r}")
        if self.kind == "dense":
            if (self.logits is None) == (self.head is None):
                raise UserError("TeacherSignal.dense: give exactly one of logits or an LMHeadInput")
            if self.logits is not None:
                _check_float("logits", self.logits)
                if self.logits.dim() not in (2, 3):
                    raise UserError(
                        f"TeacherSignal: dense logits must be [N, V] or [B, T, V], got {tuple(self.logits.shape)}"
                    )
            elif not isinstance(self.head, LMHeadInput):
                raise UserError("TeacherSignal.dense: head must be an LMHeadInput")
        elif self.kind == "topk":
            if self.topk_ids is None or self.topk_logprobs is None:
                raise UserError("TeacherSignal.topk: ids and logprobs are required")
            _check_int("topk_ids", self.topk_ids)
            _check_float("topk_logprobs", self.topk_logprobs, tuple(self.topk_ids.shape))
            if self.topk_ids.dim() not in (2, 3) or self.topk_ids.shape[-1] < 1:
                raise UserError(
                    f"TeacherSignal.topk: ids must be [N, k] or [B, T, k], got {tuple(self.topk_ids.shape)}"
                )
            _check_float("tail_logprob", self.tail_logprob, tuple(self.topk_ids.shape[:-1]))
        else:
            if self.label_logprobs is None:
                raise UserError("TeacherSignal.token_logprobs: label_logprobs is required")
            _check_float("label_logprobs", self.label_logprobs)
            shape = tuple(self.label_logprobs.shape)
            if (self.sampled_ids is None) != (self.sampled_logprobs is None):
                raise UserError("TeacherSignal.token_logprobs: give both sampled_ids and sampled_logprobs, or neither")
            _check_int("sampled_ids", self.sampled_ids, shape)
            _check_float("sampled_logprobs", self.sampled_logprobs, shape)
        if self.cross is not None:
            if not isinstance(self.cross, CrossVocab):
                raise UserError("TeacherSignal: cross must be a CrossVocab")
            if self.kind == "token_logprobs":
                raise UserError("TeacherSignal: a token_logprobs signal cannot come from another vocabulary")
            if self.cross.positions_shape != self.positions_shape:
                raise UserError(f"TeacherSignal: cross positions {self.cross.positions_shape} do not match the "
                                f"signal's {self.positions_shape}")
            if self.kind == "dense" and self.vocab_size != self.cross.teacher_vocab_size:
                raise UserError(f"TeacherSignal: the dense teacher has {self.vocab_size} tokens but cross.vocab_map "
                                f"covers {self.cross.teacher_vocab_size}")

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, teacher: Tensor | LMHeadInput, cross: CrossVocab | None = None) -> TeacherSignal:
        """Full teacher distribution: logits ``[*P, V]`` or an :class:`LMHeadInput` (hidden states +
        lm_head); ``cross`` when the teacher's vocabulary is another tokenizer's."""
        if isinstance(teacher, LMHeadInput):
            return cls(kind="dense", head=teacher, cross=cross)
        return cls(kind="dense", logits=teacher, cross=cross)

    @classmethod
    def topk(cls, ids: Tensor, logprobs: Tensor, tail_logprob: Tensor | None = None,
             cross: CrossVocab | None = None) -> TeacherSignal:
        """Top-k teacher log-probs ``[*P, k]`` with their ids; ``tail_logprob`` ``[*P]`` defaults to
        ``log(1 - sum(exp(logprobs)))``. Ids must be distinct within a position; with ``cross`` they are the
        teacher's own token ids."""
        return cls(kind="topk", topk_ids=ids, topk_logprobs=logprobs, tail_logprob=tail_logprob, cross=cross)

    @classmethod
    def token_logprobs(
        cls, label_logprobs: Tensor, sampled_ids: Tensor | None = None, sampled_logprobs: Tensor | None = None
    ) -> TeacherSignal:
        """Teacher log-prob of the label token ``[*P]``, and optionally of one sampled token per position."""
        return cls(
            kind="token_logprobs",
            label_logprobs=label_logprobs,
            sampled_ids=sampled_ids,
            sampled_logprobs=sampled_logprobs,
        )

    # ---- shape helpers ------------------------------------------------------------------------------------
    @property
    def positions_shape(self) -> tuple[int, ...]:
        if self.kind == "dense":
            if self.logits is not None:
                return tuple(self.logits.shape[:-1])
            assert self.head is not None
            return self.head.positions_shape
        if self.kind == "topk":
            assert self.topk_ids is not None
            return tuple(self.topk_ids.shape[:-1])
        assert self.label_logprobs is not None
        return tuple(self.label_logprobs.shape)

    @property
    def vocab_size(self) -> int | None:
        """The teacher's vocabulary size when the signal carries it (dense), else None."""
        if self.kind != "dense":
            return None
        if self.logits is not None:
            return int(self.logits.shape[-1])
        assert self.head is not None
        return self.head.vocab_size


def topk_token_logprobs(ids: Tensor, lps: Tensor, tail: Tensor, tokens: Tensor, vocab_size: int) -> Tensor:
    """Teacher log-prob of ``tokens`` [*P] from a top-k signal: exact (as cached) inside the top k, the tail mass
    shared uniformly over the other ``V - k`` tokens outside it."""
    k = ids.shape[-1]
    eq = ids == tokens.unsqueeze(-1)
    found = eq.any(-1)
    inside = lps.gather(-1, eq.to(torch.uint8).argmax(-1, keepdim=True)).squeeze(-1)
    outside = tail - math.log(max(vocab_size - k, 1))
    return torch.where(found, inside, outside)


def head_logits(head: LMHeadInput, hidden: Tensor) -> Tensor:
    """float32 logits of ``hidden`` rows [N, H] through ``head``'s output layer."""
    z = (hidden @ head.weight.T.to(hidden.dtype)).float()
    if head.bias is not None:
        z = z + head.bias.float()
    z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z
