"""Run every benchmark and print ratios measured side by side in one run.

    python benchmarks/run.py            # full (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer rounds

Absolute times drift on shared machines; the ratios are what the issues' targets speak of.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--only", choices=["core", "jacobians", "monitor", "lag", "modern"],
                    help="run one group")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    groups = ["core", "jacobians", "monitor", "lag", "modern"] if args.only is None else [args.only]
    rows = []
    for g in groups:
        mod = __import__(f"bench_{g}")
        rows += [r for r in (mod.run(quick=args.quick) or []) if isinstance(r, dict)]
    print_summary(rows)


def print_summary(rows: list) -> None:
    """One line per measured comparison: its target, and whether the ratio measured in this
    run met it (rows that state a machine-checkable goal) or only the target text."""
    from timing import goal_status
    print("\nSummary (ratios measured side by side in this run)")
    for row in rows:
        status = goal_status(row) or f"target: {row.get('target', '')}"
        print(f"  {row['title'][:70]:<70s} {status}")


if __name__ == "__main__":
    main()
