"""Examples, user data loading, and tokenisation into training batches.

An :class:`Example` is a prompt and a completion (the part the model learns), or a chat ``messages`` list
whose last assistant turn is the completion. User data comes from JSON lines, JSON, parquet, a folder
written by ``datasets.save_to_disk``, or a dataset id already in the local ``datasets`` cache.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distillarena.core.errors import UserError
from distillarena.tasks.arithmetic import ArithmeticConfig, ArithmeticTask, Problem

IGNORE_INDEX = -100


@dataclass
class Example:
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None
    weight: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)


def problem_example(problem: Problem, rng: random.Random | None = None) -> Example:
    """A built-in problem as an example; the solution's step order is drawn from ``rng`` (first order if None)."""
    completion = problem.random_solution(rng) if rng is not None else problem.solution()
    return Example(
        prompt=problem.prompt,
        completion=completion,
        meta={"answer": problem.answer, "n_ops": problem.n_ops, "expression": problem.expression},
    )


def arithmetic_examples(split: str, n: int, n_ops: int | list[int], seed: int = 0,
                        config: ArithmeticConfig | None = None) -> list[Example]:
    task = ArithmeticTask(config or ArithmeticConfig())
    rng = random.Random(f"orders:{seed}:{split}")
    return [problem_example(p, rng) for p in task.problems(split, n, n_ops, seed)]


def arithmetic_stream(n_ops: list[int], seed: int, config: ArithmeticConfig | None = None,
                      split: str = "train") -> Iterator[Example]:
    """An endless seeded stream of ``split`` problems, each with a step order drawn at random."""
    task = ArithmeticTask(config or ArithmeticConfig())
    rng = random.Random(f"stream:{seed}:{split}")
    while True:
        p = task.sample(rng, rng.choice(n_ops))
        if p.split == split:
            yield problem_example(p, rng)


# --- user data ----------------------------------------------------------------------------------


def _load_dataset(source: str, split: str):
    import datasets

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            if not path.exists():
                raise UserError(f"data file {path} does not exist")
            return datasets.load_dataset("json", data_files=str(path), split="train")
        if suffix == ".parquet":
            if not path.exists():
                raise UserError(f"data file {path} does not exist")
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"dataset folder {path} has splits {list(ds)}, not {split!r}")
                ds = ds[split]
            return ds
        if source.startswith((".", "/", "~")) or suffix:
            raise UserError(f"data path {source} does not exist")
        return datasets.load_dataset(source, split=split, download_mode="reuse_cache_if_exists")
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable input; all are the user's to fix
        raise UserError(f"cannot read dataset {source!r}: {type(e).__name__}: {e}") from None


def load_examples(source: str, split: str = "train", limit: int | None = None) -> list[Example]:
    """Examples from user data with ``prompt``/``completion`` columns or a chat ``messages`` column."""
    ds = _load_dataset(source, split)
    columns = set(ds.column_names)
    if {"prompt", "completion"} <= columns:
        kind = "pc"
    elif "messages" in columns:
        kind = "chat"
    else:
        missing = sorted({"prompt", "completion"} - columns)
        raise UserError(
            f"dataset {source!r} has columns {sorted(columns)}; it needs 'prompt' and 'completion' "
            f"(missing: {', '.join(missing)}) or a chat 'messages' column"
        )
    has_weight = "weight" in columns
    out = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        w = float(row["weight"]) if has_weight else 1.0
        if kind == "pc":
            if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
                raise UserError(f"dataset {source!r} row {i}: 'prompt' and 'completion' must be strings")
            out.append(Example(prompt=row["prompt"], completion=row["completion"], weight=w))
        else:
            msgs = row["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise UserError(f"dataset {source!r} row {i}: the last message must be the assistant's")
            out.append(Example(messages=[{"role": m["role"], "content": m["content"]} for m in msgs], weight=w))
    if not out:
        raise UserError(f"dataset {source!r} is empty")
    return out


# --- tokenisation -------------------------------------------------------------------------------


def prompt_and_completion_text(tokenizer, ex: Example) -> tuple[str, str]:
    """Split an example into the text the model is given and the text it learns.

    For chat examples, the prompt is the template applied to all but the last turn with the generation
    prompt, and the completion is what the full rendering adds after it; so the assistant header is
    never in the completion and its end-of-turn token always is.
    """
    if ex.messages is None:
        return ex.prompt or "", ex.completion or ""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("chat-format data needs a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(ex.messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(ex.messages, tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the chat template renders the prompt differently inside the full conversation; "
                        "cannot locate the completion")
    return prompt, full[len(prompt):]


def encode_example(tokenizer, ex: Example, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` on the prompt). Plain completions get the tokenizer's EOS appended."""
    prompt, completion = prompt_and_completion_text(tokenizer, ex)
    p_ids = tokenizer(prompt, add_special_tokens=ex.messages is None)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if ex.messages is None and tokenizer.eos_token_id is not None:
        c_ids = c_ids + [tokenizer.eos_token_id]
    elif tokenizer.eos_token_id in c_ids:
        # what a template renders after the turn's end-of-turn token (ChatML's newline) is never generated:
        # the sequence ends at EOS, as the teacher's own completions (seq_kd, on-policy) do
        c_ids = c_ids[: len(c_ids) - c_ids[::-1].index(tokenizer.eos_token_id)]
    ids = p_ids + c_ids
    if max_length is not None and len(ids) > max_length:
        raise UserError(f"example of {len(ids)} tokens is longer than the limit of {max_length} "
                        f"(the model's context); shorten the data or raise max_length")
    return ids, [IGNORE_INDEX] * len(p_ids) + c_ids


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int,
            weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (aligned with input_ids, unshifted)."""
    width = max(len(ids) for ids, _ in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if weights is not None:
        batch["weights"] = torch.tensor(weights, dtype=torch.float32)
    return batch
