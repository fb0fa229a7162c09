"""``distillarena serve``, ``keys`` (create | list | revoke) and ``ledger``: wired into the main CLI with
:func:`add_serve_commands`. User errors are raised as :class:`~distillarena.core.errors.UserError`.

``ledger`` prints per-key totals and, on lines of their own, the requests refused without a valid key (counted per
minute and error code, not one ledger row each).

The store (keys and ledger, one SQLite file) is found in this order: ``--store``, the serve config's ``store:``
(``--config``), the default ``<cache>/serve/store.sqlite``; ``keys`` and ``ledger`` act on the same file the server
uses, also while it runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from distillarena.core.config import format_validation_error
from distillarena.core.errors import UserError
from distillarena.defenses.spec import DEFENSE_KINDS, DEFENSES
from distillarena.serve.config import PolicyConfig, ServeConfig, load_serve_config


def add_serve_commands(subparsers) -> None:
    """Register ``serve``, ``keys`` and ``ledger`` on an argparse subparsers object (each sets ``func``)."""
    s = subparsers.add_parser("serve", help="serve a teacher behind an OpenAI-compatible API with keys and a ledger")
    s.add_argument("config", nargs="?", type=Path, help="YAML ServeConfig (defaults work without one)")
    s.add_argument("--model", help="model folder (or cached hub id) to serve; default: the config's, else the "
                                   "default teacher")
    s.add_argument("--model-name", help="the model id clients pass (default: the folder name)")
    s.add_argument("--proxy", help="proxy student folder, for poe / antidistillation keys")
    s.add_argument("--proxy-gradient", help="proxy gradient file, for antidistillation keys")
    s.add_argument("--store", help="SQLite file of keys and ledger")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-batch-size", type=int, help="rows sampled together at most")
    s.add_argument("--max-wait-ms", type=float, help="how long a request waits for others to batch with")
    s.set_defaults(func=_cmd_serve)

    k = subparsers.add_parser("keys", help="create, list or revoke API keys of the server's store")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="create a key and print its token (shown only once)")
    _store_args(c)
    c.add_argument("--name", default="", help="a label for the key (e.g. who holds it)")
    c.add_argument("--requests", type=_limit, default=_UNSET, help="request budget ('none': unlimited)")
    c.add_argument("--tokens", type=_limit, default=_UNSET, help="token budget ('none': unlimited): completion "
                   "tokens (and prompt tokens a request scores), or with --count-prompt-tokens prompt + completion")
    c.add_argument("--count-prompt-tokens", action="store_true", default=None,
                   help="the token budget counts prompt tokens too (as providers bill)")
    c.add_argument("--rate", type=_rate, default=_UNSET, help="rate limit in requests per minute ('none': "
                   "unlimited)")
    c.add_argument("--burst", type=float, help="token-bucket size of the rate limit (default: one minute's worth)")
    c.add_argument("--defense", choices=DEFENSE_KINDS, help="defense applied to this key's generations (the kinds of "
                   "a game config's defenses)")
    c.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the defense, as in a game config (repeatable): " + "; ".join(
                       f"{d}: {', '.join(spec.parameter_names())}" for d, spec in DEFENSES.items()))
    c.add_argument("--strength", type=float, help="shorthand for the defense's main parameter: " + "; ".join(
        f"{d}: {spec.main}, {spec.main_help}" for d, spec in DEFENSES.items() if spec.main))
    c.add_argument("--no-logprobs", action="store_true", help="reveal text only (log-prob requests get a 400)")
    c.add_argument("--top-logprobs", type=int, help="cap on revealed alternatives per token (0-20)")
    c.add_argument("--decimals", type=int, help="round revealed log-probs to this many decimals")
    c.add_argument("--noise", type=float, help="std of Gaussian noise added to revealed log-probs")
    c.add_argument("--json", action="store_true", help="print the key as JSON")
    c.set_defaults(func=_cmd_keys_create)
    ls = ksub.add_parser("list", help="list keys with their policy, budgets and usage")
    _store_args(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_keys_list)
    r = ksub.add_parser("revoke", help="revoke a key (by id, or by the token itself)")
    _store_args(r)
    r.add_argument("key", help="key id (12 hex characters) or the token")
    r.set_defaults(func=_cmd_keys_revoke)

    led = subparsers.add_parser("ledger", help="per-key totals of the request ledger; CSV export; usage plot")
    _store_args(led)
    led.add_argument("--csv", help="write every ledger row as CSV to this file ('-': standard output)")
    led.add_argument("--key", help="only this key id (CSV and plot)")
    led.add_argument("--plot", type=Path, help="write a PNG of usage per key (an attacker's footprint)")
    led.add_argument("--json", action="store_true", help="print the per-key totals as JSON")
    led.set_defaults(func=_cmd_ledger)


_UNSET = object()  # a flag not given (its value then comes from the config's key_defaults)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="serve config whose store (and key defaults) to use")
    p.add_argument("--store", help="SQLite file of keys and ledger (overrides the config)")


def _limit(text: str) -> int | None:
    if text.lower() in ("none", "unlimited"):
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'none', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'none', got {text!r}")
    return v


def _rate(text: str) -> float | None:
    if text.lower() in ("none", "unlimited"):
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per minute > 0 or 'none', got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected requests per minute > 0 or 'none', got {text!r}")
    return v


def _config(args: argparse.Namespace) -> ServeConfig:
    cfg = load_serve_config(getattr(args, "config", None))
    if getattr(args, "store", None):
        cfg.store = args.store
    return cfg


def _open_store(cfg: ServeConfig, *, create: bool = False):
    from distillarena.serve.store import Store

    path = cfg.store_path()
    if not create and not path.exists():
        raise UserError(f"no store at {path} (create a key first, or give --store / --config)")
    return Store(path, synchronous=cfg.synchronous)


# -- commands ----------------------------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> None:
    from distillarena.serve.server import serve

    cfg = _config(args)
    updates = {"model": args.model, "model_name": args.model_name, "proxy": args.proxy,
               "proxy_gradient": args.proxy_gradient, "host": args.host, "port": args.port}
    try:
        for name, value in updates.items():
            if value is not None:
                setattr(cfg, name, value)
        if args.max_batch_size is not None:
            cfg.batching.max_batch_size = args.max_batch_size
        if args.max_wait_ms is not None:
            cfg.batching.max_wait_ms = args.max_wait_ms
    except ValidationError as e:
        raise UserError(f"invalid option:\n{format_validation_error(e)}") from None
    serve(cfg)


def _policy(cfg: ServeConfig, args: argparse.Namespace) -> PolicyConfig:
    data = cfg.default_policy.model_dump()
    if args.defense is not None:
        data["defense"] = args.defense
        data["params"] = {}
    for item in args.param:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UserError(f"--param takes NAME=VALUE, got {item!r}")
        data["params"] = {**data["params"], name.strip(): _param_value(value.strip())}
    for flag, name in (("strength", "strength"), ("top_logprobs", "max_top_logprobs"), ("decimals", "decimals"),
                       ("noise", "noise_std")):
        if getattr(args, flag) is not None:
            data[name] = getattr(args, flag)
    if args.no_logprobs:
        data["logprobs"] = False
    try:
        return PolicyConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"invalid key policy:\n{format_validation_error(e)}") from None


def _param_value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _cmd_keys_create(args: argparse.Namespace) -> None:
    cfg = _config(args)
    policy = _policy(cfg, args)
    d = cfg.key_defaults
    with _open_store(cfg, create=True) as store:
        token, rec = store.create_key(
            args.name, policy=policy,
            max_requests=d.max_requests if args.requests is _UNSET else args.requests,
            max_completion_tokens=d.max_completion_tokens if args.tokens is _UNSET else args.tokens,
            rate_per_minute=d.rate_per_minute if args.rate is _UNSET else args.rate,
            burst=args.burst if args.burst is not None else d.burst,
            count_prompt=d.count_prompt_tokens if args.count_prompt_tokens is None else args.count_prompt_tokens,
        )
    if args.json:
        print(json.dumps({"token": token, **rec.as_dict()}, indent=2))
    else:
        print(token)
        print(f"key {rec.id} ({rec.name or 'no name'}), policy {_policy_text(rec.policy)}, "
              f"{_limits_text(rec)}; store {cfg.store_path()}. The token is shown only this once.", file=sys.stderr)


def _policy_text(p: PolicyConfig) -> str:
    if p.rewrites_text:
        reveal = "the rewritten text only"
    elif not p.logprobs:
        reveal = "text only"
    else:
        reveal = f"log-probs, top {p.max_top_logprobs}"
        if p.decimals is not None:
            reveal += f", {p.decimals} decimals"
        if p.noise_std:
            reveal += f", noise {p.noise_std:g}"
    return f"{p.label()} ({reveal})"


def _limits_text(k) -> str:
    def budget(used, cap):
        return f"{used}/{'unlimited' if cap is None else cap}"

    rate = "no rate limit" if k.rate_per_minute is None else f"{k.rate_per_minute:g}/min"
    tokens = "tokens (prompt + completion)" if k.count_prompt else "completion tokens"
    return (f"requests {budget(k.requests_used, k.max_requests)}, {tokens} "
            f"{budget(k.tokens_used, k.max_completion_tokens)}, {rate}")


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _cmd_keys_list(args: argparse.Namespace) -> None:
    with _open_store(_config(args)) as store:
        keys = store.list_keys()
    if args.json:
        print(json.dumps([k.as_dict() for k in keys], indent=2))
        return
    if not keys:
        print("no keys")
        return
    for k in keys:
        state = f"revoked {_when(k.revoked_at)}" if k.revoked else "active"
        print(f"{k.id}  {k.name or '-':<16} {state:<28} created {_when(k.created_at)}  "
              f"{_policy_text(k.policy)}; {_limits_text(k)}")


def _cmd_keys_revoke(args: argparse.Namespace) -> None:
    from distillarena.serve.store import parse_token

    key_id = args.key
    parsed = parse_token(key_id)
    if parsed is not None:
        key_id = parsed[0]
    with _open_store(_config(args)) as store:
        rec = store.revoke_key(key_id)
    print(f"key {rec.id} ({rec.name or 'no name'}) revoked at {_when(rec.revoked_at)}")


def _cmd_ledger(args: argparse.Namespace) -> None:
    with _open_store(_config(args)) as store:
        if args.csv:
            if args.csv == "-":
                store.export_csv(sys.stdout, args.key)
            else:
                with open(args.csv, "w", newline="") as f:
                    n = store.export_csv(f, args.key)
                print(f"{n} ledger rows written to {args.csv}", file=sys.stderr)
        totals = store.totals()
        rejected = store.rejections()
        if args.plot:
            from distillarena.serve.usage import save_usage_plot

            names = {k.id: k.name for k in store.list_keys()}
            path = save_usage_plot(store.ledger_rows(args.key), args.plot, names)
            print(f"usage plot written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(totals, indent=2))
    elif not args.csv or args.csv != "-":
        if not totals and not rejected:
            print("the ledger is empty")
        for t in totals:
            latency = "-" if t["mean_latency_ms"] is None else f"{t['mean_latency_ms']:.0f} ms"
            print(f"{t['key_id'] or '(no key)':<12} {t['name'] or '-':<16} requests {t['requests']} "
                  f"(ok {t['ok']}, 400 {t['bad_request']}, 401/403 {t['denied']}, 429 {t['limited']}, "
                  f"5xx {t['server_errors']}), prompt tokens {t['prompt_tokens']}, completion tokens "
                  f"{t['completion_tokens']}, billed {t['billed_tokens']}, mean latency {latency}, "
                  f"{_when(t['first'])} .. {_when(t['last'])}")
        for r in rejected:
            print(f"(no valid key) {r['endpoint']}: {r['count']} refused ({r['code']}), "
                  f"{_when(r['first'])} .. {_when(r['last'])}")

__all__ = ["add_serve_commands"]
