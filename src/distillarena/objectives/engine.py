"""The one entry point, :func:`compute_objective`, and the memory-lean machinery behind it.

Contract
--------
``compute_objective(name, student, teacher, labels)`` returns an :class:`ObjectiveOutput` with the *sum* of
the per-position losses over valid positions (``labels != -100``) and their *count*. The training loop divides
once by the global count (summed over micro-batches and data-parallel ranks), so gradient accumulation and
data parallelism
give exactly the update of one big batch::

    out = compute_objective("jsd", student_logits, TeacherSignal.dense(teacher_logits), labels, beta=0.5)
    (out.loss_sum / global_count).backward()

Inputs are flattened to positions (``[B, T, V] -> [B*T, V]``); labels must already be aligned with the logits'
positions (the caller does the causal shift). The student is either logits ``[*P, V]`` or an
:class:`LMHeadInput` (hidden states + lm_head weight [+ bias]); the teacher is a :class:`TeacherSignal` (a
bare tensor or LMHeadInput is taken as a dense signal).

Memory
------
Positions are processed in chunks of ``chunk_size`` valid positions (default: ``2**25 // V``, about 220
positions at V = 152,064, i.e. 128 MiB per float32 ``[chunk, V]`` buffer; a few such buffers are alive at
once. Smaller chunks save memory, but below ~200 rows CPU matrix products get slower). For each chunk the student logits
are upcast (or, on the fused path, computed from the hidden states), the teacher's likewise, and the loss and
its gradient with respect to the chunk's logits are computed *in the forward pass* (the loss is a sum over
positions, so the gradient of each chunk is known once the chunk is seen). On the fused path that gradient is
immediately pushed through the output layer (``grad_hidden[chunk] = dz @ W``, ``grad_W += dz.T @
hidden[chunk]``), Liger-style, so no float32 ``[positions, V]`` tensor ever exists beyond one chunk.
``backward`` only scales the stored gradients by the incoming gradient (in place: backward through one output
twice is refused).

The path is chosen by size: when one chunk holds every position (positions x V within the chunk budget, every
position valid), the chunk's gradient is handed over as the input's gradient (the dense case: no zero-filled
``[positions, .]`` buffer, no copy); otherwise the chunks write into one. Both give the same numbers
(``tests/test_engine_dense.py``).

Numerics
--------
Everything is computed in float32 (bf16/fp16 inputs are upcast per chunk; float64 inputs stay float64), with
``log_softmax`` and log-space mixtures, stable at logits of +-1e4. The loss temperature ``T`` divides both the
student's and the teacher's logits before the softmax; no ``T**2`` factor is applied, by any objective (as
TRL's ``generalized_jsd_loss``). Multiply the loss by ``T**2`` yourself for Hinton-style gradient scaling.

Checks
------
* Teacher logits must be finite at valid positions: NaN, +inf or -inf is a UserError naming the position (a
  teacher that masks tokens should use a large negative finite logit such as -1e4, or a top-k signal).
* A non-finite loss caused by the teacher (a zero teacher probability where the objective needs a positive
one,
  e.g. reverse KL against a top-k signal whose tail mass is 0) is a UserError naming the position. Non-finite
  *student* logits are not checked: they propagate NaN, as in PyTorch.
* Vocabulary sizes must match, unless ``align_vocab=True`` (for a padded vocabulary, e.g. 151,936 vs 152,064):
the
  extra columns are then dropped (the distributions are renormalised over the shared vocabulary) and a
  :class:`VocabAlignmentWarning` is issued if they carry more than 1e-3 probability mass on average over the
  batch (at the loss temperature).
* A batch with no valid position returns ``loss_sum == 0`` (connected to the graph; backward gives zeros) and
  ``count == 0``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distillarena.core.errors import UserError
from distillarena.objectives.registry import ObjectiveSpec, cross_vocab_objectives, get_objective
from distillarena.objectives.signals import IGNORE_INDEX, CrossVocab, LMHeadInput, TeacherSignal

__all__ = [
    "compute_objective",
    "ObjectiveOutput",
    "ObjectiveChunk",
    "ChunkResult",
    "VocabAlignmentWarning",
    "DEFAULT_CHUNK_ELEMENTS",
    "StudentInput",
]

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # elements of one [chunk, V] buffer: 128 MiB in float32
DROPPED_MASS_WARN = 1e-3
LOGPROB_TOL = 1e-4  # a log-prob above this is not a log-prob
MASS_TOL = 1e-3  # top-k probabilities may sum to at most 1 + this

StudentInput = Tensor | LMHeadInput


class VocabAlignmentWarning(UserWarning):
    """Dropped vocabulary columns carried noticeable probability mass."""


@dataclass
class ObjectiveOutput:
    """loss_sum: scalar, differentiable w.r.t. the student inputs. count: valid positions. metrics:
    diagnostics
    (means over this call's valid positions unless the name says otherwise)."""

    loss_sum: Tensor
    count: int
    metrics: dict[str, float] = field(default_factory=dict)

    def mean(self) -> Tensor:
        """``loss_sum / count`` (0 when count is 0): the local mean, for single-batch use."""
        return self.loss_sum / max(self.count, 1)


@dataclass
class ChunkResult:
    """What an objective returns for one chunk.

    loss:    ``[C]`` per-position loss.
    grad:    ``[C, V]`` gradient of ``loss.sum()`` w.r.t. the chunk's *raw* student logits (before the loss
             temperature), or None to let the engine differentiate ``loss`` with autograd.
    metrics: name -> (numerator, denominator); the engine sums both over chunks and reports their ratio.
    """

    loss: Tensor
    grad: Tensor | None = None
    metrics: dict[str, tuple[Tensor | float, Tensor | float]] = field(default_factory=dict)


@dataclass
class CrossRows:
    """One chunk's rows of a :class:`~distillarena.objectives.signals.CrossVocab` (``matched`` implies ``paired``)."""

    vocab_map: Tensor  # [Vt] long, whole
    paired: Tensor  # [C] bool
    matched: Tensor  # [C] bool
    span_logprob: Tensor  # [C]


class ObjectiveChunk:
    """One chunk of ``C`` valid positions, as an objective function sees it.

    Attributes (``V`` is the shared vocabulary size; tensors are in the compute dtype, float32 by default):

    * ``logits``: ``[C, V]`` student logits divided by the loss temperature (differentiable in the autograd
      route); ``raw_logits``: the same before the temperature (for sampling; do not differentiate through it)
    * ``labels``: ``[C]`` target ids (all valid); ``positions``: ``[C]`` flat indices in the caller's batch
    * ``temperature``; ``teacher_kind``: "dense", "topk", "token_logprobs" or "none"
    * dense: ``teacher_logits`` ``[C, V]``, divided by the temperature
    * topk: ``topk_ids``, ``topk_logprobs`` ``[C, k]``, ``tail_logprob`` ``[C]``
    * token_logprobs: ``label_logprobs``, ``sampled_ids``, ``sampled_logprobs`` ``[C]`` (sampled may be None)
    * ``extras``: the objective's per-position parameters, sliced to this chunk (e.g. hpd's ``sampled_ids``)
    * ``cross``: for a teacher with another tokenizer (``cross_vocab`` objectives only), the chunk's rows of the
      signal's :class:`~distillarena.objectives.signals.CrossVocab`, as :class:`CrossRows` (``paired``,
      ``matched``, ``span_logprob`` ``[C]``; ``vocab_map`` ``[Vt]`` whole); the teacher's rows
      (``teacher_logits`` ``[C, Vt]`` or ``topk_*`` with teacher ids) are then in the teacher's vocabulary. None
      otherwise.
    * ``generator``: the torch.Generator given to compute_objective (or None); ``needs_grad``: whether the
      engine needs a gradient for this call
    """

    def __init__(self, **kw: Any) -> None:
        self.logits: Tensor | None = None
        self.raw_logits: Tensor | None = None
        self.teacher_logits: Tensor | None = None
        self.topk_ids: Tensor | None = None
        self.topk_logprobs: Tensor | None = None
        self.tail_logprob: Tensor | None = None
        self.label_logprobs: Tensor | None = None
        self.sampled_ids: Tensor | None = None
        self.sampled_logprobs: Tensor | None = None
        self.extras: dict[str, Tensor] = {}
        self.cross: CrossRows | None = None
        self.generator: torch.Generator | None = None
        self.needs_grad = False
        self.teacher_kind = "none"
        self.temperature = 1.0
        self.vocab_size = 0
        self.positions_shape: tuple[int, ...] = ()
        for k, v in kw.items():
            setattr(self, k, v)
        self._slp: Tensor | None = None
        self._tlp: Tensor | None = None

    def describe(self, j: int) -> str:
        """Name row ``j`` of this chunk as a position of the caller's batch (for error messages)."""
        return _describe(int(self.positions[j]), self.positions_shape)

    # The two log-prob accessors give the distributions over the *support*: the vocabulary for a dense signal,
    # the k+1 buckets (top-k tokens, then the tail) for a top-k signal.
    def student_logprobs(self) -> Tensor:
        if self._slp is None:
            assert self.logits is not None
            if self.teacher_kind == "topk":
                self._slp = bucket_logprobs(self.logits, self.topk_ids)
            else:
                self._slp = F.log_softmax(self.logits, dim=-1)
        return self._slp

    def teacher_logprobs(self) -> Tensor:
        if self._tlp is None:
            if self.teacher_kind == "dense":
                assert self.teacher_logits is not None
                self._tlp = F.log_softmax(self.teacher_logits, dim=-1)
            elif self.teacher_kind == "topk":
                assert self.topk_logprobs is not None and self.tail_logprob is not None
                self._tlp = torch.cat([self.topk_logprobs, self.tail_logprob.unsqueeze(-1)], dim=-1)
            else:
                raise UserError(f"a {self.teacher_kind!r} teacher signal has no distribution to compare with")
        return self._tlp

    def take_logits(self) -> tuple[Tensor, Tensor | None]:
        """Hand over (student logits / T, teacher logits / T) and drop the chunk's references (``raw_logits``
        too), so that an objective that computes its own log-softmax frees them early (peak memory). Sample
        from ``raw_logits`` before calling this."""
        z, t = self.logits, self.teacher_logits
        assert z is not None
        self.logits = self.raw_logits = self.teacher_logits = None
        self._slp = self._tlp = None
        return z, t


def shifted_lse(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(logits - rowmax, logsumexp(logits - rowmax)) [C, V], [C, 1]. Log-probs are then ``shifted - lse``: exact
    differences of large logits first, so a float32 log-prob keeps its precision at logits of magnitude 1e4
    (``logits[a] - logsumexp(logits)`` would round at the magnitude of the logits)."""
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    return shifted, torch.logsumexp(shifted, dim=-1, keepdim=True)


def token_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits)[ids] for ids [C] or [C, k], computed precisely (see :func:`shifted_lse`)."""
    squeeze = ids.dim() == 1
    idx = ids.unsqueeze(-1) if squeeze else ids
    mx = logits.amax(dim=-1, keepdim=True).detach()
    lse = torch.logsumexp(logits - mx, dim=-1, keepdim=True)
    out = (logits.gather(-1, idx) - mx) - lse
    return out.squeeze(-1) if squeeze else out


def bucket_logprobs(logits: Tensor, ids: Tensor | None) -> Tensor:
    """Log-probs of the k+1 buckets (each top-k token, then everything else) under ``softmax(logits)``: ``[C, k+1]``.
    The tail is computed as a log-sum-exp over the other columns (exact, no ``1 - sum`` cancellation)."""
    assert ids is not None
    shifted, lse = shifted_lse(logits)
    top = shifted.gather(-1, ids) - lse
    tail = torch.logsumexp(shifted.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.cat([top, tail], dim=-1)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ------------------------------------------------------------------------------------------------------------
# Preparation: flatten, validate, align
# ------------------------------------------------------------------------------------------------------------


def _describe(i: int, shape: tuple[int, ...]) -> str:
    s = f"position {i}"
    if len(shape) == 2 and shape[1] > 0:
        s += f" (batch {i // shape[1]}, time {i % shape[1]})"
    return s


def _rows(src: Tensor, idx: Tensor, start: int | None) -> Tensor:
    """Rows ``idx`` of ``src``: a view when they are the contiguous range starting at ``start``, else a gathered
    copy. (Advanced indexing, not ``index_select``: on CPU the latter is ~20x slower for [rows, 152k] floats.)
    A view may alias the caller's tensor: never modify the result in place."""
    if start is not None:
        return src.narrow(0, start, idx.numel())
    return src[idx.to(src.device)]


def _flat_positions(t: Tensor, nlead: int) -> Tensor:
    """Flatten the leading position dims: [*P, ...] -> [N, ...]."""
    if nlead == 1:
        return t
    return t.reshape(-1, *t.shape[nlead:])


class _Plan:
    """Everything resolved for one call; ``forward`` runs the chunk loop."""

    def __init__(
        self,
        spec: ObjectiveSpec,
        student: Any,
        teacher: Any,
        labels: Tensor | None,
        *,
        temperature: float,
        chunk_size: int | None,
        align_vocab: bool,
        generator: torch.Generator | None,
        params: dict[str, Any],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.generator = generator
        if isinstance(temperature, Tensor):
            temperature = float(temperature)
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise UserError(f"temperature must be a positive number, got {temperature!r}")
        self.T = float(temperature)

        self._resolve_student(student)
        self._resolve_teacher(teacher)
        self._resolve_vocabulary(align_vocab)
        self._resolve_labels(labels)
        self._split_parameters(params)
        self._teacher_arrays()
        self._plan_chunks(chunk_size)

    def _resolve_student(self, student: Any) -> None:
        """Logits or hidden states + output layer: the positions, vocabulary, device and dtype."""
        if isinstance(student, tuple):
            student = LMHeadInput(*student)
        if isinstance(student, LMHeadInput):
            self.mode = "head"
            self.head = student
            pshape = student.positions_shape
            self.s_hidden = _flat_positions(student.hidden, len(pshape))
            self.Vs = student.vocab_size
            self.device = student.hidden.device
            sdtype = torch.promote_types(student.hidden.dtype, student.weight.dtype)
        elif isinstance(student, Tensor):
            if student.dim() not in (2, 3) or not student.is_floating_point():
                raise UserError(
                    f"student logits must be a float tensor [N, V] or [B, T, V], got {student.dtype} "
                    f"{tuple(student.shape)}"
                )
            self.mode = "logits"
            pshape = tuple(student.shape[:-1])
            self.s_logits = _flat_positions(student, len(pshape))
            self.Vs = int(student.shape[-1])
            self.device = student.device
            sdtype = student.dtype
        else:
            raise UserError(
                "student must be logits (a tensor [N, V] or [B, T, V]) or an LMHeadInput(hidden, weight[, "
                f"bias]), got {type(student).__name__}"
            )
        self.pshape = pshape
        self.N = math.prod(pshape)
        self.cdtype = torch.float64 if sdtype == torch.float64 else torch.float32

    def _resolve_teacher(self, teacher: Any) -> None:
        """The teacher signal, checked against what the objective accepts and the student's positions."""
        if isinstance(teacher, Tensor | LMHeadInput):
            teacher = TeacherSignal.dense(teacher)
        if teacher is None:
            if "none" not in self.spec.signals:
                raise UserError(f"objective {self.name!r} needs a teacher signal (teacher=None given)")
            self.tkind = "none"
        elif isinstance(teacher, TeacherSignal):
            self.tkind = teacher.kind
            if teacher.kind not in self.spec.signals:
                accepted = ", ".join(sorted(self.spec.signals - {"none"}))
                raise UserError(
                    f"objective {self.name!r} cannot use a teacher signal of kind {teacher.kind!r} (it "
                    f"accepts: {accepted}). "
                    f"{_WHY_NOT.get((self.name, teacher.kind), _WHY_NOT_KIND[teacher.kind])}"
                )
            if teacher.positions_shape != self.pshape:
                raise UserError(
                    f"teacher signal positions {teacher.positions_shape} do not match the student's {self.pshape}"
                )
            if teacher.cross is not None and not self.spec.cross_vocab:
                raise UserError(
                    f"objective {self.name!r} compares teacher and student token by token over one vocabulary, but "
                    "this teacher uses another tokenizer: use an objective made for that ("
                    f"{', '.join(cross_vocab_objectives())})"
                )
        else:
            raise UserError(f"teacher must be a TeacherSignal (or logits tensor), got {type(teacher).__name__}")
        self.teacher = teacher
        self.cross: CrossVocab | None = teacher.cross if isinstance(teacher, TeacherSignal) else None
        if self.tkind != "dense" and self.T != 1.0 and self.tkind != "none":
            raise UserError(
                f"a loss temperature ({self.T}) needs the teacher's full distribution; a {self.tkind!r} "
                "signal only carries some log-probs, whose tempered values depend on the rest of the "
                "vocabulary. Use temperature=1.0, or ask the teacher for log-probs at the temperature you "
                "want."
            )

    def _resolve_vocabulary(self, align_vocab: bool) -> None:
        """The shared vocabulary (a padded one is cut to the smaller with ``align_vocab``)."""
        self.Vt = self.teacher.vocab_size if self.tkind == "dense" else None
        self.V = self.Vs
        if self.spec.cross_vocab:
            # the teacher's distribution is compared whole, never indexed by the student's ids: no shared size needed
            return
        if self.Vt is not None and self.Vt != self.Vs:
            if not align_vocab:
                raise UserError(
                    f"student vocabulary size {self.Vs} differs from the teacher's {self.Vt}. If both models "
                    "use the same tokenizer and one vocabulary is only padded (e.g. Qwen2.5 151,936 vs "
                    "152,064), pass align_vocab=True to drop the extra columns; otherwise the tokenizers "
                    "differ and a token-level objective does not apply (retokenize, or use a "
                    "cross-tokenizer method)."
                )
            self.V = min(self.Vs, self.Vt)

    def _resolve_labels(self, labels: Tensor | None) -> None:
        """Labels checked and flattened; the valid positions."""
        if labels is None:
            if self.spec.needs_labels:
                raise UserError(f"objective {self.name!r} needs labels (the target token at each position)")
            self.labels = torch.zeros(self.N, dtype=torch.long, device=self.device)
            self.valid_idx = torch.arange(self.N, device=self.device)
        else:
            if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
                raise UserError("labels must be an integer tensor")
            if tuple(labels.shape) != self.pshape:
                raise UserError(
                    f"labels shape {tuple(labels.shape)} does not match the student's positions {self.pshape} "
                    "(labels must already be shifted to align with the logits)"
                )
            lab = labels.reshape(-1).to(self.device, torch.long)
            valid = lab != IGNORE_INDEX
            bad = valid & ((lab < 0) | (lab >= self.V))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                hint = f" (the shared vocabulary after alignment has {self.V} tokens)" if self.V != self.Vs else ""
                raise UserError(
                    f"label {int(lab[i])} at {_describe(i, self.pshape)} is outside the vocabulary [0, "
                    f"{self.V}){hint}; use {IGNORE_INDEX} for positions to ignore"
                )
            self.labels = lab.clamp(min=0)
            self.valid_idx = valid.nonzero().squeeze(1)
        self.count = int(self.valid_idx.numel())

    def _split_parameters(self, params: dict[str, Any]) -> None:
        """Per-position tensor parameters (e.g. hpd's sampled ids) apart from the scalar ones."""
        self.params = dict(params)
        self.extras: dict[str, Tensor] = {}
        for pname in self.spec.per_position:
            v = self.params.pop(pname)
            if v is None:
                continue
            if not isinstance(v, Tensor) or tuple(v.shape) != self.pshape:
                raise UserError(f"{pname} must be a tensor with the labels' shape {self.pshape}")
            self.extras[pname] = v.reshape(-1).to(self.device)

    def _teacher_arrays(self) -> None:
        """The teacher's arrays, flattened over positions, by signal kind."""
        self.t_logits: Tensor | None = None
        if self.tkind == "dense":
            if self.teacher.logits is not None:
                self.t_logits = _flat_positions(self.teacher.logits, len(self.pshape))
            else:
                assert self.teacher.head is not None
                self.t_hidden = _flat_positions(self.teacher.head.hidden, len(self.pshape))
        elif self.tkind == "topk":
            self._prepare_topk(self.teacher)
        elif self.tkind == "token_logprobs":
            self._prepare_tokens(self.teacher)
        if self.cross is not None:
            c = self.cross
            self.cross_map = c.vocab_map.to(self.device, torch.long)
            self.cross_paired = c.paired.reshape(-1).to(self.device)
            self.cross_matched = (c.matched & c.paired).reshape(-1).to(self.device)
            self.cross_span = c.span_logprob.reshape(-1).to(self.device, self.cdtype)

    def _plan_chunks(self, chunk_size: int | None) -> None:
        """Chunks of valid positions (a contiguous one is read as a view, no copy)."""
        if chunk_size is None:
            width = max(self.V, self.Vt or 0) if self.spec.cross_vocab else self.V  # a wider teacher sets the size
            chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(width, 1))
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise UserError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.C = chunk_size
        # chunks of valid positions; a chunk whose positions form one contiguous range is read as a view (no copy)
        self.chunks: list[tuple[Tensor, int | None]] = []
        for piece, cpu in zip(self.valid_idx.split(self.C), self.valid_idx.cpu().split(self.C), strict=True):
            n = cpu.numel()
            contiguous = n > 0 and int(cpu[-1]) - int(cpu[0]) + 1 == n
            self.chunks.append((piece, int(cpu[0]) if contiguous else None))
        # the dense case, chosen by size: one chunk holds every position (positions x V <= the chunk budget, all
        # of them valid), so its gradient *is* the input's gradient: no zero-filled [positions, .] buffer to copy into
        self.whole = len(self.chunks) == 1 and self.chunks[0][1] == 0 and self.count == self.N
        self.metric_sums: dict[str, list[Tensor]] = {}
        self.dropped: dict[str, list[Tensor]] = {}

    # -- signal preparation ---------------------------------------------------------------------------------
    def _first_bad(self, bad_valid: Tensor) -> str:
        i = int(self.valid_idx[bad_valid.nonzero()[0, 0]])
        return _describe(i, self.pshape)

    def _check_logprobs(self, what: str, lp: Tensor) -> None:
        """lp: values at valid positions (any trailing shape). NaN/+inf or > 0 is an error; -inf is
        allowed."""
        flat = lp.reshape(lp.shape[0], -1)
        bad = (torch.isnan(flat) | (flat > LOGPROB_TOL)).any(-1)
        if bool(bad.any()):
            raise UserError(
                f"{what} at {self._first_bad(bad)} is NaN or positive: these must be log-probabilities (<= 0)"
            )

    def _prepare_topk(self, sig: TeacherSignal) -> None:
        nlead = len(self.pshape)
        assert sig.topk_ids is not None and sig.topk_logprobs is not None
        ids = _flat_positions(sig.topk_ids, nlead).to(self.device, torch.long)
        lps = _flat_positions(sig.topk_logprobs, nlead).to(self.device, self.cdtype)
        vi = self.valid_idx
        ids_v, lps_v = ids[vi], lps[vi]
        vocab: int | None = self.V
        whose = "student"
        if self.cross is not None:
            vocab, whose = self.cross.teacher_vocab_size, "teacher"
        elif self.spec.cross_vocab:
            vocab = None  # the teacher's own ids, of a vocabulary the signal does not name
        bad = ((ids_v < 0) | (ids_v >= (vocab if vocab is not None else math.inf))).any(-1)
        if bool(bad.any()):
            where = f"outside the {whose} vocabulary [0, {vocab})" if vocab is not None else "negative"
            raise UserError(f"top-k ids at {self._first_bad(bad)} are {where}")
        if ids_v.shape[-1] > 1:
            srt = ids_v.sort(-1).values
            dup = (srt[:, 1:] == srt[:, :-1]).any(-1)
            if bool(dup.any()):
                raise UserError(f"top-k ids at {self._first_bad(dup)} contain a repeated token id")
        self._check_logprobs("top-k log-probs", lps_v)
        lse = torch.logsumexp(lps, dim=-1)
        over = lse[vi] > math.log1p(MASS_TOL)
        if bool(over.any()):
            j = over.nonzero()[0, 0]
            raise UserError(
                f"top-k probabilities at {self._first_bad(over)} sum to {float(lse[vi][j].exp()):.4f} > 1: "
                "they must be normalized log-probs of the full distribution (log_softmax over the "
                "vocabulary), not logits"
            )
        if vocab is not None and ids.shape[-1] >= vocab:
            # the ids cover the whole vocabulary (they are distinct): the tail is empty, whatever 1 - sum rounds to
            tail = torch.full_like(lse, float("-inf"))
        elif sig.tail_logprob is not None:
            tail = sig.tail_logprob.reshape(-1).to(self.device, self.cdtype)
            self._check_logprobs("the top-k tail log-prob", tail[vi])
        else:
            tail = log1mexp(lse)
        self.topk_ids, self.topk_lps, self.tail = ids, lps, tail

    def _prepare_tokens(self, sig: TeacherSignal) -> None:
        assert sig.label_logprobs is not None
        vi = self.valid_idx
        self.tok_label = sig.label_logprobs.reshape(-1).to(self.device, self.cdtype)
        self._check_logprobs("teacher label log-probs", self.tok_label[vi])
        self.tok_sids = self.tok_slps = None
        if sig.sampled_ids is not None:
            assert sig.sampled_logprobs is not None
            sids = sig.sampled_ids.reshape(-1).to(self.device, torch.long)
            bad = (sids[vi] < 0) | (sids[vi] >= self.V)
            if bool(bad.any()):
                raise UserError(f"sampled_ids at {self._first_bad(bad)} are outside the vocabulary [0, {self.V})")
            self.tok_sids = sids
            self.tok_slps = sig.sampled_logprobs.reshape(-1).to(self.device, self.cdtype)
            self._check_logprobs("teacher sampled-token log-probs", self.tok_slps[vi])

    # -- per-chunk logits -----------------------------------------------------------------------------------
    def _head_logits(self, head: LMHeadInput, h: Tensor, rows: slice | None) -> Tensor:
        W = head.weight if rows is None else head.weight[rows]
        z = h.to(W.dtype) @ W.T
        if head.bias is not None:
            b = head.bias if rows is None else head.bias[rows]
            z = z + b
        z = z.to(self.cdtype)
        if head.logit_scale != 1.0:
            z.mul_(head.logit_scale)
        if head.softcap is not None:
            z.div_(head.softcap).tanh_().mul_(head.softcap)
        return z

    def _note_dropped(self, who: str, kept: Tensor, extra: Tensor) -> None:
        """kept: [C, V] logits (already / T), extra: [C, V_extra] the dropped columns (/ T)."""
        lse_k = torch.logsumexp(kept, dim=-1)
        lse_e = torch.logsumexp(extra, dim=-1)
        mass = torch.sigmoid(lse_e - lse_k)  # = exp(lse_e) / (exp(lse_k) + exp(lse_e))
        acc = self.dropped.setdefault(who, [kept.new_zeros(()), kept.new_zeros(())])
        acc[0] = acc[0] + mass.sum()
        acc[1] = torch.maximum(acc[1], mass.max())

    def _student_chunk(self, idx: Tensor, start: int | None) -> tuple[Tensor, Tensor | None]:
        """Raw student logits [C, V] in the compute dtype (possibly a view of the caller's logits: read only)
        and the softcap derivative factor if any."""
        if self.mode == "logits":
            z = _rows(self.s_logits, idx, start).to(self.cdtype)
            if self.Vs > self.V:
                self._note_dropped("student", z[:, : self.V] / self.T, z[:, self.V :] / self.T)
                z = z[:, : self.V].contiguous()
            return z, None
        head = self.head
        h = _rows(self.s_hidden, idx, start)
        z = self._head_logits(head, h, slice(0, self.V) if self.Vs > self.V else None)
        if self.Vs > self.V:
            with torch.no_grad():
                extra = self._head_logits(head, h, slice(self.V, self.Vs))
                self._note_dropped("student", z / self.T, extra / self.T)
        dfac = None
        if head.softcap is not None:
            dfac = 1.0 - (z / head.softcap).square()
        return z, dfac

    def _teacher_chunk(self, idx: Tensor, start: int | None) -> Tensor:
        """Teacher logits [C, V] / T, checked finite (possibly a view of the caller's logits: read only)."""
        assert self.Vt is not None
        if self.t_logits is not None:
            t = _rows(self.t_logits, idx, start).to(self.device, self.cdtype)
        else:
            head = self.teacher.head
            t = self._head_logits(head, _rows(self.t_hidden, idx, start), None).to(self.device)
        rowsum = t.sum(-1)
        bad = ~torch.isfinite(rowsum)
        if bool(bad.any()):
            i = int(idx[bad.nonzero()[0, 0]])
            raise UserError(
                f"teacher logits at {_describe(i, self.pshape)} contain NaN or +-inf. Objectives need finite "
                "teacher logits; a teacher that masks tokens should use a large negative finite logit (e.g. "
                "-1e4) or send a top-k signal."
            )
        if self.T != 1.0:
            t = t / self.T
        if self.Vt > self.V and not self.spec.cross_vocab:
            self._note_dropped("teacher", t[:, : self.V], t[:, self.V :])
            t = t[:, : self.V].contiguous()
        return t

    def _make_chunk(self, idx: Tensor, start: int | None, z: Tensor, needs_grad: bool) -> ObjectiveChunk:
        logits = z / self.T if self.T != 1.0 else z
        ch = ObjectiveChunk(
            logits=logits,
            raw_logits=z,
            labels=_rows(self.labels, idx, start),
            positions=idx,
            temperature=self.T,
            teacher_kind=self.tkind,
            generator=self.generator,
            needs_grad=needs_grad,
            vocab_size=self.V,
            positions_shape=self.pshape,
            extras={k: _rows(v, idx, start) for k, v in self.extras.items()},
        )
        if self.cross is not None:
            ch.cross = CrossRows(
                vocab_map=self.cross_map,
                paired=_rows(self.cross_paired, idx, start),
                matched=_rows(self.cross_matched, idx, start),
                span_logprob=_rows(self.cross_span, idx, start),
            )
        if self.tkind == "dense":
            ch.teacher_logits = self._teacher_chunk(idx, start)
        elif self.tkind == "topk":
            ch.topk_ids = _rows(self.topk_ids, idx, start)
            ch.topk_logprobs = _rows(self.topk_lps, idx, start)
            ch.tail_logprob = _rows(self.tail, idx, start)
        elif self.tkind == "token_logprobs":
            ch.label_logprobs = _rows(self.tok_label, idx, start)
            if self.tok_sids is not None:
                assert self.tok_slps is not None
                ch.sampled_ids = _rows(self.tok_sids, idx, start)
                ch.sampled_logprobs = _rows(self.tok_slps, idx, start)
        return ch

    def _run_objective(
        self, idx: Tensor, start: int | None, needs_grad: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """Loss [C], gradient w.r.t. the raw chunk logits [C, V], softcap factor, and student-row
        finiteness."""
        spec = self.spec
        C = idx.numel()
        z, dfac = self._student_chunk(idx, start)
        s_finite = torch.isfinite(z.sum(-1))
        if spec.returns_grad:
            # built-in objectives never modify the chunk's logits in place (they may be views of the inputs)
            ch = self._make_chunk(idx, start, z, needs_grad)
            del z
            res = spec.fn(ch, **self.params)
            if not isinstance(res, ChunkResult):
                raise ValueError(f"objective {self.name!r} is registered with returns_grad=True but returned {res!r}")
            values, grad = res.loss.detach(), res.grad
            if needs_grad and grad is None:
                raise ValueError(f"objective {self.name!r} returned no gradient")
        else:
            with torch.enable_grad():
                # a private copy: a user objective may modify what it is given
                zl = z.detach().clone().requires_grad_(needs_grad)
                del z
                ch = self._make_chunk(idx, start, zl, needs_grad)
                res = spec.fn(ch, **self.params)
                if isinstance(res, Tensor):
                    res = ChunkResult(loss=res)
                if not isinstance(res, ChunkResult):
                    raise ValueError(f"objective {self.name!r} returned {type(res).__name__}, expected a tensor [C]")
                values, grad = res.loss, res.grad
                if needs_grad and grad is None:
                    grad = None
                    if values.requires_grad:
                        grad = torch.autograd.grad(values.sum(), zl, allow_unused=True)[0]
                    if grad is None:
                        grad = torch.zeros_like(zl)
                values = values.detach()
        if tuple(values.shape) != (C,):
            raise ValueError(f"objective {self.name!r} returned a loss of shape {tuple(values.shape)}, expected ({C},)")
        for k, (num, den) in res.metrics.items():
            acc = self.metric_sums.setdefault(k, [torch.zeros((), dtype=self.cdtype, device=self.device)] * 2)
            acc[0] = acc[0] + num
            acc[1] = acc[1] + den
        return values, grad, dfac, s_finite

    # -- the loop -------------------------------------------------------------------------------------------
    def forward(self, want: tuple[bool, ...]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """want: which inputs need a gradient ((logits,) or (hidden, weight, bias)). Returns (loss_sum,
        grads)."""
        needs_grad = any(want)
        loss = torch.zeros((), dtype=self.cdtype, device=self.device)
        g_logits = g_h = g_w = g_b = None
        if self.mode == "logits":
            if want[0] and not self.whole:
                g_logits = torch.zeros_like(self.s_logits)
        else:
            head = self.head
            if want[0] and not self.whole:
                g_h = torch.zeros_like(self.s_hidden)
            if want[1]:
                # written by the first chunk (mm out=), accumulated by the next ones: no 0.6 GB zero-fill
                g_w = torch.empty(head.weight.shape, dtype=self.cdtype, device=head.weight.device)
            if len(want) > 2 and want[2]:
                assert head.bias is not None
                g_b = torch.zeros(head.bias.shape, dtype=self.cdtype, device=head.bias.device)

        g_w_written = False
        for idx, start in self.chunks:
            values, dz, dfac, s_finite = self._run_objective(idx, start, needs_grad)
            nonfinite = ~torch.isfinite(values)
            if bool((nonfinite & s_finite).any()):
                j = int((nonfinite & s_finite).nonzero()[0, 0])
                raise UserError(
                    f"objective {self.name!r} is infinite at {_describe(int(idx[j]), self.pshape)}: the "
                    "teacher gives zero probability (log-prob -inf) where this objective needs a positive "
                    "one (e.g. reverse KL against a top-k signal with zero tail mass, or a -inf token "
                    "log-prob). Use an objective that mixes the distributions (jsd, srkl), or clamp the "
                    "teacher log-probs."
                )
            loss = loss + values.sum()
            if not needs_grad:
                continue
            assert dz is not None
            if self.mode == "logits":
                if want[0]:
                    if self.Vs > self.V:
                        dz = F.pad(dz, (0, self.Vs - self.V))
                    if g_logits is not None:
                        g_logits.index_copy_(0, idx, dz.to(g_logits.dtype))
                    else:  # dense: the one chunk is every position, in order
                        g_logits = dz.to(self.s_logits.dtype)
                continue
            # fused: push the chunk's gradient through softcap, scale and the linear layer
            head = self.head
            if dfac is not None:
                dz.mul_(dfac)
                del dfac
            if head.logit_scale != 1.0:
                dz.mul_(head.logit_scale)
            W = head.weight[: self.V]
            if g_h is not None:
                g_h.index_copy_(0, idx, (dz.to(W.dtype) @ W).to(g_h.dtype))
            elif want[0]:  # dense
                g_h = (dz.to(W.dtype) @ W).to(self.s_hidden.dtype)
            if g_w is not None:
                h = _rows(self.s_hidden, idx, start).to(self.cdtype)
                if g_w_written:
                    g_w[: self.V].addmm_(dz.T, h)
                else:
                    torch.mm(dz.T, h, out=g_w[: self.V])
                    g_w_written = True
            if g_b is not None:
                g_b[: self.V] += dz.sum(0)
            del dz

        if self.mode == "logits":
            return loss, (g_logits,)
        head = self.head
        if g_w is not None:
            if not g_w_written:
                g_w.zero_()
            elif self.V < self.Vs:
                g_w[self.V :].zero_()
        if g_w is not None and g_w.dtype != head.weight.dtype:
            g_w = g_w.to(head.weight.dtype)
        if g_b is not None and head.bias is not None and g_b.dtype != head.bias.dtype:
            g_b = g_b.to(head.bias.dtype)
        return loss, (g_h, g_w, g_b)

    def finish_metrics(self) -> dict[str, float]:
        names, vals = [], []
        for k, (num, den) in self.metric_sums.items():
            names.append(k)
            vals.append(torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num)))
        for who, (tot, mx) in self.dropped.items():
            names += [f"vocab/{who}_dropped_mass", f"vocab/{who}_dropped_mass_max"]
            vals += [tot / max(self.count, 1), mx]
        if not vals:
            return {}
        floats = torch.stack([v.to(torch.float64).reshape(()) for v in vals]).tolist()
        out = dict(zip(names, floats, strict=True))
        for who in self.dropped:
            mean, mx = out[f"vocab/{who}_dropped_mass"], out[f"vocab/{who}_dropped_mass_max"]
            if mean > DROPPED_MASS_WARN:
                warnings.warn(
                    VocabAlignmentWarning(
                        f"align_vocab dropped {self.V_extra(who)} {who} vocabulary columns that carry "
                        f"{mean:.2e} probability mass on average over the batch (max {mx:.2e} at one "
                        f"position, threshold {DROPPED_MASS_WARN:g}): they are not just padding; check that "
                        "student and teacher share a tokenizer."
                    ),
                    stacklevel=3,
                )
        return out

    def V_extra(self, who: str) -> int:
        return (self.Vs if who == "student" else (self.Vt or 0)) - self.V


class _ObjectiveFunction(torch.autograd.Function):
    """Computes the loss sum and, in the same pass, the gradient w.r.t. the student inputs (chunk by
    chunk)."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *inputs: Tensor | None) -> Tensor:  # type: ignore[override]
        want = tuple(bool(x) for x in ctx.needs_input_grad[1:])
        loss, grads = plan.forward(want)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "compute_objective's loss was backpropagated twice: its gradients are computed in the "
                "forward pass and scaled in place, so call compute_objective again for a second backward"
            )
        ctx.grads = None
        if g.numel() == 1 and float(g) == 1.0:
            return (None, *grads)
        out = tuple(None if x is None else x.mul_(g.to(x.dtype)) for x in grads)
        return (None, *out)


def compute_objective(
    name: str,
    student: StudentInput,
    teacher: TeacherSignal | Tensor | LMHeadInput | None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    align_vocab: bool = False,
    generator: torch.Generator | None = None,
    **params: Any,
) -> ObjectiveOutput:
    """Compute objective ``name`` summed over the valid positions of one (micro-)batch.

    Args:
      name: a registered objective ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "sft", "seqkd",
        "rkl_onehot", "jsd_onehot", "hpd", or your own; see :func:`available_objectives`).
      student: logits ``[N, V]`` / ``[B, T, V]`` (any float dtype), or ``LMHeadInput(hidden, weight,
        bias)`` for the fused path (a ``(hidden, weight[, bias])`` tuple is accepted too).
      teacher: a :class:`TeacherSignal` (a bare logits tensor or LMHeadInput means
        ``TeacherSignal.dense(...)``); None only for "sft".
      labels: ``[N]`` / ``[B, T]`` target ids aligned with the logits, -100 = ignore. Optional for the
        full-vocabulary divergences (then every position counts).
      temperature: the loss temperature (both logits are divided by it; no T**2 factor). Independent of any
        sampling temperature.
      chunk_size: valid positions per chunk (default: ``2**25 // V``). Results do not depend on it (up to
        float rounding), except for hpd's own sampling, which you can fix by passing ``sampled_ids``.
      align_vocab: allow student and teacher vocabulary sizes to differ by dropping the extra columns.
      generator: torch.Generator for objectives that sample (hpd).
      **params: the objective's parameters (e.g. ``beta`` for jsd, ``alpha`` for skl/srkl, ``mu`` for akl).

    Returns:
      ObjectiveOutput(loss_sum, count, metrics). Normalise once: ``loss = out.loss_sum / global_count``.
    """
    spec = get_objective(name)
    resolved = spec.resolve_params(params)
    plan = _Plan(
        spec,
        student,
        teacher,
        labels,
        temperature=temperature,
        chunk_size=chunk_size,
        align_vocab=align_vocab,
        generator=generator,
        params=resolved,
    )
    if plan.mode == "logits":
        inputs: tuple[Tensor | None, ...] = (plan.s_logits,)
    else:
        inputs = (plan.s_hidden, plan.head.weight, plan.head.bias)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        loss = _ObjectiveFunction.apply(plan, *inputs)
    else:
        with torch.no_grad():
            loss, _ = plan.forward(tuple(False for _ in inputs))
    return ObjectiveOutput(loss_sum=loss, count=plan.count, metrics=plan.finish_metrics())


_WHY_NOT_KIND = {
    "dense": "",
    "topk": "It needs the teacher's probability of specific tokens (the label, a sample) or its full sorted "
    "distribution, which a top-k signal lacks outside the top k: use a dense or token_logprobs signal.",
    "token_logprobs": "It compares full distributions, and a token_logprobs signal only carries the "
    "teacher's log-prob of given tokens: use the one-hot estimators (seqkd, rkl_onehot, jsd_onehot) or "
    "hpd, or a dense/topk signal.",
}
_AKL_TOPK = (
    "AKL splits the vocabulary into head and tail by the teacher's sorted cumulative probability, and its "
    "tail error sums |p - q| per token, which a top-k signal cannot give: use a dense signal."
)
_WHY_NOT: dict[tuple[str, str], str] = {("akl", "topk"): _AKL_TOPK}
