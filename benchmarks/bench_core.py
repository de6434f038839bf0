"""Core benchmarks (issue: core library): gradient_profile and replay, ratios side by side."""

from __future__ import annotations

import torch
from torch import nn

import rnnscope
from timing import compare_times, report


def seed_loop_as_written(model, x):
    """The seed's analyze_lstm_gradients as written: one sample at a time, loss.backward()
    (which also accumulates into the parameters' .grad — the seed's bug), a Python loop over
    timesteps with .item()."""
    norms = torch.zeros(x.shape[1])
    for s in range(x.shape[0]):
        xs = x[s:s + 1].clone().requires_grad_(True)
        out, _ = model(xs)
        out[0, -1, :].sum().backward()
        for t in range(x.shape[1]):
            norms[t] += xs.grad[0, t, :].norm().item()
    model.zero_grad(set_to_none=True)
    return norms / x.shape[0]


def seed_loop(model, x):
    """The seed's per-sample loop, tightened: gradient w.r.t. the input only, vectorised norms."""
    norms = torch.zeros(x.shape[1])
    for s in range(x.shape[0]):
        xs = x[s:s + 1].clone().requires_grad_(True)
        out, _ = model(xs)
        (g,) = torch.autograd.grad(out[0, -1, :].sum(), xs)
        norms += g[0].norm(dim=-1)
    return norms / x.shape[0]


def run(quick: bool = False):
    rows = []
    torch.manual_seed(0)
    T, H, I, S = 100, 128, 64, 50
    lstm = nn.LSTM(I, H, batch_first=True)
    x = torch.randn(S, T, I, generator=torch.Generator().manual_seed(0))

    def bare_backward():
        xr = x.clone().requires_grad_(True)
        out, _ = lstm(xr)
        out[:, -1].sum().backward()
        lstm.zero_grad(set_to_none=True)

    def bare_input_grad():
        xr = x.clone().requires_grad_(True)
        out, _ = lstm(xr)
        torch.autograd.grad(out[:, -1].sum(), xr)

    times = compare_times({
        "gradient_profile (one batched pass)": lambda: rnnscope.gradient_profile(lstm, x),
        "seed per-sample loop": lambda: seed_loop(lstm, x),
        "seed per-sample loop, as written": lambda: seed_loop_as_written(lstm, x),
        "bare forward + loss.backward()": bare_backward,
        "bare forward + autograd.grad(inputs)": bare_input_grad,
    }, rounds=3 if quick else 7)
    rows.append(report("(a) gradient_profile vs the seed's loop (LSTM T=100 H=128 I=64 S=50)",
                       {k: times[k] for k in ("seed per-sample loop, as written",
                                              "seed per-sample loop",
                                              "gradient_profile (one batched pass)")},
                       "gradient_profile (one batched pass)", "seed loop ≥ 2× slower"))
    rows.append(report("(b) gradient_profile vs the floor (same model, same batch)",
                       {k: times[k] for k in ("bare forward + loss.backward()",
                                              "bare forward + autograd.grad(inputs)",
                                              "gradient_profile (one batched pass)")},
                       "bare forward + loss.backward()", "≤ 1.25×"))

    B, T, I, H = 50, 1000, 64, 128
    lstm = nn.LSTM(I, H, batch_first=True)
    x = torch.randn(B, T, I)

    def fused():
        xr = x.clone().requires_grad_(True)
        out, _ = lstm(xr)
        out.sum().backward()
        lstm.zero_grad(set_to_none=True)

    def replayed():
        xr = x.clone().requires_grad_(True)
        tr = rnnscope.replay(lstm, xr)
        tr.output.sum().backward()
        lstm.zero_grad(set_to_none=True)

    times = compare_times({"fused nn.LSTM forward+backward": fused,
                           "replay forward+backward": replayed}, rounds=2 if quick else 5)
    rows.append(report("(c) replay vs fused (LSTM B=50 T=1000 I=64 H=128, fwd+bwd)", times,
                       "fused nn.LSTM forward+backward", "≤ 2×"))
    for kind in (nn.GRU, nn.RNN):
        m = kind(I, H, batch_first=True)

        def fused_k(m=m):
            xr = x.clone().requires_grad_(True)
            m(xr)[0].sum().backward()
            m.zero_grad(set_to_none=True)

        def replay_k(m=m):
            xr = x.clone().requires_grad_(True)
            rnnscope.replay(m, xr).output.sum().backward()
            m.zero_grad(set_to_none=True)

        times = compare_times({f"fused nn.{kind.__name__} forward+backward": fused_k,
                               "replay forward+backward": replay_k}, rounds=2 if quick else 3)
        rows.append(report(f"(c') replay vs fused ({kind.__name__} B=50 T=1000 I=64 H=128)",
                           times, f"fused nn.{kind.__name__} forward+backward", "≤ 2×"))
    return rows
