"""The curse of memory (Zucchet & Orvieto 2024): a diagonal linear recurrence's state grows
sensitive to its own decay as the decay approaches 1, and input normalisation tames it.

Model shape: one unit per decay λ, h_t = λ h_{t−1} + γ x_t, x white noise, either with plain
input (γ = 1) or with the LRU's normalisation γ(λ) = sqrt(1 − λ²) (differentiated with λ).

What to look at:

* `rnnscope.modern.sensitivity.curse_of_memory` measures E(∂h_t/∂λ)² with exact derivatives
  (`parameter_sensitivity`) on random sequences and sets it beside the closed form
  `linear_recurrence_sensitivity`; the figure draws both against the memory time 1/(1 − λ).
* Plain input: the sensitivity grows like (1 + λ²)/(1 − λ²)³ — two powers of the memory time
  faster than the state's own variance. Normalised input: 1/(1 − λ²)², one power less.
* The measured points sit on the closed form within their Monte-Carlo error.

Run: python examples/curse_of_memory.py [--out curse_of_memory.png]
"""

from __future__ import annotations

import argparse

import torch

from rnnscope.modern.sensitivity import curse_of_memory

DECAYS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def main(*, t: int = 400, samples: int = 256, seed: int = 0, out: str | None = None) -> dict:
    """Measure, print a table, optionally save the figure; returns the numbers."""
    com = curse_of_memory(torch.tensor(DECAYS, dtype=torch.float64), t=t, samples=samples,
                          seed=seed)
    print(f"E(∂h_t/∂λ)² at t = {com.t}, {com.samples} white-noise sequences")
    print(f"{'λ':>6} {'1/(1−λ)':>8}  {'plain: measured ± se':>24} {'closed':>10}"
          f"  {'γ-normalised: measured ± se':>28} {'closed':>8}")
    worst = 0.0
    for i, lam in enumerate(com.lam.tolist()):
        row = [f"{lam:6.3f}", f"{1 / (1 - lam):8.1f}"]
        for s in ("none", "gamma_tied"):
            m, se, c = (com.measured[s][i].item(), com.stderr[s][i].item(),
                        com.closed[s][i].item())
            worst = max(worst, abs(m - c) / se)
            row += [f"{m:12.4g} ± {se:9.3g}", f"{c:10.4g}"]
        print("  ".join(row))
    print(f"largest |measured − closed| / standard error: {worst:.2f}")
    if out is not None:
        fig = com.plot()
        fig.savefig(out, dpi=110)
        print(f"figure: {out}")
    return {"curse": com, "worst_z": worst}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="curse_of_memory.png")
    ap.add_argument("--t", type=int, default=400)
    ap.add_argument("--samples", type=int, default=256)
    a = ap.parse_args()
    main(t=a.t, samples=a.samples, out=a.out)
