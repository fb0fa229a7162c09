"""A served teacher's top-k log-probs, asked once and written into the top-k cache format.

Three ways to ask an OpenAI-compatible ``/v1/completions`` endpoint (prompts are sent as token ids, so the server
never re-tokenizes):

* ``prompt_logprobs`` (vLLM's extension, also ``distillarena serve``): score given text; each position's top-k
  comes back keyed by token id.
* ``echo``: score given text through ``echo: true`` + ``logprobs: k`` (the legacy OpenAI way); tokens are asked as
  ``token_id:<id>`` (``return_tokens_as_token_ids``, vLLM's and ours) and otherwise looked up in the tokenizer's
  vocabulary.
* ``generate``: sequence KD on the teacher's own answers, with the top-k it reveals for each generated token.

Every answer is appended to ``<cache>.responses.jsonl`` as soon as it arrives (:meth:`APITeacher.collect`:
concurrent, retried with backoff, resumable, budget-aware), keyed by a hash of what was asked, so an interrupted or
budget-stopped run continues where it stopped and a paid answer is never asked again. When every example is
answered the cache folder is written atomically; it is then read like any other (:class:`TopKCache`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillarena.core.errors import UserError
from distillarena.core.io import read_jsonl
from distillarena.tasks.data import IGNORE_INDEX
from distillarena.teachers.api_client import APITeacher, Budget, CollectSummary
from distillarena.teachers.topk_cache import CacheStats, write_topk_cache

MODES = ("prompt_logprobs", "echo", "generate")


@dataclass
class TopKClient(APITeacher):
    """:class:`APITeacher` on ``/v1/completions`` asking for top-k log-probs by token id (see the module doc)."""

    mode: str = "prompt_logprobs"
    tokenizer: Any = None  # to read tokens named by their text (echo / generate without token ids)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"API teacher mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.top_logprobs or self.top_logprobs < 1:
            raise UserError("the API teacher needs top_logprobs >= 1 (the k of the cache)")
        self.chat = False
        super().__post_init__()

    def params(self, item: dict[str, Any] | None = None) -> dict[str, Any]:
        k = self.top_logprobs
        if self.mode == "generate":
            p = super().params(item)
        else:  # scoring: one greedy token (vLLM refuses max_tokens 0), the prompt's log-probs
            p = {"max_tokens": 1, "temperature": 0.0}
            if self.mode == "echo":
                p.update(echo=True, logprobs=k)
        return p

    def _request(self, item: dict[str, Any]):
        kw = self.params(item)
        extra = dict(self.extra_body or {})
        if self.mode == "prompt_logprobs":
            extra["prompt_logprobs"] = self.top_logprobs
        else:
            extra["return_tokens_as_token_ids"] = True
        return self._client.completions.create(model=self.model, prompt=item["prompt"], extra_body=extra, **kw)

    def _record(self, item: dict[str, Any], resp) -> dict[str, Any]:
        if not resp.choices:
            raise UserError("the API answered with no choices")
        choice = resp.choices[0]
        rec: dict[str, Any] = {"id": item["id"], "mode": self.mode}
        if self.mode == "prompt_logprobs":
            plp = getattr(choice, "prompt_logprobs", None) or getattr(resp, "prompt_logprobs", None)
            if plp is None:
                raise UserError("the API returned no prompt_logprobs: the server does not support vLLM's "
                                "prompt_logprobs; use teacher.api.mode: echo")
            rows = [self._from_prompt_logprobs(plp[t], t) for t in item["targets"]]
        else:
            lp = choice.logprobs
            if lp is None or lp.top_logprobs is None:
                raise UserError("the API returned no log-probs (is the key allowed them?)")
            if self.mode == "echo":
                names = lp.tokens[: len(item["prompt"])]
                got = [self._token_id(n) for n in names]
                if got != list(item["prompt"]):
                    raise UserError("the API echoed other tokens than the prompt's ids: it does not score the "
                                    "given token ids as they are")
                rows = [self._from_alternatives(lp.top_logprobs[t], t) for t in item["targets"]]
            else:
                rec["completion"] = [self._token_id(n) for n in lp.tokens]
                rows = [self._from_alternatives(d, t) for t, d in enumerate(lp.top_logprobs)]
        rec["top_ids"] = [r[0] for r in rows]
        rec["top_logprobs"] = [r[1] for r in rows]
        usage = getattr(resp, "usage", None)
        rec["usage"] = usage.model_dump() if usage is not None else None
        rec["model"] = getattr(resp, "model", self.model)
        rec["response_id"] = getattr(resp, "id", None)
        return rec

    # -- parsing ---------------------------------------------------------------------------------------------------
    def _token_id(self, name: str) -> int:
        if name.startswith("token_id:"):
            return int(name[len("token_id:"):])
        tid = None
        if self.tokenizer is not None:
            tid = self.tokenizer.convert_tokens_to_ids(name)
            if tid == getattr(self.tokenizer, "unk_token_id", None) and name != self.tokenizer.unk_token:
                tid = None
        if tid is None:
            raise UserError(f"the API named a token {name!r} by its text, which is not a token of the tokenizer: "
                            "ask a server that supports return_tokens_as_token_ids (vLLM, distillarena serve)")
        return int(tid)

    def _top(self, pairs: list[tuple[int, float]], position: int) -> tuple[list[int], list[float]]:
        k = self.top_logprobs
        pairs = sorted(pairs, key=lambda p: -p[1])[:k]
        if len(pairs) < k:
            raise UserError(f"the API revealed {len(pairs)} alternatives at position {position}, fewer than "
                            f"top_logprobs={k}: lower teacher.api.top_logprobs to what the server or key allows")
        return [p[0] for p in pairs], [float(p[1]) for p in pairs]

    def _from_prompt_logprobs(self, entry: dict | None, position: int) -> tuple[list[int], list[float]]:
        if entry is None:
            raise UserError(f"the API gave no prompt log-probs at position {position}")
        pairs = [(int(tid), float(v["logprob"] if isinstance(v, dict) else v.logprob)) for tid, v in entry.items()]
        return self._top(pairs, position)

    def _from_alternatives(self, entry: dict | None, position: int) -> tuple[list[int], list[float]]:
        if entry is None:
            raise UserError(f"the API gave no top log-probs at position {position}")
        return self._top([(self._token_id(n), float(v)) for n, v in entry.items()], position)


# --------------------------------------------------------------------------------------------------------------
# A whole cache
# --------------------------------------------------------------------------------------------------------------


def tail_logprob(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top)) per row: the mass the top k leave (clamped to 1e-9 when rounding leaves none)."""
    lse = torch.logsumexp(top_logprobs.double(), dim=-1).clamp(max=-1e-9)
    return torch.log(-torch.expm1(lse)).float()


def targets_of(labels: list[int]) -> list[int]:
    """Indices ``t`` of the tokens that are learned (``labels[t] != -100``, ``t >= 1``): the log-probs at ``t``
    (of the distribution over token ``t``) are the cache's rows."""
    return [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]


def _item_id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:20]


def responses_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".responses.jsonl")


def build_api_topk_cache(out: Path, client: TopKClient, encoded: list[tuple[list[int], list[int]]], *,
                         weights: list[float] | None = None, vocab_size: int, bits: int = 8, teacher_id: str,
                         meta: dict[str, Any] | None = None, budget: Budget | None = None,
                         progress: Any | None = None) -> tuple[CacheStats, CollectSummary]:
    """Ask ``client`` for the top-k of every example (``(ids, labels)``; in ``generate`` mode only the prompt,
    the part labelled -100, is used) and write the cache folder ``out``. Raises a :class:`UserError` naming what
    is missing when the collection stops early (budget spent, key refused); what was answered stays in
    :func:`responses_path` and a later call asks only the rest."""
    out = Path(out)
    weights = list(weights) if weights is not None else [1.0] * len(encoded)
    gen = client.mode == "generate"
    items = []
    for i, (ids, labels) in enumerate(encoded):
        if gen:
            plen = next((t for t, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
            prompt = list(ids[:plen])
            item = {"prompt": prompt, "seed": (client.seed or 0) + i}
            item["id"] = _item_id("generate", client.model, prompt, client.max_tokens, client.temperature,
                                  item["seed"], client.top_logprobs)
        else:
            item = {"prompt": list(ids), "targets": targets_of(labels)}
            item["id"] = _item_id(client.mode, client.model, item["prompt"], item["targets"], client.top_logprobs)
        items.append(item)
    responses = responses_path(out)
    task = progress.add_task("asking the API teacher", total=len(items), status="") if progress else None

    def advance(done: int, total: int) -> None:
        if task is not None:
            progress.update(task, completed=done)

    summary = client.collect(items, responses, progress=advance, budget=budget)
    answered = {r["id"]: r for r in read_jsonl(responses)}
    missing = sum(1 for it in items if it["id"] not in answered)
    if missing:
        why = summary.stopped or (f"{summary.failed} prompt(s) refused (see {responses}.errors.jsonl)"
                                  if summary.failed else "unanswered prompts")
        raise UserError(f"the API teacher answered {len(items) - missing} of {len(items)} examples and stopped: "
                        f"{why}. Every answer paid for is kept in {responses}; run again with the same config to "
                        "ask only the rest (raise teacher.api.budget_tokens / budget_requests if the budget ran out)")
    rows, examples = [], []
    k = client.top_logprobs
    for it, (ids, labels) in zip(items, encoded, strict=True):
        rec = answered[it["id"]]
        if gen:
            comp = list(rec["completion"])
            ids, labels = it["prompt"] + comp, [IGNORE_INDEX] * len(it["prompt"]) + comp
        top_ids = torch.tensor(rec["top_ids"], dtype=torch.long).reshape(-1, k)
        top_lps = torch.tensor(rec["top_logprobs"], dtype=torch.float32).reshape(-1, k)
        if top_ids.numel() and int(top_ids.max()) >= vocab_size:
            raise UserError(f"the API teacher named token id {int(top_ids.max())}, outside the vocabulary of "
                            f"{vocab_size}: set teacher.api.vocab_size to the model's")
        rows.append((top_ids, top_lps, tail_logprob(top_lps) if top_lps.numel() else top_lps.sum(-1)))
        examples.append((list(ids), list(labels)))
    stats = write_topk_cache(out, tokenizer=client.tokenizer, vocab_size=vocab_size, k=k, bits=bits,
                             encoded=examples, weights=weights, rows=rows, teacher_id=teacher_id,
                             meta={**(meta or {}), "api": {"base_url": client.base_url, "model": client.model,
                                                           "mode": client.mode, "responses": str(responses)}})
    return stats, summary


__all__ = ["MODES", "TopKClient", "build_api_topk_cache", "responses_path", "tail_logprob", "targets_of"]
