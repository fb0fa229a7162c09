"""Detectability, the game's third axis beside teacher utility and student recovery: the p-value of the
radioactivity test (:func:`distillarena.forensics.detect_open`) on each trained student.

Every cell's student is tested against one scheme (key, gamma, context): the game's first watermark defense's
(its first strength), else ``detect``'s own. A student that never saw watermarked text is then a null case of the
test, so the report shows false accusations as plainly as detections. The p-value is stored in ``cell.json``
(the student itself is not kept); a cell tested with another scheme or other texts than the config's shows
no value rather than a stale one.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Any

from distillarena.game.config import GameConfig

ALPHA = 0.01  # the report's "detected" threshold (a one-sided test per student)


def detection_params(cfg: GameConfig) -> dict[str, Any]:
    """The scheme every student is tested against, as ``{key, gamma, context}``."""
    for d in cfg.defenses:
        if d.kind == "watermark":
            from distillarena.defenses.spec import defense_spec

            p = defense_spec("watermark").params.model_validate(cfg.decoding.under(d.strengths[0]))
            return {"key": p.key, "gamma": p.gamma, "context": p.context}
    return {"key": cfg.detect.key, "gamma": cfg.detect.gamma, "context": cfg.detect.context}


def scheme_id(cfg: GameConfig) -> dict[str, Any]:
    """What a stored p-value was computed with (the key as a digest: the report does not print the secret)."""
    p = detection_params(cfg)
    return {"key_digest": hashlib.sha256(p["key"].encode()).hexdigest()[:12], "gamma": p["gamma"],
            "context": p["context"], "texts": cfg.detect.texts, "n_texts": cfg.detect.n_texts,
            "min_entropy": cfg.detect.min_entropy, "gate": cfg.detect.gate}


def reading_texts(cfg: GameConfig, task, records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The texts the student reads: its cell's traces, or reference solutions of test problems."""
    if cfg.detect.texts == "traces":
        return [(r["prompt"], r["completion"]) for r in records[: cfg.detect.n_texts]]
    from distillarena.tasks.data import problem_example

    problems = task.problems("test", cfg.detect.n_texts, cfg.prompts.n_ops, seed=3)
    return [(ex.prompt, ex.completion) for ex in (problem_example(p) for p in problems)]


def detectability(cfg: GameConfig, student, tok, task, records: list[dict[str, Any]], teacher=None
                  ) -> dict[str, Any]:
    """The cell's detectability fields: ``detect`` (the test's evidence) and ``detect_p_value`` /
    ``detect_log10_p``; nothing when ``detect.enabled`` is off. ``teacher()`` -> (model, ...): the undefended
    teacher, whose entropy gates the scored positions (``detect.gate: teacher``)."""
    if not cfg.detect.enabled:
        return {}
    from distillarena.defenses.watermark import WatermarkScheme
    from distillarena.forensics import detect_open

    p = detection_params(cfg)
    gate = teacher()[0] if cfg.detect.gate == "teacher" and cfg.detect.min_entropy > 0 and teacher else None
    det = detect_open(WatermarkScheme(p["key"], p["gamma"], p["context"]), student, tok,
                      reading_texts(cfg, task, records), min_entropy=cfg.detect.min_entropy, gate=gate, examples=0)
    return {"detect": {**det.as_dict(), "scheme": scheme_id(cfg)}, "detect_p_value": det.p_value,
            "detect_log10_p": det.log10_p}


def detectability_rows(cfg: GameConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (defense, attacker): each seed's p-value (None where the cell has none for this config's
    scheme), how many seeds are detected at ``ALPHA``, and the green fraction against gamma."""
    want = scheme_id(cfg)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["defense_label"], r["attacker"])].append(r)
    out = []
    for (dlabel, attacker), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        ok = [r for r in rs if (r.get("detect") or {}).get("scheme") == want]
        out.append({
            "defense_label": dlabel, "defense": rs[0]["defense"], "attacker": attacker,
            "seeds": [r["seed"] for r in rs],
            "p_values": [r["detect"]["p_value"] if r in ok else None for r in rs],
            "log10_p": [r["detect"]["log10_p"] if r in ok else None for r in rs],
            "detected": sum(r["detect"]["p_value"] < ALPHA for r in ok), "tested": len(ok),
            "scored": [r["detect"]["scored"] if r in ok else None for r in rs],
            "green_fraction": [r["detect"]["green_fraction"] if r in ok else None for r in rs],
        })
    return out


def format_p(p: float | None, log10_p: float | None = None) -> str:
    if p is None:
        return "–"
    if p > 0:
        return f"{p:.2g}"
    return f"1e{log10_p:.0f}" if log10_p is not None and math.isfinite(log10_p) else "0"


def add_detectability_section(r, cfg: GameConfig, summary: dict[str, Any], summary_rows: list[dict[str, Any]]
                              ) -> None:
    """The report's detectability table, beside utility and recovery."""
    det = summary.get("detectability")
    if not det:
        return
    by = {(s["defense_label"], s["attacker"]): s for s in summary_rows}
    p = detection_params(cfg)
    r.heading("Detectability: is the student radioactive?")
    r.text(f"Each trained student reads {cfg.detect.n_texts} "
           + ("of its cell's traces (the provider's log of what it served)" if cfg.detect.texts == "traces"
              else "reference solutions of test problems")
           + f"; its next-token predictions are scored against the watermark scheme (gamma {p['gamma']:g}, window of "
           f"{p['context']} tokens), each distinct (window, token) pair once, a window already in the input not at "
           f"all, only where the {cfg.detect.gate}'s next-token entropy is at least {cfg.detect.min_entropy:g} nats. "
           "p: the exact binomial p-value of the green count (one-sided); a student that never saw watermarked "
           f"text should get a uniform p. Detected: p < {ALPHA:g}.", note=True)

    def cell(s: dict[str, Any] | None, key: str, fmt: str) -> str:
        v = (s or {}).get(key)
        return format(v, fmt) if isinstance(v, int | float) and math.isfinite(v) else "–"

    r.table(["defense", "attacker", "teacher acc", "student acc", "R", "p per seed", "detected", "green fraction "
             f"(gamma {p['gamma']:g})", "pairs scored"],
            [[d["defense_label"], d["attacker"], cell(by.get((d["defense_label"], d["attacker"])), "teacher_accuracy",
                                                      ".3f"),
              cell(by.get((d["defense_label"], d["attacker"])), "student_accuracy", ".3f"),
              cell(by.get((d["defense_label"], d["attacker"])), "recovery", ".2f"),
              ", ".join(format_p(pv, lp) for pv, lp in zip(d["p_values"], d["log10_p"], strict=True)),
              f"{d['detected']}/{d['tested']}",
              ", ".join("–" if g is None else f"{g:.3f}" for g in d["green_fraction"]),
              ", ".join("–" if n is None else str(n) for n in d["scored"])] for d in det])


__all__ = ["ALPHA", "add_detectability_section", "detectability", "detectability_rows", "detection_params",
           "reading_texts", "scheme_id"]
