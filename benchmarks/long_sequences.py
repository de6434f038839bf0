"""Long sequences: wall time and peak memory (RSS) as T grows, each run in its own process.

    python benchmarks/long_sequences.py compare --seq-len 1000 2000 5000 10000
    python benchmarks/long_sequences.py api --seq-len 100000      # LSTM H=128, B=4, I=64
    python benchmarks/long_sequences.py api --seq-len 100 1000 10000 100000 --markdown \
        --timeout 1800                                            # the README's scaling table

`compare` runs `python -m rnnscope compare --seq-len T --no-report --quiet` (every default
model, the causal Transformer included) under `/usr/bin/time -v` and prints the wall time, the
CPU time (user + system, less sensitive to other jobs than the wall time on a shared machine)
and the peak RSS it reports. `api` runs each analysis (gradient_profile, state_gradients,
cell_jacobians(keep="norms"), gate_stats) on an LSTM in a fresh process and prints its time
and CPU time and the process's peak RSS (ru_maxrss), and how much of it the analysis added over the
process before the call (imports, the model, the inputs). Runs are sequential; the 1-minute
load average is printed before each, because on a shared machine it moves the times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

API = r"""
import json, resource, sys, time, torch
from torch import nn
import rnnscope
what, T, B, H, I = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
m = nn.LSTM(I, H, batch_first=True)
x = torch.randn(B, T, I)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss()
t0, c0 = time.perf_counter(), time.process_time()
if what == "gradient_profile":
    r = rnnscope.gradient_profile(m, x)
elif what == "state_gradients":
    r = rnnscope.state_gradients(m, x)
elif what == "cell_jacobians":
    r = rnnscope.cell_jacobians(m, x, state="c", keep="norms")
elif what == "gate_stats":
    r = rnnscope.gate_stats(m, x)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": seconds, "cpu": cpu, "peak": rss(), "before": before}))
"""

ANALYSES = ("gradient_profile", "state_gradients", "cell_jacobians", "gate_stats")


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def run_compare(seq_lens, extra) -> None:
    print(f"{'T':>7} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'load':>5}  command")
    for T in seq_lens:
        la = load()
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "rnnscope", "compare", "--seq-len", str(T),
                   "--no-report", "--quiet", "--out", out, *extra]
            env = dict(os.environ, PYTHONPATH=SRC)
            t0 = time.perf_counter()
            p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                               env=env)
            wall = time.perf_counter() - t0
        if p.returncode != 0:
            print(f"{T:>7} failed ({p.returncode}): {p.stderr.strip().splitlines()[-3:]}")
            continue
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)[1])
        cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", p.stderr)[1])
                  for k in ("User", "System"))
        print(f"{T:>7} {wall:8.1f} {cpu:8.1f} {peak_kb * 1024 / 1e9:12.2f} {la:>5}  "
              f"rnnscope compare --seq-len {T} {' '.join(extra)}", flush=True)


def _api_once(what, T, B, H, I, timeout):
    """One analysis in a fresh process: (result dict | None, note)."""
    try:
        p = subprocess.run([sys.executable, "-c", API, what, str(T), str(B), str(H), str(I)],
                           capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, PYTHONPATH=SRC))
    except subprocess.TimeoutExpired:
        return None, f"not finished in {timeout:.0f} s"
    if p.returncode != 0:
        return None, f"failed: {p.stderr.strip().splitlines()[-1:]}"
    return json.loads(p.stdout.strip().splitlines()[-1]), ""


def run_api(seq_lens, B, H, I, only, timeout=None, markdown=False) -> None:
    """Each analysis at each T in its own process; with `markdown`, also the README table
    (one row per analysis, one column per T: wall and CPU seconds, peak RSS the analysis
    added over the process before it)."""
    print(f"LSTM H={H}, B={B}, I={I}, one process per analysis")
    print(f"{'T':>7} {'analysis':>17} {'s':>8} {'CPU s':>8} {'peak RSS GB':>12} "
          f"{'added GB':>9} {'load':>5}")
    cells = {}
    for T in seq_lens:
        for what in only or ANALYSES:
            la = load()
            r, note = _api_once(what, T, B, H, I, timeout)
            if r is None:
                print(f"{T:>7} {what:>17} {note} (load {la})", flush=True)
                cells[what, T] = f"{note} (load {la})"
                continue
            added = (r["peak"] - r["before"]) / 1e6
            print(f"{T:>7} {what:>17} {r['seconds']:8.1f} {r['cpu']:8.1f} "
                  f"{r['peak'] / 1e9:12.2f} {added / 1e3:9.2f} {la:>5}", flush=True)
            cells[what, T] = (f"{r['seconds']:.3g} s (CPU {r['cpu']:.3g} s), "
                              f"+{added:.0f} MB (load {la})")
    if markdown:
        whats = only or ANALYSES
        print()
        print("| analysis | " + " | ".join(f"T = {T}" for T in seq_lens) + " |")
        print("|---|" + "---|" * len(seq_lens))
        for what in whats:
            label = "cell_jacobians(keep=\"norms\")" if what == "cell_jacobians" else what
            print(f"| `{label}` | " + " | ".join(cells.get((what, T), "") for T in seq_lens)
                  + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["compare", "api"])
    ap.add_argument("--seq-len", type=int, nargs="+", required=True)
    ap.add_argument("--batch", type=int, default=4, help="api: samples (default 4)")
    ap.add_argument("--hidden-size", type=int, default=128, help="api: H (default 128)")
    ap.add_argument("--input-size", type=int, default=64, help="api: I (default 64)")
    ap.add_argument("--only", nargs="+", choices=ANALYSES, help="api: these analyses only")
    ap.add_argument("--models", help="compare: passed on as --models")
    ap.add_argument("--timeout", type=float, help="api: seconds one analysis may take; past it "
                    "the table says it did not finish")
    ap.add_argument("--markdown", action="store_true", help="api: also print the README table")
    args = ap.parse_args()
    if args.mode == "compare":
        run_compare(args.seq_len, ["--models", args.models] if args.models else [])
    else:
        run_api(args.seq_len, args.batch, args.hidden_size, args.input_size, args.only,
                args.timeout, args.markdown)


if __name__ == "__main__":
    main()
