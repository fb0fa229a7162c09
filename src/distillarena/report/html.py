"""A self-contained ``report.html``: figures embedded as PNG data, tables and notes; opens offline."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from distillarena.core.io import atomic_write_text

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;white-space:nowrap}
.note{color:#555;font-size:.92em}.fig{display:inline-block;margin:.4em;max-width:100%}img{max-width:100%}pre{background:#f7f7f7;padding:.6em;
overflow-x:auto;font-size:.85em}
.tw{max-width:100%;overflow-x:auto}table.wide{font-size:.78em}table.wide td,table.wide th{padding:.2em .35em}
"""


def figure_png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Report:
    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def figure(self, fig: plt.Figure, caption: str = "") -> None:
        png = figure_png(fig)
        cap = f"<br><span class='note'>{html.escape(caption)}</span>" if caption else ""
        self.parts.append(f"<div class='fig'><img src='data:image/png;base64,{png}'>{cap}</div>")

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        def cell(v: object) -> str:
            if v is None or (isinstance(v, float) and not math.isfinite(v)):
                return "<td class='n'>–</td>"  # undefined (e.g. a recovery with no gain to recover)
            if isinstance(v, int | float) and not isinstance(v, bool):  # numbers right-aligned, text left
                return f"<td class='n'>{v:.3f}</td>" if isinstance(v, float) else f"<td class='n'>{v}</td>"
            return f"<td>{html.escape(str(v))}</td>"

        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
        wide = " class='wide'" if len(header) > 8 else ""  # many columns: smaller type, so they fit the page
        self.parts.append(f"<div class='tw'><table{wide}><tr>{head}</tr>{body}</table></div>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def html(self) -> str:
        body = "\n".join(self.parts)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")

    def write(self, path: Path) -> Path:
        atomic_write_text(Path(path), self.html())
        return Path(path)
