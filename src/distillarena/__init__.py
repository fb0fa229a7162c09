"""distillarena: distill language models, defend teachers against distillation, and measure both.

The Python API (``distill``, ``trl_loss``, ``hpd_loss``, ``DistillConfig``) is imported lazily from
``distillarena.api`` on first use, so ``import distillarena`` stays light. Nothing here sets process-wide state:
``HF_HUB_OFFLINE`` is the user's (the ``distillarena`` command defaults it to 1; see ``cli``).
"""

__version__ = "0.1.0"

_API = ("DistillConfig", "DistillResult", "distill", "hpd_loss", "trl_loss")


def __getattr__(name: str):
    if name in _API:
        from distillarena import api

        return getattr(api, name)
    raise AttributeError(f"module 'distillarena' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
