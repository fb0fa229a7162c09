"""Decoding-time defenses as logits processors (Hugging Face signature; usable in ``sample`` and ``generate``),
plus what an API reveals.

- truncation baselines: :class:`TemperatureProcessor`, :class:`TopKProcessor`, :class:`TopPProcessor`;
- :class:`ProductOfExpertsProcessor`: ``(1 - gamma) z_teacher + gamma z_proxy``;
- :class:`AntidistillationProcessor`: ``z_teacher / tau + lambda b`` with the proxy gradient from
  :func:`compute_proxy_gradient` / :func:`load_proxy_gradient`;
- reveal policies :class:`RevealNothing`, :class:`RevealTopK`.
"""

from distillarena.defenses.antidistillation import (
    AntidistillationProcessor,
    ProxyGradient,
    antidistillation_scores,
    compute_proxy_gradient,
    load_proxy_gradient,
    log_softmax_jvp,
)
from distillarena.defenses.poe import ProductOfExpertsProcessor, check_gamma, product_of_experts
from distillarena.defenses.proxy import (
    LockstepProxy,
    check_same_vocabulary,
    leading_pad_mask,
    model_fingerprint,
    tokenizer_fingerprint,
)
from distillarena.defenses.reveal import RevealNothing, RevealTopK
from distillarena.defenses.truncation import TemperatureProcessor, TopKProcessor, TopPProcessor

__all__ = [
    "AntidistillationProcessor",
    "LockstepProxy",
    "ProductOfExpertsProcessor",
    "ProxyGradient",
    "RevealNothing",
    "RevealTopK",
    "TemperatureProcessor",
    "TopKProcessor",
    "TopPProcessor",
    "antidistillation_scores",
    "check_gamma",
    "check_same_vocabulary",
    "compute_proxy_gradient",
    "leading_pad_mask",
    "load_proxy_gradient",
    "log_softmax_jvp",
    "model_fingerprint",
    "product_of_experts",
    "tokenizer_fingerprint",
]
