"""distillarena: distill language models, defend teachers against distillation, and measure both."""

__version__ = "0.1.0"

import os as _os

# Nothing is fetched from a hub at run time (DESIGN.md): set before transformers/huggingface_hub read it.
# A user who wants downloads sets HF_HUB_OFFLINE=0 explicitly.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
