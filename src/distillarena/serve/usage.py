"""Usage per key from the ledger: the footprint an attacker leaves (a figure a report can embed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def usage_figure(rows: Sequence[dict[str, Any]], names: dict[str, str] | None = None):
    """A matplotlib figure of cumulative completion tokens (served requests) and cumulative requests (all,
    rejected included) per key against time since the first request. ``rows`` are ledger rows
    (:meth:`Store.ledger_rows`); ``names`` maps key ids to display names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    t_start = min((r["time"] for r in rows), default=0.0)
    by_key: dict[str | None, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["time"]):
        by_key.setdefault(r["key_id"], []).append(r)
    for key_id, rs in by_key.items():
        label = "(no key)" if key_id is None else f"{names.get(key_id) or key_id} [{key_id}]"
        t = [(r["time"] - t_start) / 60.0 for r in rs]
        tokens, total = [], 0
        for r in rs:
            total += r["completion_tokens"] if r["status"] == 200 else 0
            tokens.append(total)
        ax_tok.step(t, tokens, where="post", label=label)
        ax_req.step(t, list(range(1, len(rs) + 1)), where="post", label=label)
    ax_tok.set(xlabel="minutes since the first request", ylabel="completion tokens served (cumulative)",
               title="Tokens served per key")
    ax_req.set(xlabel="minutes since the first request", ylabel="requests (cumulative, incl. rejected)",
               title="Requests per key")
    if by_key:
        ax_req.legend(fontsize=8, loc="upper left")
    for ax in (ax_tok, ax_req):
        ax.grid(alpha=0.3)
    return fig


def save_usage_plot(rows: Sequence[dict[str, Any]], path: str | Path, names: dict[str, str] | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = usage_figure(rows, names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["save_usage_plot", "usage_figure"]
