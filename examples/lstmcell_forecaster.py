"""Time-series forecaster written with nn.LSTMCell in a Python loop over time.

Model shape: PyTorch's "time sequence prediction" example (examples/time_sequence_prediction):
two stacked `nn.LSTMCell`s and a Linear head, `forward(input, future=0)` with input (B, T) of
floats, one cell call per time step (`input.split(1, dim=1)`), returning (B, T + future)
one-step-ahead predictions. Trained briefly with Adam and MSE on noisy sine waves (the original
uses LBFGS on clean sines in float64).

What to look at:

* `gradient_profile(model, x, at="lstm1", loss=...)`: `lstm1` is called once per step; rnnscope
  joins its calls into one time axis and measures ‖∂L/∂x_t‖ at each call's input (B, 1) —
  how much the last prediction's error depends on each earlier observation.
* `gradient_profile(nn.LSTMCell(...), x3d)`: a bare cell given (B, T, I) runs over time from a
  zero state — the quickest way to look at a cell before it sits in a model.
* Before vs after training: a forecaster of a sine needs a few steps of memory (phase), not the
  whole window.

Run: python examples/lstmcell_forecaster.py
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

import rnnscope

STEPS = 100  # training steps


class Sequence(nn.Module):
    def __init__(self, hidden=51):
        super().__init__()
        self.hidden = hidden
        self.lstm1 = nn.LSTMCell(1, hidden)
        self.lstm2 = nn.LSTMCell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, input, future=0):
        outputs = []
        h_t = torch.zeros(input.size(0), self.hidden, dtype=input.dtype)
        c_t = torch.zeros(input.size(0), self.hidden, dtype=input.dtype)
        h_t2 = torch.zeros(input.size(0), self.hidden, dtype=input.dtype)
        c_t2 = torch.zeros(input.size(0), self.hidden, dtype=input.dtype)

        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        for _ in range(future):  # if we should predict the future
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        outputs = torch.cat(outputs, dim=1)
        return outputs


def sine_waves(n, T, g, noise=0.05):
    """(n, T + 1) noisy sine waves with random phase and period 15..30 steps."""
    t = torch.arange(T + 1, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    period = 15 + 15 * torch.rand(n, 1, generator=g)
    clean = torch.sin(2 * math.pi * t / period + phase)
    return clean + noise * torch.randn(n, T + 1, generator=g)


def main() -> dict:
    steps = STEPS
    torch.set_num_threads(1)  # tiny models: one thread is fastest, also on a busy machine
    torch.manual_seed(0)
    t0 = time.perf_counter()
    T = 50
    g = torch.Generator().manual_seed(0)
    data = sine_waves(32, T, g)
    x, y = data[:, :-1], data[:, 1:]  # (B, T) inputs, next-value targets
    test = sine_waves(16, T, torch.Generator().manual_seed(1))
    xt, yt = test[:, :-1], test[:, 1:]

    model = Sequence()

    def last_step_sq_err(out):  # (B,): squared error of each series' last prediction
        return (out[:, -1] - yt[:, -1]) ** 2

    before = rnnscope.gradient_profile(model, xt, at="lstm1", loss=last_step_sq_err)
    print(f"untrained: profile at {before.site!r}, per_sample {tuple(before.per_sample.shape)} "
          f"(one column per lstm1 call); half-life {before.half_life():.2f} steps, "
          f"effective memory {before.effective_memory()} of {T}")

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    criterion = nn.MSELoss()
    losses = []
    for step in range(steps):
        out = model(x)
        loss = criterion(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:3d}  train MSE {loss.item():.4f}")
    with torch.no_grad():
        test_mse = criterion(model(xt), yt).item()
        future = model(xt[:, :30], future=20)  # free-running for the last 20 steps
        future_mse = criterion(future[:, 30:], yt[:, 30:]).item()
    print(f"test MSE one step ahead {test_mse:.4f}; free-running 20 steps {future_mse:.4f} "
          f"(noise floor {0.05 ** 2 * 2:.4f})")

    after = rnnscope.gradient_profile(model, xt, at="lstm1", loss=last_step_sq_err)
    bd = after.by_distance()
    print("trained: ‖∂err_last/∂x_(T-1-k)‖ at k = 0, 1, 5, 10, 20, 40: "
          + ", ".join(f"{float(bd[k]):.1e}" for k in (0, 1, 5, 10, 20, 40) if k < T))
    print(f"  decay rate {after.decay_rate():.3f}/step, half-life {after.half_life():.2f} steps, "
          f"effective memory {after.effective_memory()} of {T}")

    # A bare cell, straight from the constructor: (B, T, I) runs over time from a zero state.
    cell = nn.LSTMCell(1, 51)
    bare = rnnscope.gradient_profile(cell, xt.unsqueeze(-1))  # (B, T, 1)
    print(f"bare nn.LSTMCell(1, 51) on (B, T, 1) = {tuple(xt.unsqueeze(-1).shape)}: site "
          f"{bare.site!r}, per_sample {tuple(bare.per_sample.shape)}, half-life "
          f"{bare.half_life():.2f}, effective memory {bare.effective_memory()}")
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    return {"T": T, "losses": losses, "first_loss": losses[0], "final_loss": losses[-1],
            "test_mse": test_mse, "future_mse": future_mse,
            "site": after.site, "shape": tuple(after.per_sample.shape),
            "before_effective_memory": before.effective_memory(),
            "effective_memory": after.effective_memory(), "half_life": after.half_life(),
            "by_distance": bd, "bare_site": bare.site, "bare_shape": tuple(bare.per_sample.shape),
            "bare_effective_memory": bare.effective_memory(), "seconds": seconds}


if __name__ == "__main__":
    main()
