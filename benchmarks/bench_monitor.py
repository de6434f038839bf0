"""Monitor overhead (issue: training-time monitor): monitored vs bare training steps."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from rnnscope.monitor import AlertPolicy, GradientMonitor


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(64, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 100, 64, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]


def _steps(model, opt, batches, mon=None):
    t0 = time.perf_counter()
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if mon is not None:
            mon.step()
        opt.step()
    return (time.perf_counter() - t0) / len(batches)


def run(quick: bool = False):
    torch.manual_seed(0)
    bare_m, mon_m = Model(), Model()
    mon_m.load_state_dict(bare_m.state_dict())
    opt_b = torch.optim.Adam(bare_m.parameters(), 1e-3)
    opt_m = torch.optim.Adam(mon_m.parameters(), 1e-3)
    quiet = AlertPolicy(warn=False)
    cheap = GradientMonitor(mon_m, replay_every=0, alerts=quiet)  # default every=1, no replay
    batches = _batches(10)
    rounds = 3 if quick else 6
    t_bare, t_cheap = [], []
    _steps(bare_m, opt_b, batches[:2])
    for _ in range(rounds):  # interleaved rounds, same batches
        t_bare.append(_steps(bare_m, opt_b, batches))
        cheap.attach()
        t_cheap.append(_steps(mon_m, opt_m, batches, cheap))
        cheap.detach()
    bare, ch = statistics.median(t_bare), statistics.median(t_cheap)
    # a replay step alone: monitor that replays every step (max_batch=8)
    full = GradientMonitor(mon_m, every=1, replay_every=1, alerts=quiet)
    t_full, t_bare2 = [], []
    for _ in range(rounds):
        t_bare2.append(_steps(bare_m, opt_b, batches[:3]))
        full.attach()
        t_full.append(_steps(mon_m, opt_m, batches[:3], full))
        full.detach()
    replay_cost = statistics.median(t_full) - statistics.median(t_bare2)
    default = ch + (replay_cost - (ch - bare)) / 100  # every=1 plus one replay per 100 steps
    print("\n(g) GradientMonitor overhead, 2-layer LSTM B=32 T=100 I=64 H=256, Adam, CPU")
    print(f"  bare training step                         {bare * 1e3:8.1f} ms   1.00x")
    print(f"  monitored, cheap statistics every step     {ch * 1e3:8.1f} ms   {ch / bare:.3f}x")
    print(f"  a replay step (max_batch=8), extra cost    {replay_cost * 1e3:8.1f} ms   "
          f"(+{replay_cost / bare:.2f}x of a bare step)")
    print(f"  default settings (every=1, replay_every=100), amortised: "
          f"{default / bare:.3f}x (target ≤ 1.10)")
    return [{"title": "monitor", "times": {"bare": bare, "cheap": ch, "default": default},
             "baseline": "bare", "target": "≤ 1.10"}]
