"""Detectors of the green-list watermark (:mod:`distillarena.defenses.watermark`): in a text, and in a suspect model
that may have been trained on watermarked text ("radioactivity", Sander et al. 2024, arXiv 2402.14904).

Every detector reduces its evidence to distinct (window, token) pairs and counts the green ones. Under the null
hypothesis (what is scored does not depend on the key) the count over ``n`` distinct pairs is Binomial(n, gamma),
so the p-value ``P(Binomial(n, gamma) >= green)`` is exact (and, being discrete, conservative: ``P(p <= a) <= a``).
What each detector scores, and why the null holds for it:

- **text** (:func:`detect_text`): every completion token of the texts, its window the ``context`` tokens before it
  (prompt included). A text written without the key is independent of it.
- **open weights** (:func:`detect_open`, the paper's "reading mode"): the suspect reads given texts (prompt and
  completion); at each completion position its next-token prediction (argmax) is scored with the window of the
  *input* text. The texts may themselves be watermarked (the provider's own outputs: most power, since the
  student saw them), so a position is scored only if its window did not occur earlier in the same input: otherwise
  the suspect could simply copy the green-biased token that followed it there. An optional entropy gate keeps
  positions where the suspect, or the provider's unwatermarked teacher (``gate``), hesitates (``min_entropy``
  nats): a function of a model and the input before the position, so it cannot select by the key either. The text
  detector takes the same gate (``model``). On low-entropy text the gate is what makes the test usable: where the
  teacher is sure, the watermark moved nothing (docs/decisions.md, "Watermarks and radioactivity").
- **API** (:func:`detect_api`): the suspect's own completions of prompts, scored as text (the provider re-encodes
  them with its tokenizer).

De-duplication across texts is what makes the count binomial: a pair scored twice is the same coin read twice,
and arithmetic solutions repeat pairs constantly (without it a clean model is "detected", see the tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from distillarena.core.errors import UserError
from distillarena.defenses.watermark import PairTally, WatermarkScheme, binomial_tail, z_score
from distillarena.tasks.data import Example, encode_example

# a text to read: (prompt, completion); or already encoded: (token ids, index of the first completion token)
Text = tuple[str, str]
Encoded = tuple[list[int], int]


@dataclass
class Detection:
    """The outcome of one test, with the evidence behind it."""

    mode: str  # "text", "open" or "api"
    gamma: float
    context: int
    texts: int = 0
    positions: int = 0  # completion positions read
    scored: int = 0  # distinct (window, token) pairs scored
    green: int = 0
    duplicates: int = 0  # pairs already scored (not counted again)
    repeated_window: int = 0  # open weights: window already in the input before the position (not scored)
    low_entropy: int = 0  # open weights: the suspect's entropy below min_entropy (not scored)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored if self.scored else float("nan")

    @property
    def z(self) -> float:
        return z_score(self.green, self.scored, self.gamma)

    @property
    def p_value(self) -> float:
        return binomial_tail(self.green, self.scored, self.gamma)[0]

    @property
    def log10_p(self) -> float:
        return binomial_tail(self.green, self.scored, self.gamma)[1]

    def as_dict(self, examples: bool = False) -> dict[str, Any]:
        out = {"mode": self.mode, "gamma": self.gamma, "context": self.context, "texts": self.texts,
               "positions": self.positions, "scored": self.scored, "green": self.green,
               "green_fraction": self.green_fraction, "z": self.z, "p_value": self.p_value,
               "log10_p": self.log10_p, "duplicates": self.duplicates, "repeated_window": self.repeated_window,
               "low_entropy": self.low_entropy}
        if examples:
            out["examples"] = self.examples
        return out

    def lines(self) -> list[str]:
        """The verdict and the evidence, for a terminal."""
        what = {"text": "green tokens in the texts", "open": "green next-token predictions of the suspect",
                "api": "green tokens in the suspect's completions"}[self.mode]
        p = f"{self.p_value:.3g}" if self.p_value > 0 else f"1e{self.log10_p:.1f}"
        out = [f"p-value {p} (log10 p = {self.log10_p:.2f}; z = {self.z:.2f})",
               f"{what}: {self.green} of {self.scored} distinct (window, token) pairs = "
               f"{self.green_fraction:.3f}, against gamma = {self.gamma:g} without the watermark",
               f"read {self.texts} texts, {self.positions} completion positions; not scored: {self.duplicates} "
               f"repeated pairs" + (f", {self.repeated_window} windows already in the input"
                                    if self.mode == "open" else "")
               + (f", {self.low_entropy} below the entropy floor" if self.low_entropy else "")
               + f" (window: the previous {self.context} tokens)"]
        for ex in self.examples:
            marks = " ".join(f"{t}{'+' if s == 'green' else '-' if s == 'red' else ''}" for t, s in ex["tokens"])
            out.append(f"  e.g. {ex['prompt']!r}: {marks}")
        if self.examples:
            out.append("  (scored tokens marked + green, - red; " + ("the suspect's predictions"
                                                                      if self.mode == "open" else "the text's tokens")
                       + ")")
        return out


def encode_texts(tokenizer, texts: Iterable[Text | Encoded]) -> list[Encoded]:
    """(ids, start) per text: prompt and completion encoded as the game's students are trained on them (the
    completion followed by EOS; :func:`distillarena.tasks.data.encode_example`)."""
    out: list[Encoded] = []
    for t in texts:
        if isinstance(t[0], str):
            ids, labels = encode_example(tokenizer, Example(prompt=t[0], completion=t[1]))
            start = next((i for i, lab in enumerate(labels) if lab != -100), len(ids))
            out.append((list(ids), start))
        else:
            ids, start = t
            out.append(([int(x) for x in ids], int(start)))
    for _ids, start in out:
        if start < 1:
            raise UserError("every text needs a prompt: the first completion token's window is read from it")
    return out


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token]).replace("\n", "\\n") if tokenizer is not None else str(token)


def _check_floor(min_entropy: float) -> None:
    if not isinstance(min_entropy, int | float) or not math.isfinite(min_entropy) or min_entropy < 0:
        raise UserError(f"min_entropy must be a finite number >= 0, got {min_entropy}")


def read_with(model, tokenizer, enc: list[Encoded], batch_size: int = 64):
    """For every text, ``model``'s argmax prediction and next-token entropy (nats) at each position: lists ``pred``,
    ``ent`` with ``pred[i - 1]`` the prediction for position ``i`` (one forward per batch, no sampling)."""
    import torch

    out = model.get_output_embeddings()
    vocab = out.weight.shape[0] if out is not None else None
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"the model predicts {vocab} token ids but the watermark's tokenizer has {len(tokenizer)}: "
                        "reading a text needs the model to share the teacher's tokenizer (use --suspect with an API "
                        "URL to score its text instead)")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    longest = max((len(ids) for ids, _ in enc), default=1)
    per_batch = max(1, min(batch_size, int(5e7 // (longest * (vocab or len(tokenizer))))))  # bounded [B, L, V]
    try:
        for b0 in range(0, len(enc), per_batch):
            chunk = enc[b0 : b0 + per_batch]
            width = max(len(ids) for ids, _ in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, (ids, _) in enumerate(chunk):
                x[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            with torch.no_grad():
                logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
                lp = torch.log_softmax(logits, dim=-1)
                pred = lp.argmax(-1).cpu().tolist()
                ent = (-(lp.exp() * lp).nansum(-1)).cpu().tolist()
            yield from zip(pred, ent, strict=True)
    finally:
        model.train(was)


def detect_text(scheme: WatermarkScheme, tokenizer, texts: Iterable[Text | Encoded], *, mode: str = "text",
                model=None, min_entropy: float = 0.0, examples: int = 2) -> Detection:
    """Is this text watermarked with ``scheme``: every completion token scored once per distinct pair. With a
    ``model`` (the provider's own, unwatermarked teacher) only positions where its next-token entropy is at least
    ``min_entropy`` are scored: where the teacher is sure, the watermark cannot move it (the entropy-gated test of
    Lee et al., "Who Wrote this Code?"). The gate reads the text before the position only, so it cannot select by
    the key."""
    _check_floor(min_entropy)
    enc = encode_texts(tokenizer, texts)
    det = Detection(mode=mode, gamma=scheme.gamma, context=scheme.context, texts=len(enc))
    tally = PairTally(scheme)
    reads = read_with(model, tokenizer, enc) if model is not None and min_entropy > 0 else None
    for n, (ids, start) in enumerate(enc):
        ent = next(reads)[1] if reads is not None else None
        shown = []
        for i in range(start, len(ids)):
            det.positions += 1
            if ent is not None and ent[i - 1] < min_entropy:
                det.low_entropy += 1
                status = "low"
            else:
                g = tally.add(scheme.window(ids, i), ids[i])
                status = "dup" if g is None else "green" if g else "red"
            if n < examples:
                shown.append((_piece(tokenizer, ids[i]), status))
        if n < examples:
            det.examples.append({"prompt": _prompt_text(tokenizer, ids[:start]), "tokens": shown})
    if reads is not None:
        next(reads, None)  # run the reader to its end (it restores the model's mode)
    det.scored, det.green, det.duplicates = tally.scored, tally.green, tally.offered - tally.scored
    return det


def _prompt_text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(ids).strip() if tokenizer is not None else " ".join(map(str, ids))


def detect_open(scheme: WatermarkScheme, model, tokenizer, texts: Iterable[Text | Encoded], *,
                batch_size: int = 64, min_entropy: float = 0.0, gate=None, examples: int = 2) -> Detection:
    """Radioactivity with open weights: ``model`` reads ``texts``; its argmax prediction at every completion position
    whose window is new in that input (and whose entropy is at least ``min_entropy``) is scored once per distinct
    pair (see the module docstring). The entropy is the suspect's own, or ``gate``'s (the provider's unwatermarked
    teacher: the positions where the watermark could move the teacher at all)."""
    _check_floor(min_entropy)
    enc = encode_texts(tokenizer, texts)
    det = Detection(mode="open", gamma=scheme.gamma, context=scheme.context, texts=len(enc))
    tally = PairTally(scheme)
    reads = read_with(model, tokenizer, enc, batch_size)
    if gate is not None and min_entropy > 0:
        reads = ((pred, ent) for (pred, _), (_, ent) in zip(reads, read_with(gate, tokenizer, enc, batch_size),
                                                            strict=True))
    for n, ((ids, start), (pred, ent)) in enumerate(zip(enc, reads, strict=True)):
        seen: set[tuple[int, ...]] = set()
        shown = []
        for i in range(1, len(ids)):
            w = scheme.window(ids, i)
            if i >= start:
                det.positions += 1
                if w in seen:
                    det.repeated_window += 1
                    status = "ctx"
                elif ent[i - 1] < min_entropy:
                    det.low_entropy += 1
                    status = "low"
                else:
                    g = tally.add(w, pred[i - 1])
                    status = "dup" if g is None else "green" if g else "red"
                if n < examples:
                    shown.append((_piece(tokenizer, pred[i - 1]), status))
            seen.add(w)
        if n < examples:
            det.examples.append({"prompt": _prompt_text(tokenizer, ids[:start]), "tokens": shown})
    det.scored, det.green, det.duplicates = tally.scored, tally.green, tally.offered - tally.scored
    return det


def detect_api(scheme: WatermarkScheme, client, tokenizer, prompts: Sequence[str], *, out=None, model=None,
               min_entropy: float = 0.0, examples: int = 2) -> Detection:
    """Radioactivity through an API: ``client`` (an :class:`~distillarena.teachers.api_client.APITeacher` on
    ``/completions``) completes ``prompts``; the completions are re-encoded with ``tokenizer`` (the watermark's) and
    scored as text, gated by ``model``'s entropy if given (:func:`detect_text`). With ``out`` (a JSON lines path)
    the collection is resumable and kept as evidence."""
    import tempfile
    from pathlib import Path

    from distillarena.teachers.api_client import read_traces

    if getattr(client, "chat", False):
        raise UserError("API detection asks /completions with the prompts as text: use an APITeacher with chat=False")
    items = [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out) if out is not None else Path(tmp) / "completions.jsonl"
        summary = client.collect(items, path)
        if summary.stopped:
            raise UserError(f"the suspect's API stopped answering: {summary.stopped}")
        records = read_traces(path)
    texts = [(r["prompt"], c["text"]) for r in sorted(records, key=lambda r: int(r["id"])) for c in r["choices"]]
    if not texts:
        raise UserError("the suspect's API answered no prompt")
    return detect_text(scheme, tokenizer, texts, mode="api", model=model, min_entropy=min_entropy, examples=examples)


__all__ = ["Detection", "detect_api", "detect_open", "detect_text", "encode_texts"]
