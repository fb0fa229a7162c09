"""Real-model helpers of the command line: a layer-dropped copy of a converted model, saved as its own folder (the
student or Product-of-Experts proxy of ``examples/game-smollm2.yaml``); and the steps around the real distillation
recipe ``examples/distill-smollm2-real.yaml``: its chat prompts, and the before/after comparison
(``python -m distillarena.recipes.real data|compare``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from distillarena.core.errors import UserError
from distillarena.core.io import atomic_dir, atomic_write_json
from distillarena.models.presets import load_model, load_tokenizer
from distillarena.train.student import copy_with_layers_dropped

INFO = "distillarena_layers.json"


def save_layer_dropped(src: str | Path, keep_every: int, out: str | Path | None = None, *,
                       force: bool = False) -> Path:
    """Save a float32 copy of the model in ``src`` keeping layers 0, k, 2k, ... (``k = keep_every``) in ``out``
    (default: ``<src>-keep<k>``); reused if already written (``force`` writes it again)."""
    if keep_every < 1:
        raise UserError(f"--keep-every must be >= 1, got {keep_every}")
    src = Path(src)
    out = Path(out) if out is not None else src.with_name(f"{src.name}-keep{keep_every}")
    if (out / INFO).is_file() and not force:
        return out
    model = load_model(str(src), dtype=torch.float32)
    n = model.config.num_hidden_layers
    student = copy_with_layers_dropped(model, keep_every).eval()
    with atomic_dir(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(str(src)).save_pretrained(tmp)
        atomic_write_json(tmp / INFO, {"source": str(src), "keep_every": keep_every,
                                       "layers": [i for i in range(0, n, keep_every)]})
    return out


def layer_info(folder: str | Path) -> dict:
    return json.loads((Path(folder) / INFO).read_text())


# ---------------------------------------------------------------------------------------------------------------
# The real distillation recipe (examples/distill-smollm2-real.yaml): general chat prompts, and before/after
# ---------------------------------------------------------------------------------------------------------------

# Prompts are templates x topics; held-out topics never occur in training, so the held-out numbers measure how the
# student answers about things it was not distilled on.
INSTRUCT_TEMPLATES = [
    "Explain {t} in two sentences.",
    "Give three facts about {t}.",
    "What is {t}?",
    "Write a short poem about {t}.",
    "Why is {t} important?",
    "Describe {t} to a child.",
    "List two advantages of {t}.",
    "Write one sentence about {t}.",
]
INSTRUCT_TOPICS = [
    "the sun", "rain", "bicycles", "photosynthesis", "the ocean", "volcanoes", "coffee", "chess", "music",
    "gardening", "the moon", "friendship", "electricity", "bread", "trees", "the internet", "mountains", "sleep",
    "exercise", "libraries", "honey bees", "clouds", "recycling", "maps", "trains", "the heart", "snow", "soap",
    "birds", "money", "languages", "computers", "rivers", "cooking", "the weather", "books", "paint", "deserts",
    "vaccines", "bridges", "cats", "dogs", "fire", "glass", "tea", "clocks", "football", "the alphabet",
    # held out (the last 12)
    "forests", "airplanes", "salt", "rainbows", "teachers", "batteries", "whales", "kites", "cheese", "stars",
    "umbrellas", "gravity",
]
HELDOUT_TOPICS = 12


def instruct_prompts(split: str) -> list[str]:
    """The chat prompts of ``split`` ("train": 48 topics x 8 templates; "heldout": the other 12 topics), ordered
    topic-major with the templates interleaved, so any prefix covers every template."""
    if split not in ("train", "heldout"):
        raise UserError(f"split must be 'train' or 'heldout', not {split!r}")
    topics = INSTRUCT_TOPICS[:-HELDOUT_TOPICS] if split == "train" else INSTRUCT_TOPICS[-HELDOUT_TOPICS:]
    # template j with topic i at row (i + j) mod n: every prefix of len(topics) rows holds each template
    return [INSTRUCT_TEMPLATES[j].format(t=topics[(i + j) % len(topics)])
            for i in range(len(topics)) for j in range(len(INSTRUCT_TEMPLATES))]


def _chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def write_instruct_data(teacher: str | Path, out: str | Path, *, n_heldout: int = 32, max_new_tokens: int = 96,
                        dtype: str = "bfloat16") -> dict[str, Path]:
    """Write ``instruct-train.jsonl`` (the training prompts; the assistant turn is left empty: ``seq_kd: true``
    has the teacher answer them during the run, cached) and ``instruct-heldout.jsonl`` (``n_heldout`` held-out
    prompts with the teacher's greedy answers: the reference text of the held-out KL). Reused if present."""
    from distillarena.evaluate.answers import greedy_answers
    from distillarena.tasks.chat_data import chat_row, write_jsonl

    out = Path(out).expanduser()
    paths = {"train": out / "instruct-train.jsonl", "heldout": out / "instruct-heldout.jsonl"}
    if not paths["train"].is_file():
        write_jsonl(paths["train"], [chat_row(p, "") for p in instruct_prompts("train")])
    if not paths["heldout"].is_file():
        tok = load_tokenizer(str(teacher))
        model = load_model(str(teacher), dtype=getattr(torch, dtype))
        prompts = instruct_prompts("heldout")[:n_heldout]
        answers = greedy_answers(model, [_chat_ids(tok, p) for p in prompts], max_new_tokens=max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
        write_jsonl(paths["heldout"], [chat_row(p, a) for p, a in zip(prompts, texts, strict=True)])
    return paths


def compare_students(teacher: str | Path, students: dict[str, str | Path], heldout: str | Path, *,
                     n: int = 32, show: int = 5, max_new_tokens: int = 96, teacher_dtype: str = "bfloat16",
                     ) -> dict[str, Any]:
    """Before/after (or any) students against the teacher on the held-out chat prompts of ``heldout`` (rows with
    ``messages``): per prompt, the exact forward/reverse KL on the reference answer (teacher-forced), the
    student's greedy answer and the teacher's NLL of it (nats/token); the means with 95% bootstrap intervals, the
    paired difference of every student against the first, and ``show`` answers side by side with the teacher's."""
    from distillarena.evaluate.answers import answer_nll, greedy_answers, sequence_divergences
    from distillarena.report.stats import bootstrap_mean, paired_difference
    from distillarena.tasks.data import encode_example, load_examples

    tok = load_tokenizer(str(teacher))
    t_model = load_model(str(teacher), dtype=getattr(torch, teacher_dtype))
    exs = load_examples(str(Path(heldout).expanduser()), limit=n)
    prompts = [_chat_ids(tok, e.messages[0]["content"]) for e in exs]
    encoded = [encode_example(tok, e) for e in exs]
    gen = dict(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t_answers = greedy_answers(t_model, prompts[:show], **gen)
    per: dict[str, dict[str, list]] = {}
    for name, folder in students.items():
        model = load_model(str(folder), dtype=torch.float32)
        div = sequence_divergences(model, t_model, encoded)
        answers = greedy_answers(model, prompts, **gen)
        nll = answer_nll(t_model, prompts, answers)
        per[name] = {"fkl": div["fkl"], "rkl": div["rkl"], "teacher_nll": nll,
                     "answer_tokens": [len(a) for a in answers],
                     "answers": [tok.decode(a, skip_special_tokens=True).strip() for a in answers]}
        del model
    summary: dict[str, Any] = {}
    first = next(iter(per))
    for name, r in per.items():
        row: dict[str, Any] = {}
        for metric in ("fkl", "rkl", "teacher_nll"):
            xs = [x for x in r[metric] if x is not None]
            row[metric] = bootstrap_mean(xs).as_dict() if xs else None
            if name != first:
                pairs = [(a, b) for a, b in zip(r[metric], per[first][metric], strict=True)
                         if a is not None and b is not None]
                row[f"{metric}_minus_{first}"] = (paired_difference([a for a, _ in pairs], [b for _, b in pairs])
                                                  .as_dict() if pairs else None)
        row["answer_tokens_mean"] = sum(r["answer_tokens"]) / max(len(r["answer_tokens"]), 1)
        summary[name] = row
    # the floor: the teacher's NLL of the reference answers (the teacher's own greedy answers, when written by
    # `data`), re-tokenized with the end-of-turn token, as the students' answers are scored
    starts = [next((i for i, lab in enumerate(labels) if lab != -100), len(ids)) for ids, labels in encoded]
    ref_nll = [x for x in answer_nll(t_model, [ids[:n] for (ids, _), n in zip(encoded, starts, strict=True)],
                                     [ids[n:] for (ids, _), n in zip(encoded, starts, strict=True)]) if x is not None]
    summary["reference_answers"] = {"teacher_nll": bootstrap_mean(ref_nll).as_dict() if ref_nll else None}
    side = [{"prompt": e.messages[0]["content"], "teacher": tok.decode(a, skip_special_tokens=True).strip(),
             **{name: per[name]["answers"][i] for name in per}}
            for i, (e, a) in enumerate(zip(exs[:show], t_answers, strict=True))]
    return {"n": len(exs), "teacher": str(teacher), "students": {k: str(v) for k, v in students.items()},
            "summary": summary, "per_prompt": per, "side_by_side": side}


def kl_curve(run: str | Path) -> list[dict[str, Any]]:
    """Held-out forward/reverse KL against target tokens seen, from a distill run's ``metrics.jsonl`` (every eval
    record, with the token count of the last training record at or before its step)."""
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens_at: dict[int, int] = {0: 0}
    for r in rows:
        if r.get("phase") == "train":
            tokens_at[int(r["step"])] = int(r["tokens"])
    curve = []
    for r in rows:
        if r.get("phase") == "eval" and "heldout_fkl" in r:
            step = int(r["step"])
            seen = max((s for s in tokens_at if s <= step), default=0)
            curve.append({"step": step, "tokens": tokens_at[seen], "heldout_fkl": r["heldout_fkl"],
                          "heldout_rkl": r.get("heldout_rkl")})
    return curve


def main(argv: list[str] | None = None) -> int:
    """``python -m distillarena.recipes.real data|compare ...``: the steps of examples/distill-smollm2-real.yaml
    around ``distillarena distill``."""
    import argparse

    from distillarena.models.real import smollm2_dir

    ap = argparse.ArgumentParser(prog="python -m distillarena.recipes.real", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the instruct prompts (train) and the teacher's held-out answers")
    d.add_argument("--teacher", default=str(smollm2_dir("bfloat16")))
    d.add_argument("--out", default=None, help="default: <cache>/data/chat")
    d.add_argument("--n-heldout", type=int, default=32)
    c = sub.add_parser("compare", help="before/after: held-out KL, teacher NLL of greedy answers, answers")
    c.add_argument("run", help="a distill run folder (its student/ is 'after')")
    c.add_argument("--teacher", default=str(smollm2_dir("bfloat16")))
    c.add_argument("--keep-every", type=int, default=4, help="the 'before' student: the teacher's layer-dropped copy")
    c.add_argument("--heldout", default=None, help="default: <cache>/data/chat/instruct-heldout.jsonl")
    c.add_argument("-n", type=int, default=32)
    c.add_argument("--out", default=None, help="JSON output (default: <run>/compare.json)")
    args = ap.parse_args(argv)
    from distillarena.core.io import cache_dir

    chat = cache_dir() / "data" / "chat"
    if args.cmd == "data":
        for name, path in write_instruct_data(args.teacher, args.out or chat, n_heldout=args.n_heldout).items():
            print(f"{name}: {path}")
        return 0
    before = save_layer_dropped(args.teacher, args.keep_every)
    res = compare_students(args.teacher, {"before": before, "after": Path(args.run) / "student"},
                           args.heldout or chat / "instruct-heldout.jsonl", n=args.n)
    res["kl_curve"] = kl_curve(args.run)
    out = Path(args.out) if args.out else Path(args.run) / "compare.json"
    atomic_write_json(out, res)
    for name, row in res["summary"].items():
        print(name, {k: (v["mean"] if isinstance(v, dict) else v) for k, v in row.items()})
    for r in res["kl_curve"]:
        print(f"step {r['step']:>5}  tokens {r['tokens']:>8}  held-out fkl {r['heldout_fkl']:.3f}")
    for row in res["side_by_side"]:
        print(f"\n-- {row['prompt']}")
        for k in ("teacher", "before", "after"):
            print(f"   {k:>7}: {row[k]!r}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
