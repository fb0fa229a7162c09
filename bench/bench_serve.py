"""Serving throughput and latency: batched against one-by-one, undefended against Product-of-Experts, and the cost
of the ledger.

    .venv/bin/python bench/bench_serve.py            # full run, writes bench/results/serve.json
    .venv/bin/python bench/bench_serve.py --quick    # fewer requests, writes bench/results/serve-quick.json

Setup: a random-init ``--teacher`` preset (default ``base``, 2.4M parameters) with the built-in tokenizer, EOS
disabled so every request generates exactly ``--max-tokens`` tokens; PoE uses a random-init ``tiny`` proxy with
gamma 0.5. Each server runs in its own process (uvicorn on 127.0.0.1, a free port, ``--threads`` torch threads)
so the clients' Python does not share its GIL; two servers, both up for the whole run: *batched*
(``max_batch_size`` 16, ``max_wait_ms`` ``--wait-ms``) and *one by one* (``max_batch_size`` 1, ``max_running``
1). Clients are
threads of this process, each with a keep-alive HTTP connection, sending chat completions back to back
(temperature 1, a different arithmetic prompt each time) after a warm-up. Per cell: requests/s, completion
tokens/s, p50 and p99 latency as the client sees it, and the server process's CPU time per request (steadier than
wall-clock time on a shared machine). Cells run interleaved across the two servers, ``--repeats`` times; the best
run of each counts.

The ledger part times the store alone: one ``reserve`` + ``settle`` (with its ledger row) per request, SQLite
synchronous NORMAL and FULL, from 1 and 16 threads; and compares it with the p50 request latency.

``--stream`` measures streaming instead (writes ``serve-stream.json``): time to first token against the whole
request for ``--stream-tokens`` (250) token chat completions with ``stream: true``, through the official ``openai``
client (one client object per thread), at 16 and 64 concurrent clients, against one server with ``max_batch_size``
64 (every client's request fits one batch; with fewer rows than clients a request waits for a running batch to
finish before its first token). Per cell: p50 / p99 of the time to the first content chunk, of the whole request,
and of their ratio per request.

The machine is shared: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SERVER = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from distillarena.serve.config import ServeConfig
from distillarena.serve.testing import running_server
cfg = ServeConfig.model_validate(json.loads(sys.argv[1]))
with running_server(cfg, kdf=None) as srv:
    print(json.dumps({"port": srv.thread.port}), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""


def save_models(root: Path, teacher: str) -> tuple[Path, Path]:
    from distillarena.models.presets import build_preset
    from distillarena.models.tokenizer import task_tokenizer

    tok = task_tokenizer()
    out = []
    for name, preset, seed in (("teacher", teacher, 0), ("proxy", "tiny", 1)):
        model = build_preset(preset, tok, seed=seed)
        model.config.eos_token_id = None
        model.generation_config.eos_token_id = None  # fixed work: every request runs to max_tokens
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(root / name)
    return out[0], out[1]


class Server:
    def __init__(self, cfg: dict, threads: int):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(cfg), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the server process did not start")
        self.port = json.loads(line)["port"]

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process (all its threads), from /proc; None elsewhere."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def run_cell(port: int, token: str, clients: int, per_client: int, max_tokens: int, warmup: int = 2) -> dict:
    latencies: list[float] = []
    tokens = [0]
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        def one(i: int) -> tuple[float, int, int]:
            body = json.dumps({"model": "teacher", "max_tokens": max_tokens, "temperature": 1.0,
                               "messages": [{"role": "user", "content": f"What is {c * 97 + i}+{i * 13}*{c}?"}]})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, headers)
            resp = conn.getresponse()
            data = json.loads(resp.read())
            dt = time.perf_counter() - t0
            return dt, resp.status, data.get("usage", {}).get("completion_tokens", 0)

        for i in range(warmup):
            one(-1 - i)
        barrier.wait()
        for i in range(per_client):
            dt, status, n = one(i)
            with lock:
                latencies.append(dt)
                tokens[0] += n
                errors[0] += status != 200
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "wall_s": wall,
            "req_per_s": len(lat) / wall, "tokens_per_s": tokens[0] / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def stream_cell(port: int, token: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import openai

    ttfts: list[float] = []
    totals: list[float] = []
    ratios: list[float] = []
    tokens = [0]
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=600)

        def one(i: int) -> tuple[float | None, float, int]:
            t0 = time.perf_counter()
            first, n = None, 0
            stream = api.chat.completions.create(
                model="teacher", max_tokens=max_tokens, temperature=1.0, stream=True,
                messages=[{"role": "user", "content": f"What is {c * 97 + i}+{i * 13}*{c}?"}])
            for chunk in stream:
                for ch in chunk.choices:
                    if ch.delta.content is not None and ch.finish_reason is None and ch.delta.role is None:
                        n += 1
                        if first is None:
                            first = time.perf_counter() - t0
            return first, time.perf_counter() - t0, n

        one(-1)  # warm-up
        barrier.wait()
        for i in range(per_client):
            try:
                first, total, n = one(i)
            except openai.OpenAIError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                if first is not None:
                    ttfts.append(first)
                    ratios.append(first / total)
                totals.append(total)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def pct(xs: list[float], q: float) -> float:
        if q == 0.5:
            return statistics.median(xs)
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"clients": clients, "requests": len(totals), "errors": errors[0], "wall_s": wall,
            "tokens_per_s": tokens[0] / wall, "ttft_p50_ms": 1000 * pct(ttfts, 0.5),
            "ttft_p99_ms": 1000 * pct(ttfts, 0.99), "total_p50_ms": 1000 * pct(totals, 0.5),
            "total_p99_ms": 1000 * pct(totals, 0.99), "ttft_share_p50": pct(ratios, 0.5),
            "ttft_share_p99": pct(ratios, 0.99)}


def bench_stream(args) -> None:
    from distillarena.serve.store import Store

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, _ = save_models(root, args.teacher)
        store_path = root / "store.sqlite"
        with Store(store_path) as store:
            token = store.create_key("stream")[0]
        cfg = {"model": str(teacher), "model_name": "teacher", "store": str(store_path), "port": 0,
               "max_tokens_cap": args.stream_tokens, "max_n": 1,
               "batching": {"max_batch_size": 64, "max_wait_ms": args.wait_ms, "max_running": args.max_running}}
        server = Server(cfg, args.threads)
        try:
            for clients in (16, 64):
                cell = stream_cell(server.port, token, clients, args.stream_rounds, args.stream_tokens)
                rows.append(cell)
                print(f"stream, {clients} clients: time to first token p50 {cell['ttft_p50_ms']:.0f} ms, p99 "
                      f"{cell['ttft_p99_ms']:.0f} ms; whole request p50 {cell['total_p50_ms']:.0f} ms, p99 "
                      f"{cell['total_p99_ms']:.0f} ms; first token / whole per request p50 "
                      f"{100 * cell['ttft_share_p50']:.1f}%, p99 {100 * cell['ttft_share_p99']:.1f}% "
                      f"({cell['requests']} requests, {cell['tokens_per_s']:.0f} tokens/s, {cell['errors']} errors)",
                      flush=True)
        finally:
            server.close()
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "serve-stream.json"
    out.write_text(json.dumps({
        "bench": "serve-stream", "args": vars(args), "machine": {"platform": platform.platform(),
                                                                 "cpus": os.cpu_count(), "load_before": load_before,
                                                                 "load_after": load_after},
        "rows": rows, "time": time.time()}, indent=2) + "\n")
    print(f"written {out}")


def bench_ledger(root: Path, n: int) -> list[dict]:
    from distillarena.serve.store import Store
    from distillarena.serve.testing import FAST_KDF

    out = []
    for sync in ("normal", "full"):
        for threads in (1, 16):
            store = Store(root / f"ledger-{sync}-{threads}.sqlite", synchronous=sync, kdf=FAST_KDF)
            _, rec = store.create_key("bench", max_completion_tokens=10**12)
            row = {"request_id": "r", "key_id": rec.id, "time": 0.0, "endpoint": "chat.completions", "model": "m",
                   "prompt_tokens": 12, "completion_tokens": 32, "reserved_tokens": 32, "n": 1, "defense": "none",
                   "status": 200, "latency_ms": 1.0}
            per = max(1, n // threads)

            def work(store=store, row=row, rec=rec, per=per):
                for _ in range(per):
                    r = store.reserve(rec.id, 32)
                    store.settle(r, completion_tokens=32, prompt_tokens=12, ledger=row)

            ts = [threading.Thread(target=work) for _ in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            wall = time.perf_counter() - t0
            total = per * threads
            assert store.ledger_count() == total and store.get_key(rec.id).tokens_used == 32 * total
            out.append({"synchronous": sync, "threads": threads, "requests": total,
                        "us_per_request": 1e6 * wall / total, "requests_per_s": total / wall})
            store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--teacher", default="base")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server process")
    ap.add_argument("--requests", type=int, default=None, help="requests per cell (default 64, quick 24)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each cell, the best counts (default 2, "
                    "quick 1)")
    ap.add_argument("--stream", action="store_true", help="measure streaming (time to first token) instead")
    ap.add_argument("--stream-tokens", type=int, default=250)
    ap.add_argument("--stream-rounds", type=int, default=2, help="streamed requests per client")
    ap.add_argument("--max-running", type=int, default=8, help="batches generating at once (streaming server)")
    args = ap.parse_args()
    if args.stream:
        bench_stream(args)
        return
    per_cell = args.requests or (24 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 2)
    load_before = os.getloadavg()

    from distillarena.serve.config import PolicyConfig
    from distillarena.serve.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, proxy = save_models(root, args.teacher)
        store_path = root / "store.sqlite"
        with Store(store_path) as store:
            tokens = {"none": store.create_key("plain")[0],
                      "poe": store.create_key("poe", policy=PolicyConfig(defense="poe", strength=0.5))[0]}
        servers = {}
        try:
            for mode, batch in (("batched", 16), ("one-by-one", 1)):
                cfg = {"model": str(teacher), "model_name": "teacher", "proxy": str(proxy),
                       "store": str(store_path), "port": 0, "max_tokens_cap": args.max_tokens, "max_n": 1,
                       "batching": {"max_batch_size": batch, "max_wait_ms": args.wait_ms,
                                    "max_running": 1 if batch == 1 else 8}}
                servers[mode] = Server(cfg, args.threads)
            cells = [(mode, defense, clients) for defense in ("none", "poe") for clients in (1, 4, 16)
                     for mode in ("batched", "one-by-one") if not (mode == "one-by-one" and clients == 4)]
            best: dict = {}
            for rep in range(args.repeats):  # interleaved, so both servers see the same machine load
                for mode, defense, clients in cells:
                    server = servers[mode]
                    cpu0 = server.cpu_seconds()
                    cell = run_cell(server.port, tokens[defense], clients, max(1, per_cell // clients),
                                    args.max_tokens)
                    cpu = server.cpu_seconds() - cpu0 if cpu0 is not None else None
                    cell.update(mode=mode, defense=defense, repeat=rep,
                                server_cpu_ms_per_request=None if cpu is None else 1000 * cpu / cell["requests"])
                    print(f"[{rep}] {mode:<11} {defense:<5} clients {clients:>2}: {cell['req_per_s']:7.2f} req/s "
                          f"{cell['tokens_per_s']:8.0f} tok/s  p50 {cell['p50_ms']:7.1f} ms  "
                          f"p99 {cell['p99_ms']:7.1f} ms  server CPU/request "
                          f"{cell['server_cpu_ms_per_request'] or float('nan'):6.1f} ms  errors {cell['errors']}",
                          flush=True)
                    key = (mode, defense, clients)
                    if key not in best or cell["req_per_s"] > best[key]["req_per_s"]:
                        best[key] = cell
            rows = [best[c] for c in cells]
        finally:
            for server in servers.values():
                server.close()
        ledger = bench_ledger(root, 200 if args.quick else 1000)
    load_after = os.getloadavg()

    def cell(mode, defense, clients):
        return next(r for r in rows if (r["mode"], r["defense"], r["clients"]) == (mode, defense, clients))

    ratios = {}
    for defense in ("none", "poe"):
        b16, o16, b1 = cell("batched", defense, 16), cell("one-by-one", defense, 16), cell("batched", defense, 1)
        o1 = cell("one-by-one", defense, 1)
        ratios[defense] = {"batched16_over_onebyone16": b16["req_per_s"] / o16["req_per_s"],
                           "batched16_over_best_onebyone": b16["req_per_s"] / max(o1["req_per_s"], o16["req_per_s"]),
                           "batched16_over_batched1": b16["req_per_s"] / b1["req_per_s"]}
    ratios["poe_cost_at_16"] = cell("batched", "none", 16)["req_per_s"] / cell("batched", "poe", 16)["req_per_s"]
    for defense in ("none", "poe"):
        b16, o16 = cell("batched", defense, 16), cell("one-by-one", defense, 16)
        if b16["server_cpu_ms_per_request"] and o16["server_cpu_ms_per_request"]:
            ratios[defense]["cpu_per_request_onebyone16_over_batched16"] = (
                o16["server_cpu_ms_per_request"] / b16["server_cpu_ms_per_request"])

    print("\n| server | defense | clients | req/s | tokens/s | p50 ms | p99 ms | server CPU ms / request |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = r["server_cpu_ms_per_request"]
        print(f"| {r['mode']} | {r['defense']} | {r['clients']} | {r['req_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} |")
    for d in ("none", "poe"):
        cpu = ratios[d].get("cpu_per_request_onebyone16_over_batched16")
        print(f"{d}: 16 clients batched / one by one = {ratios[d]['batched16_over_onebyone16']:.2f}x "
              f"(target >= 3x; {ratios[d]['batched16_over_best_onebyone']:.2f}x against the one-by-one server's "
              f"best, at 1 or 16 clients); batched 16 clients / 1 client = "
              f"{ratios[d]['batched16_over_batched1']:.2f}x"
              + ("" if cpu is None else f"; server CPU per request one by one / batched = {cpu:.2f}x"))
    print(f"PoE costs {ratios['poe_cost_at_16']:.2f}x throughput at 16 clients (batched)")
    p50_1 = cell("batched", "none", 1)["p50_ms"]
    print("\n| ledger: synchronous | threads | us per request (reserve + settle + row) | requests/s | % of p50 at 1 "
          "client |")
    print("|---|---|---|---|---|")
    for lrow in ledger:
        lrow["share_of_p50_1_client"] = lrow["us_per_request"] / 1000 / p50_1
        print(f"| {lrow['synchronous']} | {lrow['threads']} | {lrow['us_per_request']:.0f} | "
              f"{lrow['requests_per_s']:.0f} | {100 * lrow['share_of_p50_1_client']:.1f}% |")
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2 cores, shared)")

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("serve-quick.json" if args.quick else "serve.json")
    out.write_text(json.dumps({
        "bench": "serve", "args": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                          "load_before": load_before, "load_after": load_after},
        "rows": rows, "ratios": ratios, "ledger": ledger, "time": time.time()}, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
