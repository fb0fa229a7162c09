"""Teacher access: every kind of teacher produces the :class:`~distillarena.objectives.TeacherSignal` the objectives
take, for the same (shifted) positions as the student's logits.

* :class:`LocalTeacher`: a model in memory (eval mode, no gradient, its own dtype and device); dense, fused signal.
* :class:`TopKCache`: the teacher's top-k log-probs (+ tail mass) stored once on disk (:func:`build_topk_cache`,
  ``distillarena cache-teacher``), so the teacher never sits in training memory.
* :class:`TextTeacher`: text only (the data's completions); SFT / sequence KD, optionally with per-example weights.

(The API teacher lives in ``teachers.api_client`` (the client) and ``teachers.api_topk`` (a served teacher's top-k
asked once into the top-k cache format, for ``distill``); neither is imported here.)
"""

from distillarena.teachers.compat import (
    check_tokenizers,
    context_length,
)
from distillarena.teachers.local import LocalTeacher, TextTeacher, final_hidden, output_head
from distillarena.teachers.topk_cache import (
    CacheStats,
    TopKCache,
    TopKCodec,
    build_topk_cache,
    cached_kl,
)

__all__ = [

    "CacheStats",
    "LocalTeacher",
    "TextTeacher",
    "TopKCache",
    "TopKCodec",
    "build_topk_cache",
    "cached_kl",
    "check_tokenizers",
    "context_length",
    "final_hidden",

    "output_head",

]
