"""distillarena.objectives: the distillation loss family, in pure torch (no transformers import).

Entry point for the training loop::

    from distillarena.objectives import compute_objective, TeacherSignal, LMHeadInput

    out = compute_objective("hpd", LMHeadInput(hidden, model.lm_head.weight),
    TeacherSignal.dense(teacher_logits),
                            labels)
    (out.loss_sum / global_token_count).backward()      # normalise once, by the global count
    log(out.metrics)

* Full-vocabulary divergences (:mod:`.divergences`): fkl, rkl, jsd (TRL's generalized JSD), tvd, skl, srkl,
akl.
* One-hot estimators and HPD (:mod:`.onehot`): sft, seqkd, rkl_onehot, jsd_onehot, hpd.
* A teacher with another tokenizer (:mod:`.uld_aligned`): uld (Universal Logit Distillation) and aligned
  (aligned-span distillation), on a signal with a :class:`CrossVocab`.
* Teacher signals (:mod:`.signals`): dense logits or hidden states + lm_head, top-k log-probs with a tail
bucket,
  or the log-probs of given tokens only.
* Chunked and fused computation (:mod:`.engine`): no float32 ``[positions, V]`` tensor beyond one chunk.
* TRL-compatible ``generalized_jsd_loss`` and ``hpd_loss`` (:mod:`.functional`).
* A registry (:func:`register_objective`) to add an objective in a few lines.

Conventions: labels are aligned with the logits' positions (the caller shifts), -100 is ignored; the loss
temperature divides both logits and no T**2 factor is applied; computation is float32 (float64 inputs stay
float64).
"""

from distillarena.objectives import divergences as divergences  # noqa: F401  (registers the built-in divergences)
from distillarena.objectives import onehot as onehot  # noqa: F401  (registers the one-hot estimators and hpd)
from distillarena.objectives import uld_aligned as uld_aligned  # noqa: F401  (registers uld and aligned)
from distillarena.objectives.engine import (
    DEFAULT_CHUNK_ELEMENTS,
    ChunkResult,
    ObjectiveChunk,
    ObjectiveOutput,
    StudentInput,
    VocabAlignmentWarning,
    compute_objective,
)
from distillarena.objectives.functional import generalized_jsd_loss, hpd_loss
from distillarena.objectives.onehot import HPDWeights, hpd_weights, onehot_weight
from distillarena.objectives.registry import (
    ObjectiveSpec,
    available_objectives,
    cross_vocab_objectives,
    get_objective,
    register_objective,
    unregister_objective,
)
from distillarena.objectives.signals import IGNORE_INDEX, CrossVocab, LMHeadInput, TeacherSignal

__all__ = [
    "compute_objective",
    "ObjectiveOutput",
    "TeacherSignal",
    "CrossVocab",
    "LMHeadInput",
    "StudentInput",
    "IGNORE_INDEX",
    "register_objective",
    "unregister_objective",
    "available_objectives",
    "cross_vocab_objectives",
    "get_objective",
    "ObjectiveSpec",
    "ObjectiveChunk",
    "ChunkResult",
    "VocabAlignmentWarning",
    "DEFAULT_CHUNK_ELEMENTS",
    "generalized_jsd_loss",
    "hpd_loss",
    "hpd_weights",
    "HPDWeights",
    "onehot_weight",
]
