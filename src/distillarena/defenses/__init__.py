"""Decoding-time defenses as logits processors (Hugging Face signature; usable in ``sample`` and ``generate``),
plus what an API reveals.

- truncation baselines: :class:`TemperatureProcessor`, :class:`TopKProcessor`, :class:`TopPProcessor`;
- :class:`ProductOfExpertsProcessor`: ``(1 - gamma) z_teacher + gamma z_proxy``;
- :class:`AntidistillationProcessor`: ``z_teacher / tau + lambda b`` with the proxy gradient from
  :func:`compute_proxy_gradient` / :func:`load_proxy_gradient`;
- reveal policies :class:`RevealNothing`, :class:`RevealTopK`;
- the table of kinds and parameters, torch-free: :mod:`distillarena.defenses.spec`.
"""

import importlib
from typing import Any

# Imported on first use: `distillarena.defenses.spec` (the defense table) must load without torch, and importing
# it runs this file first.
_WHERE = {
    "AntidistillationProcessor": "distillarena.defenses.antidistillation",
    "LockstepProxy": "distillarena.defenses.proxy",
    "ProductOfExpertsProcessor": "distillarena.defenses.poe",
    "ProxyGradient": "distillarena.defenses.antidistillation",
    "RevealNothing": "distillarena.defenses.reveal",
    "RevealTopK": "distillarena.defenses.reveal",
    "TemperatureProcessor": "distillarena.defenses.truncation",
    "TopKProcessor": "distillarena.defenses.truncation",
    "TopPProcessor": "distillarena.defenses.truncation",
    "WatermarkProcessor": "distillarena.defenses.watermark",
    "WatermarkScheme": "distillarena.defenses.watermark",
    "antidistillation_scores": "distillarena.defenses.antidistillation",
    "check_gamma": "distillarena.defenses.poe",
    "check_same_vocabulary": "distillarena.defenses.proxy",
    "compute_proxy_gradient": "distillarena.defenses.antidistillation",
    "leading_pad_mask": "distillarena.defenses.proxy",
    "load_proxy_gradient": "distillarena.defenses.antidistillation",
    "log_softmax_jvp": "distillarena.defenses.antidistillation",
    "product_of_experts": "distillarena.defenses.poe",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
