"""Peak memory and time of one distillation loss + backward at a real vocabulary size, on CPU.

Vocabulary 152,064 (Qwen2.5), hidden size 1,024, float32. Side by side, in one run:

* ``trl``: naive full logits, TRL-style: ``logits = hidden @ W.T`` for student and teacher, then TRL's own
  ``GKDTrainer.generalized_jsd_loss`` (beta = 0.5 for jsd, beta = 0 for forward KL), ``backward``. (A transcription
  of the same function is used if TRL is not installed; ``pip install -r requirements/bench.txt``.)
* ``chunked``: ours on materialised logits (what a Hugging Face model returns): ``compute_objective(name, logits,
  teacher_logits, labels)``, chunked over positions.
* ``fused``: ours on hidden states + lm_head weights (``LMHeadInput``) for both models: no ``[positions, V]``
  float32 tensor beyond one chunk.

Each case runs in a fresh subprocess. Peak memory is the peak resident set size above the resident size once the
inputs exist (the kernel's high-water mark is reset with ``/proc/self/clear_refs`` just before the measured call),
so it includes the gradients that the call produces (``W.grad`` alone is 0.62 GB here) and, for ``trl`` and
``chunked``, the full logits. Naive generalized JSD needs ~24 GB at 2,048 positions, so the naive paths run at
1,024 (and forward KL at 2,048), and the lean path alone at 4,096.

    python bench/bench_objectives.py              # the full run (several minutes on 2 cores)
    python bench/bench_objectives.py --quick      # smaller sizes, a smoke check

Prints a table with ratios against the naive case of the same objective and size, and writes JSON under
``bench/results/``. Wall-clock numbers depend on the machine's load (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------------------------
# One case, in its own process
# --------------------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trl_jsd():
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import warnings

        warnings.filterwarnings("ignore")
        from trl.experimental.gkd import GKDTrainer

        return GKDTrainer.generalized_jsd_loss, "trl"
    except Exception:  # noqa: BLE001 - any import failure: use the transcription
        import torch
        import torch.nn.functional as F

        def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0):
            s = F.log_softmax(student_logits / temperature, dim=-1)
            t = F.log_softmax(teacher_logits / temperature, dim=-1)
            if beta == 0:
                jsd = F.kl_div(s, t, reduction="none", log_target=True)
            elif beta == 1:
                jsd = F.kl_div(t, s, reduction="none", log_target=True)
            else:
                b = torch.tensor(beta, dtype=s.dtype)
                m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
                jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
                    m, s, reduction="none", log_target=True
                )
            mask = labels != -100
            return jsd[mask].sum() / mask.sum().clamp_min(1)

        return generalized_jsd_loss, "transcription"


def run_case(case: dict) -> dict:
    import torch

    from distillarena.objectives import LMHeadInput, TeacherSignal, compute_objective

    n, V, H, impl, obj = case["n"], case["vocab"], case["hidden"], case["impl"], case["objective"]
    chunk = case.get("chunk_size")
    trl_fn, trl_src = _trl_jsd() if impl == "trl" else (None, None)

    def make(n: int, V: int, H: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        hs = torch.randn(n, H, generator=g).requires_grad_()
        Ws = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).requires_grad_()
        ht = torch.randn(n, H, generator=g)
        Wt = torch.randn(V, H, generator=g) * (2.5 / H**0.5)
        labels = torch.randint(0, V, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.1] = -100
        sampled = torch.randint(0, V, (n,), generator=g)
        return hs, Ws, ht, Wt, labels, sampled

    def loss_of(hs, Ws, ht, Wt, labels, sampled):
        beta = 0.0 if obj == "fkl" else 0.5
        if impl == "trl":
            zs = hs @ Ws.T
            with torch.no_grad():
                zt = ht @ Wt.T
            return trl_fn(zs, zt, labels, beta=beta)
        kw = {"beta": 0.5} if obj == "jsd" else {}
        if obj == "hpd":
            kw["sampled_ids"] = sampled
        if impl == "chunked":
            zs = hs @ Ws.T
            with torch.no_grad():
                zt = ht @ Wt.T
            out = compute_objective(obj, zs, TeacherSignal.dense(zt), labels, chunk_size=chunk, **kw)
        else:
            out = compute_objective(
                obj,
                LMHeadInput(hs, Ws),
                TeacherSignal.dense(LMHeadInput(ht, Wt)),
                labels,
                chunk_size=chunk,
                **kw,
            )
        return out.loss_sum / max(out.count, 1)

    # warm-up on a tiny problem (kernels, allocator, lazy imports)
    small = make(8, 2048, 64, seed=1)
    loss_of(*small).backward()
    del small

    inputs = make(n, V, H)
    gc.collect()
    base = _status("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    loss = loss_of(*inputs)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = _status("VmHWM") - base
    hs, Ws = inputs[0], inputs[1]
    assert hs.grad is not None and Ws.grad is not None
    fp = Path(case["fingerprint"])
    torch.save({"grad_h": hs.grad.clone(), "grad_W_rows": Ws.grad[:2000].clone()}, fp)
    return {
        **{k: v for k, v in case.items() if k != "fingerprint"},
        "reference_impl": trl_src,
        "loss": float(loss.detach()),
        "grad_h_norm": float(hs.grad.norm()),
        "grad_W_norm": float(Ws.grad.norm()),
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "time_s": t2 - t0,
        "peak_bytes_above_inputs": peak,
        "peak_exact": exact_peak,
        "grad_bytes": (hs.numel() + Ws.numel()) * 4,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------------


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def plan(args: argparse.Namespace) -> list[dict]:
    nn, nl = args.naive_positions, args.lean_positions
    cases = [
        ("trl", "jsd", nn),
        ("chunked", "jsd", nn),
        ("fused", "jsd", nn),
        ("trl", "fkl", nn),
        ("chunked", "fkl", nn),
        ("fused", "fkl", nn),
        ("trl", "fkl", 2 * nn),
        ("fused", "fkl", 2 * nn),
        ("fused", "jsd", nl),
        ("fused", "fkl", nl),
        ("fused", "hpd", nl),
    ]
    return [
        {"impl": i, "objective": o, "n": n, "vocab": args.vocab, "hidden": args.hidden, "chunk_size": args.chunk_size}
        for i, o, n in cases
    ]


def _estimate_bytes(case: dict) -> int:
    nv = case["n"] * case["vocab"] * 4
    per = {"trl": {"jsd": 11, "fkl": 7, "hpd": 8}, "chunked": {"jsd": 4, "fkl": 4, "hpd": 4}}
    inputs = 2 * case["vocab"] * case["hidden"] * 4
    return inputs + per.get(case["impl"], {}).get(case["objective"], 0) * nv + 2 * 10**9


def _fmt_gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--naive-positions", type=int, default=1024)
    ap.add_argument("--lean-positions", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=None, help="default: the library's (2**25 // V)")
    ap.add_argument("--quick", action="store_true", help="V=32768, 256 / 1024 positions: a smoke check")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per case")
    ap.add_argument(
        "--only",
        type=str,
        default=None,
        help="comma-separated impl:objective:positions cases to run, e.g. trl:jsd:1024,chunked:jsd:1024",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--case", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case is not None:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    if args.quick:
        args.vocab, args.naive_positions, args.lean_positions = 32768, 256, 1024

    import torch

    results: list[dict] = []
    load_start = os.getloadavg()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        cases = plan(args)
        if args.only:
            keep = {tuple(c.split(":")) for c in args.only.split(",")}
            cases = [c for c in cases if (c["impl"], c["objective"], str(c["n"])) in keep]
        for i, case in enumerate(cases):
            case["fingerprint"] = str(Path(tmp) / f"case{i}.pt")
            label = f"{case['impl']:8s} {case['objective']:4s} n={case['n']}"
            need = _estimate_bytes(case)
            if need > _mem_available():
                print(f"skip   {label}: needs ~{_fmt_gb(need)} GB, {_fmt_gb(_mem_available())} GB available")
                results.append({**case, "skipped": "not enough memory"})
                continue
            try:
                p = subprocess.run(
                    [sys.executable, __file__, "--case", json.dumps(case)],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"},
                )
            except subprocess.TimeoutExpired:
                print(f"skip   {label}: over {args.timeout} s")
                results.append({**case, "skipped": f"timeout {args.timeout}s"})
                continue
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                print(f"FAILED {label} (rc {p.returncode}):\n{p.stderr[-2000:]}")
                results.append({**case, "skipped": f"failed rc={p.returncode}"})
                continue
            r = json.loads(line[0][len("RESULT ") :])
            r["fingerprint"] = case["fingerprint"]
            results.append(r)
            print(
                f"done   {label}: {r['time_s']:.1f} s, peak {_fmt_gb(r['peak_bytes_above_inputs'])} GB, "
                f"loss {r['loss']:.6f}",
                flush=True,
            )

        # ratios against the naive case of the same objective and size; values against it too
        naive = {(r["objective"], r["n"]): r for r in results if r.get("impl") == "trl" and "skipped" not in r}
        for r in results:
            if "skipped" in r:
                continue
            nv = naive.get((r["objective"], r["n"]))
            if nv is not None and nv is not r:
                r["peak_ratio_vs_naive"] = r["peak_bytes_above_inputs"] / nv["peak_bytes_above_inputs"]
                work = r["peak_bytes_above_inputs"] - r["grad_bytes"]
                r["peak_minus_grads_ratio_vs_naive"] = work / (nv["peak_bytes_above_inputs"] - nv["grad_bytes"])
                r["time_ratio_vs_naive"] = r["time_s"] / nv["time_s"]
                a = torch.load(r["fingerprint"])
                b = torch.load(nv["fingerprint"])
                r["loss_rel_diff_vs_naive"] = abs(r["loss"] - nv["loss"]) / max(abs(nv["loss"]), 1e-30)
                r["grad_h_rel_diff_vs_naive"] = float((a["grad_h"] - b["grad_h"]).norm() / b["grad_h"].norm())
                r["grad_W_rows_rel_diff_vs_naive"] = float(
                    (a["grad_W_rows"] - b["grad_W_rows"]).norm() / b["grad_W_rows"].norm()
                )
        for r in results:
            r.pop("fingerprint", None)

    # the table
    hdr = (
        f"{'impl':8s} {'obj':4s} {'positions':>9s} {'time s':>7s} {'peak GB':>8s} {'peak/naive':>10s} "
        f"{'(-grads)':>9s} {'time/naive':>10s} {'loss rel.diff':>13s} {'grad rel.diff':>13s}"
    )
    print()
    print(f"V={args.vocab}, H={args.hidden}, float32, CPU, {torch.get_num_threads()} threads; load {load_start}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "skipped" in r:
            print(f"{r['impl']:8s} {r['objective']:4s} {r['n']:>9d}   skipped: {r['skipped']}")
            continue

        def f(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if key in r else "-"

        gdiff = max(r.get("grad_h_rel_diff_vs_naive", 0.0), r.get("grad_W_rows_rel_diff_vs_naive", 0.0))
        print(
            f"{r['impl']:8s} {r['objective']:4s} {r['n']:>9d} {r['time_s']:>7.1f} "
            f"{_fmt_gb(r['peak_bytes_above_inputs']):>8s} {f('peak_ratio_vs_naive', '.1%'):>10s} "
            f"{f('peak_minus_grads_ratio_vs_naive', '.1%'):>9s} {f('time_ratio_vs_naive', '.2f'):>10s} "
            f"{f('loss_rel_diff_vs_naive', '.1e'):>13s} "
            f"{(format(gdiff, '.1e') if 'grad_h_rel_diff_vs_naive' in r else '-'):>13s}"
        )
    print(
        "peak: resident memory above the inputs, including the gradients produced (W.grad = "
        f"{_fmt_gb(args.vocab * args.hidden * 4)} GB); (-grads): the same without them. naive = TRL's "
        "generalized_jsd_loss on full logits (beta=0.5 jsd, beta=0 fkl)."
    )
    suffix = ("-quick" if args.quick else "") + ("-partial" if args.only else "")
    out = args.out or HERE / "results" / f"objectives{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": "float32",
        "device": "cpu",
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": time.time() - t_start,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
