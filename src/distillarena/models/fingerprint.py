"""Identities of models and tokenizers, for caches and compatibility checks (one definition each).

- :func:`model_fingerprint`: sha256 of a model's architecture and weights (a strided sample of each parameter, so
  it stays cheap for multi-billion-parameter models); keys the proxy-gradient and sequence-KD caches and ties a
  top-k cache to its teacher.
- :func:`tokenizer_fingerprint`: sha256 of a tokenizer's vocabulary and special tokens.
- :func:`tokenizer_profile`: that hash plus the vocabulary size and the ids of a probe string, to explain *how*
  two tokenizers differ (and to accept a padded copy of the same tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

# Digits, the task's symbols, accents, an emoji, whitespace runs and a special token: a tokenizer that splits this
# differently is a different tokenizer, whatever its size.
PROBE = "What is 12+7*(30-4)? 12+7=19\nAnswer: 19  naïve café, ünïcödé 😀\t<|endoftext|> The quick brown fox."

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "_commit_hash"}


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 identifying a model's architecture and weights: its config (minus volatile keys), every parameter's
    name, shape and dtype, and up to ``samples_per_tensor`` evenly strided values of each parameter (in float32).
    Any training step or different initialisation changes it."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    h.update(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(flat[::step][:samples_per_tensor].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    special = getattr(tokenizer, "all_special_tokens", [])
    blob = json.dumps([sorted(vocab.items()), sorted(map(str, special))], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenizer_profile(tokenizer) -> dict[str, Any]:
    """The fingerprint, the vocabulary size, and the ids of :data:`PROBE`."""
    return {
        "vocab_size": len(tokenizer),
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "probe_ids": tokenizer(PROBE, add_special_tokens=False)["input_ids"],
    }


__all__ = ["PROBE", "model_fingerprint", "tokenizer_fingerprint", "tokenizer_profile"]
