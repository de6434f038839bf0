"""Modern recurrences (issue 13): the scan / closed-form path against the torch.func
custom-cell path, measured side by side in one run with torch.utils.benchmark.

    PYTHONPATH=src python benchmarks/bench_modern.py [--quick]

Per model at T=1000, H=128 (B=4, I=32, float32), two tasks:
- "states + step Jacobians": every state h_t and every ∂h_t/∂h_{t−1}.
  scan path:   hidden_states (parallel scan) + step_jacobians (closed form, the diagonal a_t).
  custom path: rnnscope.cells.custom — the sequential loop of .step, then torch.func.jacrev of
               one step vmapped over the batch, once per step (what a user-written cell gets).
- "forward + backward": ∂(Σ outputs)/∂θ through the scan vs through the sequential loop.
sLSTM (not linear in its state) compares its closed-form full Jacobian with the same jacrev
path; its dense (B, T, 4H, 4H) Jacobians are why it runs at H=32, B=1.

Candidates run interleaved, round after round; the ratio of medians is what is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from rnnscope.cells import custom  # noqa: E402
from rnnscope.modern import LRU, RGLRU, SLSTM, MinGRU, MinLSTM, SelectiveSSM  # noqa: E402


class StepCell(nn.Module):
    """A modern module's .step as a user-written cell: forward(x_t, state) -> new state."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x_t, state):
        return self.module.step(x_t, state)


def custom_path(module, x):
    """States and every one-step Jacobian the way rnnscope handles a user-written cell."""
    cell = StepCell(module)
    B = x.shape[0]
    if isinstance(module, SLSTM):
        z = torch.zeros(B, module.hidden_size)
        state0 = (z, z, z, z)
    else:
        state0 = torch.zeros(B, *module.state_shape, dtype=module.state_dtype)
    with torch.no_grad():
        states = custom.run(cell, x, state0)
    prev = [state0] + states[:-1]
    return custom.step_jacobians(cell, x, prev)


def scan_path(module, x):
    with torch.no_grad():
        if module.linear_in_state:
            module.hidden_states(x)
        return module.step_jacobians(x)


def time_side_by_side(candidates: dict, rounds: int) -> dict:
    """name -> median seconds of one call, rounds interleaved (drift hits all alike)."""
    times = {k: [] for k in candidates}
    for fn in candidates.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            t = Timer("fn()", globals={"fn": fn}).timeit(1)
            times[name].append(t.median)
    return {k: statistics.median(v) for k, v in times.items()}


def show(title, times, base):
    print(f"\n{title}")
    for name, t in times.items():
        print(f"  {name:<40s} {t * 1e3:10.1f} ms   {times[base] / t:7.1f}x faster than {base}")


def run(quick: bool = False) -> list:
    torch.manual_seed(0)
    rounds = 2 if quick else 3
    B, T, I, H = 4, 1000, 32, 128
    x = torch.randn(B, T, I)
    rows = []
    models = {"MinGRU": MinGRU(I, H), "MinLSTM": MinLSTM(I, H), "RGLRU": RGLRU(I, H),
              "LRU": LRU(I, H), "SelectiveSSM(N=4)": SelectiveSSM(I, H, state_size=4)}
    if quick:
        models = {k: models[k] for k in ("MinGRU", "LRU")}
    for name, m in models.items():
        if name == "LRU" or name.startswith("Selective"):
            # torch.func.jacrev refuses complex outputs; S6's (H·N)² per-step Jacobian is large:
            # the custom path for these is timed on the loop alone (a lower bound for it)
            cand = {"scan + closed-form Jacobians": lambda m=m: scan_path(m, x),
                    "sequential .step loop only": lambda m=m: m.forward_steps(x)}
            t = time_side_by_side(cand, rounds)
            show(f"{name}: states + step Jacobians (T={T}, H={H}, B={B})", t,
                 "sequential .step loop only")
        else:
            cand = {"scan + closed-form Jacobians": lambda m=m: scan_path(m, x),
                    "torch.func custom-cell path": lambda m=m: custom_path(m, x)}
            t = time_side_by_side(cand, rounds)
            show(f"{name}: states + step Jacobians (T={T}, H={H}, B={B})", t,
                 "torch.func custom-cell path")
        rows.append((name, "jacobians", t))

        def fb(forward):
            xg = x.clone().requires_grad_()
            forward(xg)[0].sum().backward()
            m.zero_grad(set_to_none=True)

        cand = {"scan forward + backward": lambda m=m: fb(m.forward),
                "sequential loop forward + backward": lambda m=m: fb(m.forward_steps)}
        t = time_side_by_side(cand, rounds)
        show(f"{name}: forward + backward (T={T}, H={H}, B={B})", t,
             "sequential loop forward + backward")
        rows.append((name, "fwd+bwd", t))
    Hs, Bs = 32, 1
    xs = torch.randn(Bs, T, I)
    m = SLSTM(I, Hs)
    cand = {"closed-form full Jacobian": lambda: scan_path(m, xs),
            "torch.func custom-cell path": lambda: custom_path(m, xs)}
    t = time_side_by_side(cand, rounds)
    show(f"SLSTM: states + full step Jacobians (T={T}, H={Hs}, 4H={4 * Hs}, B={Bs})", t,
         "torch.func custom-cell path")
    rows.append(("SLSTM", "jacobians", t))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and models")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    run(quick=args.quick)


if __name__ == "__main__":
    main()
