"""Side-by-side timing: candidates run interleaved, round after round, so that the machine's
drift hits all of them alike; the ratio of medians is what we report."""

from __future__ import annotations

import statistics
import time


def compare_times(candidates: dict, *, rounds: int = 5, warmup: int = 1) -> dict:
    """candidates: name -> zero-arg callable. Returns name -> median seconds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, times: dict, baseline: str, target: str) -> dict:
    """Print medians and ratios against `baseline`; return a row for the summary table."""
    print(f"\n{title}")
    base = times[baseline]
    for name, t in times.items():
        print(f"  {name:<44s} {t * 1e3:10.1f} ms   {t / base:6.2f}x of {baseline}")
    return {"title": title, "times": times, "baseline": baseline, "target": target}
