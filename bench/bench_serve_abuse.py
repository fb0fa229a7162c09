"""The served teacher under abuse, over HTTP only (issue 15's limits): what an oversized body, an oversized prompt and
a flood of wrong secrets cost the server and its legitimate clients.

    .venv/bin/python bench/bench_serve_abuse.py            # writes bench/results/serve-abuse.json
    .venv/bin/python bench/bench_serve_abuse.py --quick    # a shorter flood (8 s instead of 20 s)

Setup: one server process (uvicorn on 127.0.0.1, a free port, one torch thread), a random-init ``--teacher`` preset
with the built-in tokenizer, the store's default (slow) scrypt parameters, default ServeConfig limits. Measured:

1. a 64 MiB chunked body (no ``Content-Length``), without a key and with one: the answer, and the server process's
   resident memory (VmRSS) and its peak (VmHWM) before and after;
2. a prompt of 8,000,000 characters with a valid key: the answer and its latency;
3. a legitimate client sending chat completions back to back (``max_tokens`` 8), alone and then while 16 clients
   send requests with a wrong secret for its key id (the key is proven, so the server checks them without scrypt)
   and while 16 clients send wrong secrets for a key not yet proven in the process (scrypt, within its budget):
   the legitimate client's p50 / p99 latency, the flood's request rate and answers, and the ledger rows and
   rejection counts the flood left.

The machine is shared: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
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
torch.set_num_threads(1)
from distillarena.serve.config import ServeConfig
from distillarena.serve.testing import running_server
cfg = ServeConfig.model_validate(json.loads(sys.argv[1]))
with running_server(cfg, kdf=None) as srv:
    print(json.dumps({"port": srv.thread.port}), flush=True)
    sys.stdin.read()
"""


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


def chunked_body(port: int, token: str | None, total: int, chunk: int = 2**16) -> dict:
    """POST ``total`` bytes as a chunked body; returns the status line and how much was sent before the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    head = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
            "Transfer-Encoding: chunked"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = [0]
    stop = threading.Event()

    def send() -> None:
        piece = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
        try:
            while sent[0] < total and not stop.is_set():
                sock.sendall(piece)
                sent[0] += chunk
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    t0 = time.perf_counter()
    th = threading.Thread(target=send, daemon=True)
    th.start()
    data = b""
    try:
        while b"\r\n" not in data:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    except OSError:
        pass
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join(10)
    sock.close()
    return {"status_line": data.split(b"\r\n", 1)[0].decode(errors="replace"), "sent_mb": sent[0] / 2**20,
            "answer_s": elapsed}


def post(conn: http.client.HTTPConnection, body: dict, token: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status, time.perf_counter() - t0


def legit_latencies(port: int, token: str, seconds: float) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    t_end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < t_end:
        body = {"model": "teacher", "max_tokens": 8, "messages": [{"role": "user", "content": f"What is {i}+3?"}]}
        status, dt = post(conn, body, token)
        if status == 200:
            out.append(dt)
        i += 1
    conn.close()
    return out


def flood(port: int, tokens: list[str], clients: int, stop: threading.Event, counts: dict) -> list[threading.Thread]:
    lock = threading.Lock()

    def attacker(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = 0
        while not stop.is_set():
            body = {"model": "teacher", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
            try:
                status, _ = post(conn, body, tokens[(c + i) % len(tokens)])
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status = -1
            with lock:
                counts[status] = counts.get(status, 0) + 1
            i += 1
        conn.close()

    threads = [threading.Thread(target=attacker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    return threads


def pcts(lat: list[float]) -> dict:
    lat = sorted(lat)
    return {"requests": len(lat), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--teacher", default="tiny")
    ap.add_argument("--flood-seconds", type=float, default=None, help="default 20 (quick: 8)")
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    seconds = args.flood_seconds or (8.0 if args.quick else 20.0)
    load_before = os.getloadavg()

    from distillarena.serve.store import Store
    from distillarena.serve.testing import save_tiny_model

    result: dict = {"bench": "serve-abuse", "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = save_tiny_model(root / "teacher", args.teacher)
        store_path = root / "store.sqlite"
        with Store(store_path) as store:
            legit, rec = store.create_key("legit")
            other, other_rec = store.create_key("never-used")
        cfg = {"model": str(teacher), "model_name": "teacher", "store": str(store_path), "port": 0}
        proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(cfg)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            port = json.loads(proc.stdout.readline())["port"]
            legit_latencies(port, legit, 1.0)  # warm up (and prove the key in the server)

            for name, token in (("chunked_64mib_no_key", None), ("chunked_64mib_with_key", legit)):
                before = memory(proc.pid)
                r = chunked_body(port, token, 64 * 2**20)
                after = memory(proc.pid)
                r.update(rss_before_mb=before["VmRSS"], rss_after_mb=after["VmRSS"],
                         rss_growth_mb=after["VmRSS"] - before["VmRSS"],
                         peak_growth_mb=after["VmHWM"] - before["VmHWM"])
                result[name] = r
                print(f"{name}: {r['status_line']!r} after {r['answer_s']:.2f} s, {r['sent_mb']:.1f} MiB sent; RSS "
                      f"{before['VmRSS']:.0f} -> {after['VmRSS']:.0f} MB (peak +{r['peak_growth_mb']:.1f} MB)",
                      flush=True)

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = {"model": "teacher", "max_tokens": 8, "messages": [{"role": "user", "content": "1+" * 4_000_000}]}
            before = memory(proc.pid)
            status, dt = post(conn, body, legit)
            after = memory(proc.pid)
            conn.close()
            result["prompt_8mb"] = {"status": status, "seconds": dt, "rss_growth_mb": after["VmRSS"] - before["VmRSS"]}
            print(f"8,000,000-character prompt: {status} in {dt * 1000:.0f} ms, RSS +"
                  f"{after['VmRSS'] - before['VmRSS']:.1f} MB", flush=True)

            alone = legit_latencies(port, legit, seconds / 2)
            result["legit_alone"] = pcts(alone)
            print(f"legitimate client alone: p50 {result['legit_alone']['p50_ms']:.1f} ms, p99 "
                  f"{result['legit_alone']['p99_ms']:.1f} ms ({len(alone)} requests)", flush=True)
            for name, tokens in (("wrong_secret_proven_key", [f"da-{rec.id}-wrong{i}" for i in range(64)]),
                                 ("wrong_secret_unproven_key", [f"da-{other_rec.id}-wrong{i}" for i in range(10**6)])):
                with Store(store_path) as s:
                    rows0 = s.ledger_count()
                    rej0 = sum(r["count"] for r in s.rejections())
                stop, counts = threading.Event(), {}
                cpu0 = _cpu(proc.pid)
                threads = flood(port, tokens, args.clients, stop, counts)
                during = legit_latencies(port, legit, seconds)
                stop.set()
                for t in threads:
                    t.join(30)
                cpu = _cpu(proc.pid) - cpu0
                time.sleep(1.5)  # the rejection counts are written at most a second later
                with Store(store_path) as s:
                    rows = s.ledger_count() - rows0 - len(during)
                    rej = sum(r["count"] for r in s.rejections()) - rej0
                cell = {**pcts(during), "flood_requests": sum(counts.values()), "flood_answers": counts,
                        "flood_per_s": sum(counts.values()) / seconds, "server_cpu_s": cpu,
                        "flood_ledger_rows": rows, "rejections_counted": rej,
                        "p50_over_alone": statistics.median(during) / statistics.median(alone)}
                result[name] = cell
                print(f"{name}: legitimate p50 {cell['p50_ms']:.1f} ms ({cell['p50_over_alone']:.2f}x alone), p99 "
                      f"{cell['p99_ms']:.1f} ms; flood {cell['flood_per_s']:.0f} req/s {counts}; server CPU "
                      f"{cpu:.1f} s in {seconds:.0f} s; ledger rows from the flood {rows}, rejections counted {rej}",
                      flush=True)
        finally:
            proc.stdin.close()
            proc.wait(60)
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                         "load_after": os.getloadavg()}
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("serve-abuse-quick.json" if args.quick else "serve-abuse.json")
    out.write_text(json.dumps({**result, "time": time.time()}, indent=2) + "\n")
    print(f"written {out}")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
