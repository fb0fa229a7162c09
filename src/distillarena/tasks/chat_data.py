"""Chat-format data for real instruct models: the built-in arithmetic problems as conversations, and the
competition-math problems shipped in ``champ-dataset`` as an out-of-domain held-out probe.

Rows are JSON lines with a ``messages`` list (user turn, then assistant turn), so :func:`tasks.data.load_examples`
reads them as chat examples and :func:`tasks.data.encode_example` renders them with the tokenizer's own chat
template: the completion is the assistant's turn, end-of-turn token included, the header never.

``champ-dataset`` (270 problems with step-by-step solutions, MIT licence) is read from the JSON file inside the
installed package (its ``__init__`` is not needed): the user turn is the problem text, the assistant turn the
shipped solution steps, one per line, then ``Answer: <answer>`` (``@@`` math markers removed).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from distillarena.core.errors import UserError
from distillarena.tasks.arithmetic import ArithmeticConfig, ArithmeticTask

CHAMP_PACKAGE = "champ_dataset"
CHAMP_FILE = "dataset_files/v0.json"


def chat_row(user: str, assistant: str, **meta: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": assistant}]}
    row.update(meta)
    return row


def arithmetic_chat_rows(split: str, n: int, n_ops: list[int], seed: int = 0,
                         config: ArithmeticConfig | None = None) -> list[dict[str, Any]]:
    """``n`` built-in problems of ``split`` as conversations: the question (no trailing newline) and the reference
    chain of thought ending in ``Answer: <value>``."""
    task = ArithmeticTask(config or ArithmeticConfig())
    return [chat_row(p.prompt.strip(), p.solution(), answer=p.answer, n_ops=p.n_ops)
            for p in task.problems(split, n, n_ops, seed)]


def champ_file() -> Path:
    spec = importlib.util.find_spec(CHAMP_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("champ-dataset is not installed: pip install champ-dataset==1.0.0 (part of the `real` extra; "
                        "or pass --no-champ)")
    path = Path(spec.origin).parent / CHAMP_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall champ-dataset==1.0.0")
    return path


def _clean(text: str) -> str:
    return text.replace("@@", "").strip()


def champ_rows(limit: int | None = None) -> list[dict[str, Any]]:
    """The champ-dataset problems (sorted by identifier) as conversations with the shipped solution."""
    data = json.loads(champ_file().read_text())
    rows = []
    for pid in sorted(data["problems"]):
        p = data["problems"][pid]
        steps = [_clean(s["_raw_text"]) for s in p["solution"]["steps"]]
        answer = _clean(p["_raw_answer"])
        rows.append(chat_row(_clean(p["_raw_text"]), "\n".join(steps + [f"Answer: {answer}"]),
                             id=pid, category=p["category"], answer=answer))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    from distillarena.core.io import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


def write_chat_data(out: Path, *, train: int = 512, heldout: int = 64, n_ops: list[int] | None = None,
                    seed: int = 0, champ: bool = True) -> dict[str, Path]:
    """Write ``arithmetic-train.jsonl``, ``arithmetic-heldout.jsonl`` (the task's holdout split) and
    ``champ.jsonl`` into ``out``; return their paths by name."""
    n_ops = n_ops or [1, 2, 3]
    out = Path(out).expanduser()
    files = {"arithmetic-train": arithmetic_chat_rows("train", train, n_ops, seed),
             "arithmetic-heldout": arithmetic_chat_rows("holdout", heldout, n_ops, seed)}
    if champ:
        files["champ"] = champ_rows()
    return {name: write_jsonl(out / f"{name}.jsonl", rows) for name, rows in files.items()}
