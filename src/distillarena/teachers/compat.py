"""Compatibility checks between a student and its teacher: tokenizers that must agree, context lengths.
(Identities themselves are :mod:`distillarena.models.fingerprint`.)"""

from __future__ import annotations

import torch

from distillarena.core.errors import UserError
from distillarena.models.fingerprint import tokenizer_profile
from distillarena.objectives import cross_vocab_objectives


def check_tokenizers(student_tok, teacher_tok, *, align_vocab: bool = False, what: str = "teacher") -> None:
    """Raise a UserError unless the student and the teacher tokenize text identically.

    Same vocabulary: fine. Different vocabularies with ``align_vocab``: allowed if the probe string gets the same
    ids and one vocabulary is a prefix of the other (a padded or extended copy of the same tokenizer).
    """
    s, t = tokenizer_profile(student_tok), tokenizer_profile(teacher_tok)
    if s["fingerprint"] == t["fingerprint"]:
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
                    f"needs the same tokenizer{hint}; for a teacher and a student with different tokenizers, set "
                    f"cross_tokenizer: {{}} and use one of {', '.join(cross_vocab_objectives())} (or sft on the "
                    "teacher's text)")


def context_length(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
