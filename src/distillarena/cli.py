"""The ``distillarena`` command. User errors end with one message and exit status 2, never a traceback.

Offline by default: the command sets HF_HUB_OFFLINE=1 unless the environment sets it, so a hub id loads from the
local Hugging Face cache only and a run never waits on the network; HF_HUB_OFFLINE=0 allows downloads (and
push_to_hub). The Python API (``import distillarena``) leaves HF_HUB_OFFLINE to you."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distillarena.core.errors import UserError

DEFAULT_RUNS = Path(os.environ.get("DISTILLARENA_RUNS", "runs"))


def _cmd_demo(args: argparse.Namespace) -> None:
    from distillarena.core.config import load_config
    from distillarena.recipes.config import DemoConfig
    from distillarena.recipes.demo import new_run_dir, run_demo

    cfg = load_config(args.config, DemoConfig)
    out = new_run_dir(DEFAULT_RUNS, "demo", args.out, args.overwrite)
    run_demo(cfg, out)


def _cmd_teach(args: argparse.Namespace) -> None:
    from distillarena.core.config import load_config
    from distillarena.train.config import TeacherConfig
    from distillarena.train.teacher import export_teacher, teach

    cfg = load_config(args.config, TeacherConfig)
    result = teach(cfg, force=args.force)
    if args.out:
        path = export_teacher(result, args.out, overwrite=args.overwrite)
        print(f"teacher written to {path}")
    else:
        print(result.path)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from rich.console import Console

    from distillarena.evaluate.task_eval import evaluate_problems
    from distillarena.models.presets import load_model, load_tokenizer
    from distillarena.tasks.arithmetic import ArithmeticTask

    model, tok = load_model(args.model), load_tokenizer(args.model)
    console = Console()
    for k in args.ops:
        ev = evaluate_problems(model, tok, ArithmeticTask().problems(args.split, args.n, k, seed=args.seed))
        console.print(f"{k} operation(s): accuracy {ev.accuracy:.1%}, step validity {ev.step_validity:.1%} "
                      f"(n={ev.n}, {args.split} split)")


def _cmd_traces(args: argparse.Namespace) -> None:
    from distillarena.core.config import load_config
    from distillarena.game.config import TracesConfig
    from distillarena.game.traces import run_traces

    run_traces(load_config(args.config, TracesConfig), args.out)


def _cmd_distill(args: argparse.Namespace) -> None:
    from distillarena.core.config import load_config
    from distillarena.recipes.distill import new_run_dir, run_distill
    from distillarena.train.config import DistillConfig

    cfg = load_config(args.config, DistillConfig)
    try:
        run_distill(cfg, new_run_dir(DEFAULT_RUNS, args.out), resume=args.resume, overwrite=args.overwrite)
    finally:
        _end_distributed()


def _cmd_cache_teacher(args: argparse.Namespace) -> None:
    from distillarena.core.config import load_config
    from distillarena.recipes.distill import run_cache_teacher
    from distillarena.train.config import DistillConfig

    cfg = load_config(args.config, DistillConfig)
    run_cache_teacher(cfg, args.out, k=args.k, bits=args.bits, overwrite=args.overwrite)


def _cmd_game(args: argparse.Namespace) -> None:
    from distillarena.core.config import load_config
    from distillarena.game.config import GameConfig
    from distillarena.game.sweep import rebuild, run_game

    if args.report_only:
        from rich.console import Console

        if args.out is None or not (args.out / "game.json").is_file():
            raise UserError(f"--report-only needs --out, a game run folder (no game.json in {args.out})")
        cfg = load_config(args.config or args.out / "config.yaml", GameConfig)  # default: the run's own config
        rebuild(args.out, cfg, console=Console())
        return
    cfg = load_config(args.config, GameConfig)
    if args.out is None:
        from datetime import datetime

        args.out = DEFAULT_RUNS / f"game-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_game(cfg, args.out)


def _cmd_explain(args: argparse.Namespace) -> None:
    from distillarena.core.config import load_config
    from distillarena.recipes.explain import ExplainConfig, find_game, new_explain_dir, run_explain

    cfg = load_config(args.config, ExplainConfig)
    if args.source is not None:
        find_game(args.source)  # a bad --from fails before any folder is made
    run_explain(cfg, new_explain_dir(DEFAULT_RUNS, args.out, args.source), args.source)


def _cmd_convert_smollm2(args: argparse.Namespace) -> None:
    from distillarena.models.real import convert_smollm2
    from distillarena.recipes.real import save_layer_dropped

    path = convert_smollm2(args.dtype, args.out, force=args.force)
    print(path)
    if args.keep_every:
        print(save_layer_dropped(path, args.keep_every, force=args.force))


def _cmd_chat_data(args: argparse.Namespace) -> None:
    from distillarena.core.io import cache_dir
    from distillarena.tasks.chat_data import write_chat_data

    out = args.out or cache_dir() / "data" / "chat"
    for name, path in write_chat_data(out, train=args.train, heldout=args.heldout, n_ops=args.ops, seed=args.seed,
                                      champ=not args.no_champ).items():
        print(f"{name}: {path}")


def _cmd_detect(args: argparse.Namespace) -> None:
    import json

    from distillarena.defenses.watermark import WatermarkScheme
    from distillarena.forensics import detect_api, detect_open, detect_text

    key = args.key if args.key is not None else os.environ.get(args.key_env or "")
    if not key:
        raise UserError("give the watermark's secret with --key KEY or --key-env VAR (a set environment variable)")
    try:
        scheme = WatermarkScheme(key, args.gamma, args.context)
    except ValueError as e:
        raise UserError(str(e)) from None
    suspect = args.suspect
    api = suspect is not None and suspect.startswith(("http://", "https://"))
    texts = _detect_texts(args, prompts_only=api)
    if suspect is None:
        if args.texts is None:
            raise UserError("give --suspect (a model folder or an API URL) or --texts (a JSON lines file to test)")
        det = detect_text(scheme, _watermark_tokenizer(args), texts, model=_gate_model(args),
                          min_entropy=args.min_entropy)
    elif api:
        from distillarena.teachers.api_client import APITeacher

        if not args.model:
            raise UserError("--suspect is an API URL: name the served model with --model")
        token = os.environ.get(args.api_key_env, "")
        client = APITeacher(base_url=suspect, api_key=token or "none", model=args.model, chat=False,
                            max_tokens=args.max_tokens, temperature=args.temperature, top_logprobs=None,
                            seed=0)
        det = detect_api(scheme, client, _watermark_tokenizer(args), [p for p, _ in texts], out=args.out,
                         model=_gate_model(args), min_entropy=args.min_entropy)
    else:
        from distillarena.models.presets import load_model, load_tokenizer

        if not Path(suspect).is_dir():
            raise UserError(f"--suspect {suspect}: not a model folder (a save_pretrained folder) or an http(s) URL")
        model = load_model(suspect)
        tok = load_tokenizer(args.tokenizer or suspect)
        gate = load_model(args.teacher) if args.teacher else None
        det = detect_open(scheme, model, tok, texts, min_entropy=args.min_entropy, gate=gate)
    if args.json:
        print(json.dumps(det.as_dict(examples=True), indent=1))
        return
    print("\n".join(det.lines()))


def _gate_model(args: argparse.Namespace):
    """The provider's own teacher, whose entropy gates the scored positions of a text (--teacher)."""
    if args.min_entropy > 0 and args.teacher is None:
        raise UserError("--min-entropy on texts or an API's completions needs --teacher (the unwatermarked teacher "
                        "whose entropy decides which positions can carry the watermark)")
    if args.teacher is None:
        return None
    from distillarena.models.presets import load_model

    return load_model(args.teacher)


def _watermark_tokenizer(args: argparse.Namespace):
    if args.tokenizer:
        from distillarena.models.presets import load_tokenizer

        return load_tokenizer(args.tokenizer)
    from distillarena.models.tokenizer import task_tokenizer

    return task_tokenizer()


def _detect_texts(args: argparse.Namespace, prompts_only: bool) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from --texts (JSON lines with prompt and completion, e.g. a traces file), else
    reference solutions of the built-in task's test problems."""
    if args.texts is not None:
        from distillarena.core.io import read_jsonl

        if not args.texts.is_file():
            raise UserError(f"--texts {args.texts}: no such file")
        out = []
        for i, r in enumerate(read_jsonl(args.texts), 1):
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or (
                    not prompts_only and not isinstance(r.get("completion"), str)):
                raise UserError(f"{args.texts} line {i}: needs a text 'prompt'" + ("" if prompts_only else
                                                                                  " and a text 'completion'"))
            out.append((r["prompt"], r.get("completion") or ""))
        return out[: args.n] if args.n else out
    from distillarena.tasks.arithmetic import ArithmeticTask
    from distillarena.tasks.data import problem_example

    problems = ArithmeticTask().problems("test", args.n or 512, args.ops, seed=3)
    return [(ex.prompt, ex.completion) for ex in (problem_example(p) for p in problems)]


def _end_distributed() -> None:
    """Under torchrun, leave the process group cleanly: gloo's teardown can abort an otherwise finished process
    (see docs/scale-out.md), so every rank meets at a barrier, destroys the group and exits directly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        code = 1 if sys.exc_info()[0] is not None else 0
        if code == 0:
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillarena", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole story on the built-in world; writes a run folder with report.html")
    d.add_argument("config", nargs="?", type=Path, help="YAML config (defaults work without one)")
    d.add_argument("--out", type=Path, help="run folder (default: runs/demo-<time>)")
    d.add_argument("--overwrite", action="store_true", help="write into an existing non-empty run folder")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("teach", help="train a teacher preset on the built-in task (cached by config hash)")
    t.add_argument("config", nargs="?", type=Path, help="YAML config of a TeacherConfig")
    t.add_argument("--out", type=Path, help="also copy the teacher folder here")
    t.add_argument("--force", action="store_true", help="retrain even if a cached teacher exists")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.set_defaults(func=_cmd_teach)

    tr = sub.add_parser("traces", help="sample a (defended) teacher on task prompts into a resumable JSON lines file")
    tr.add_argument("config", nargs="?", type=Path, help="YAML config of a TracesConfig")
    tr.add_argument("--out", type=Path, default=Path("traces.jsonl"), help="JSON lines file (appended; resumable)")
    tr.set_defaults(func=_cmd_traces)

    ds = sub.add_parser("distill", help="distill a teacher into a student; writes a run folder (resumable)")
    ds.add_argument("config", nargs="?", type=Path, help="YAML config of a DistillConfig (examples/distill*.yaml)")
    ds.add_argument("--out", type=Path, help="run folder (default: runs/distill-<time>)")
    ds.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    ds.add_argument("--overwrite", action="store_true", help="start the run in an existing --out folder again")
    ds.set_defaults(func=_cmd_distill)

    ct = sub.add_parser("cache-teacher", help="run the teacher once over the data and store its top-k log-probs")
    ct.add_argument("config", nargs="?", type=Path, help="YAML config of a DistillConfig (its teacher and data)")
    ct.add_argument("--out", type=Path, required=True, help="cache folder to write")
    ct.add_argument("--k", type=int, default=128, help="log-probs kept per position (default 128)")
    ct.add_argument("--bits", type=int, default=8, choices=[8, 16], help="log-prob quantization (default 8)")
    ct.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ct.set_defaults(func=_cmd_cache_teacher)

    g = sub.add_parser("game", help="defenses x strengths x attackers x seeds; cached cells, resumable, report.html")
    g.add_argument("config", nargs="?", type=Path, help="YAML config of a GameConfig (examples/game*.yaml)")
    g.add_argument("--out", type=Path, help="run folder (default: runs/game-<time>); rerun into it to resume")
    g.add_argument("--report-only", action="store_true",
                   help="rebuild results and report.html from --out (with its own config.yaml by default)")
    g.set_defaults(func=_cmd_game)

    ex = sub.add_parser("explain", help="an animated explainer of the objectives and defenses: explainer.html "
                        "(self-contained) and the same animations as GIF files")
    ex.add_argument("config", nargs="?", type=Path, help="YAML config of an ExplainConfig (defaults work without one)")
    ex.add_argument("--from", dest="source", type=Path, metavar="RUN_DIR",
                    help="a demo or game run folder: its teacher, proxy and frontier (default --out: that folder)")
    ex.add_argument("--out", type=Path, help="folder for explainer.html and explainer/*.gif "
                    "(default: the --from folder, else runs/explain-<time>)")
    ex.set_defaults(func=_cmd_explain)

    cv = sub.add_parser("convert-smollm2", help="convert the SmolLM2-135M-Instruct GGUF of the `real` extra into a "
                        "save_pretrained folder (once; prints its path)")
    cv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cv.add_argument("--out", type=Path, help="folder (default: <cache>/models/SmolLM2-135M-Instruct-<dtype>)")
    cv.add_argument("--keep-every", type=int, metavar="K",
                    help="also write a copy keeping layers 0, K, 2K, ... (a student or PoE proxy): <folder>-keepK")
    cv.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    cv.set_defaults(func=_cmd_convert_smollm2)

    cd = sub.add_parser("chat-data", help="write the built-in problems (and champ-dataset's) as chat JSON lines")
    cd.add_argument("--out", type=Path, help="folder (default: <cache>/data/chat)")
    cd.add_argument("--train", type=int, default=512, help="training problems (default 512)")
    cd.add_argument("--heldout", type=int, default=64, help="held-out problems (default 64)")
    cd.add_argument("--ops", type=int, nargs="+", default=[1, 2, 3], help="operations per problem")
    cd.add_argument("--seed", type=int, default=0)
    cd.add_argument("--no-champ", action="store_true", help="skip the champ-dataset probe")
    cd.set_defaults(func=_cmd_chat_data)

    dt = sub.add_parser("detect", help="was a suspect model trained on watermarked text? the radioactivity test "
                        "(p-value and evidence); without --suspect, test the texts of --texts themselves")
    dt.add_argument("--suspect", metavar="MODEL_OR_URL", help="a model folder (open weights: its next-token "
                    "predictions are scored) or an OpenAI-compatible base URL (its completions are scored)")
    dt.add_argument("--key", help="the watermark's secret key")
    dt.add_argument("--key-env", metavar="VAR", help="read the key from this environment variable instead")
    dt.add_argument("--gamma", type=float, default=0.5, help="green fraction of the watermark (default 0.5)")
    dt.add_argument("--context", type=int, default=4, help="tokens hashed into the green list (default 4)")
    dt.add_argument("--texts", type=Path, metavar="FILE", help="JSON lines with prompt and completion (e.g. a traces "
                    "file): what the suspect reads, the prompts it completes, or the texts tested (default: "
                    "reference solutions of the built-in task's test problems)")
    dt.add_argument("--n", type=int, help="texts used (default: all of --texts, or 512 built-in problems)")
    dt.add_argument("--ops", type=int, nargs="+", default=[2], help="operations of the built-in problems (default 2)")
    dt.add_argument("--tokenizer", help="the watermark's tokenizer (default: the suspect's folder; for an API or "
                    "texts, the built-in one)")
    dt.add_argument("--min-entropy", type=float, default=0.0, help="score only positions where the next-token "
                    "entropy is at least this (nats): --teacher's, or the suspect's with open weights and no "
                    "--teacher (0.3 with --teacher suits the built-in world: docs/decisions.md)")
    dt.add_argument("--teacher", metavar="MODEL", help="the unwatermarked teacher (a model folder) whose entropy "
                    "gates the scored positions (with --min-entropy): where the watermark could act at all")
    dt.add_argument("--model", help="API: the served model's id")
    dt.add_argument("--api-key-env", default="OPENAI_API_KEY", help="API: environment variable holding the bearer "
                    "token (default OPENAI_API_KEY)")
    dt.add_argument("--max-tokens", type=int, default=64, help="API: tokens per completion (default 64)")
    dt.add_argument("--temperature", type=float, default=0.0, help="API: sampling temperature (default 0: greedy)")
    dt.add_argument("--out", type=Path, help="API: keep the suspect's completions here (JSON lines; resumable)")
    dt.add_argument("--json", action="store_true", help="print the result as JSON")
    dt.set_defaults(func=_cmd_detect)

    e = sub.add_parser("evaluate", help="accuracy of a model folder on the built-in task")
    e.add_argument("model", help="save_pretrained folder or cached hub id")
    e.add_argument("--split", default="test", choices=["train", "holdout", "test"])
    e.add_argument("--ops", type=int, nargs="+", default=[1, 2, 3, 4])
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_cmd_evaluate)
    from distillarena.serve.cli import add_serve_commands

    add_serve_commands(sub)
    add_override_option(p)  # last: every command above (and any added later) that reads a config gets --set
    return p


def _override(text: str):
    from distillarena.core.config import parse_override

    try:
        return parse_override(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_override_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY.PATH=VALUE`` (repeatable) on every command, at any depth, that takes a config (an argument named
    ``config``): set into the config before it is validated, so a wrong path or value is the same error as in YAML."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                add_override_option(sub)
    if any(a.dest == "config" for a in parser._actions) and \
            not any(a.dest == "overrides" for a in parser._actions):
        parser.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                            metavar="KEY.PATH=VALUE", help="override a config field, e.g. --set train.steps=50 "
                            "--set student.dtype=bfloat16 (repeatable; validated like the YAML)")


def main(argv: list[str] | None = None) -> int:
    # before anything imports huggingface_hub (which reads it once): see the module doc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on every load drown ours
    except ImportError:
        pass
    try:
        from distillarena.core.config import config_overrides

        with config_overrides(getattr(args, "overrides", None) or []):
            args.func(args)
    except UserError as e:
        print(f"distillarena: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distillarena: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
