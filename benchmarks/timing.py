"""Side-by-side timing with torch.utils.benchmark: candidates run interleaved, round after
round (one `Timer.timeit` per candidate per round), so that the machine's drift hits all of
them alike; the ratio of medians is what we report. `Compare` prints the same measurements as
torch's own table when asked."""

from __future__ import annotations

import statistics

import torch
from torch.utils import benchmark


def compare_times(candidates: dict, *, rounds: int = 5, warmup: int = 1, number: int = 1,
                  label: str = "", table: bool = False) -> dict:
    """candidates: name -> zero-arg callable. Returns name -> median seconds per call.

    Each round times every candidate once with `benchmark.Timer(...).timeit(number)` (which
    handles threads and synchronisation as torch's benchmarks do); the rounds are interleaved.
    With table=True, torch's `benchmark.Compare` table of the same measurements is printed too.
    """
    # Timer runs at one thread unless told: time at the thread count the run reports
    timers = {name: benchmark.Timer("fn()", globals={"fn": fn}, label=label or "benchmark",
                                    description=name, num_threads=torch.get_num_threads())
              for name, fn in candidates.items()}
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    measured = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, timer in timers.items():
            measured[name].append(timer.timeit(number))
    if table:
        benchmark.Compare([m for ms in measured.values() for m in ms]).print()
    return {name: statistics.median(m.median for m in ms) for name, ms in measured.items()}


def report(title: str, times: dict, baseline: str, target: str, *,
           goal: tuple | None = None) -> dict:
    """Print medians and ratios against `baseline`; return a row for the summary table.

    goal: (candidate, "<=" or ">=", value) states the issue's target as the ratio
    times[candidate] / times[baseline], so that `run.py` can say whether it was met.
    """
    print(f"\n{title}")
    base = times[baseline]
    for name, t in times.items():
        print(f"  {name:<44s} {t * 1e3:10.1f} ms   {t / base:6.2f}x of {baseline}")
    return {"title": title, "times": times, "baseline": baseline, "target": target,
            "goal": goal}


def goal_status(row: dict) -> str:
    """'met' / 'MISSED' with the measured ratio, or '' when the row states no goal."""
    goal = row.get("goal")
    if not goal:
        return ""
    candidate, op, value = goal
    ratio = row["times"][candidate] / row["times"][row["baseline"]]
    met = ratio <= value if op == "<=" else ratio >= value
    return f"{'met' if met else 'MISSED'}: {ratio:.2f}x (goal {op} {value}x)"
