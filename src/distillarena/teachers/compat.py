"""Identity and compatibility checks: tokenizers that must agree, models and data a cache was built for."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from distillarena.core.errors import UserError

# Digits, the task's symbols, accents, an emoji, whitespace runs and a special token: a tokenizer that splits this
# differently is a different tokenizer, whatever its size.
PROBE = "What is 12+7*(30-4)? 12+7=19\nAnswer: 19  naïve café, ünïcödé 😀\t<|endoftext|> The quick brown fox."


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Vocabulary size, a hash of the whole vocabulary, and the ids of a probe string."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return {
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "probe_ids": tokenizer(PROBE, add_special_tokens=False)["input_ids"],
    }


def check_tokenizers(student_tok, teacher_tok, *, align_vocab: bool = False, what: str = "teacher") -> None:
    """Raise a UserError unless the student and the teacher tokenize text identically.

    Same vocabulary: fine. Different vocabularies with ``align_vocab``: allowed if the probe string gets the same
    ids and one vocabulary is a prefix of the other (a padded or extended copy of the same tokenizer).
    """
    s, t = tokenizer_fingerprint(student_tok), tokenizer_fingerprint(teacher_tok)
    if s["vocab_sha256"] == t["vocab_sha256"]:
        return
    same_probe = s["probe_ids"] == t["probe_ids"]
    if align_vocab and same_probe:
        sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
        small, big = (sv, tv) if len(sv) <= len(tv) else (tv, sv)
        if all(big.get(tok) == i for tok, i in small.items()):
            return
    detail = (f"vocabulary sizes {s['vocab_size']} vs {t['vocab_size']}, "
              f"probe text {'tokenized the same' if same_probe else 'tokenized differently'}")
    hint = ("; if one is only a padded copy of the other, set align_vocab: true" if not align_vocab else "")
    raise UserError(f"the student's tokenizer differs from the {what}'s ({detail}): token-level distillation "
                    f"needs the same tokenizer{hint}")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's configuration and weights (its identity for caches)."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def context_length(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
