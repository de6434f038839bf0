"""A library-style `class LSTM(nn.LSTM)` subclass inside a forecasting model.

Model shape: forecasting libraries (pytorch-forecasting's `rnn.LSTM`, similar wrappers elsewhere)
subclass nn.LSTM so that `forward(x, hx=None, lengths=None)` packs variable-length encoder
sequences, handles sequences of length zero (their hidden state is the initial state, their
output zeros) and then calls `super().forward`. Here that LSTM encodes a window of past values
of a noisy sine with a covariate (B, T, 2), and a Linear head predicts the next value.

What to look at:

* rnnscope accepts the subclass because its forward computes what nn.LSTM computes:
  `gradient_profile`, `state_gradients` / `cell_jacobians` on `model.lstm`, and a
  `GradientMonitor` recording it during a short training run (exact records with state
  gradients).
* A subclass whose forward computes something else (here: a residual connection and an input
  rescaling inside forward) is refused by everything that replays PyTorch's equations
  (`replay`, `state_gradients`, the monitor's exact part) with a clear error instead of being
  replayed as if it were a plain LSTM — the script catches and prints it. `gradient_profile`
  differentiates the real forward with autograd, so it still measures such a module.

Run: python examples/lstm_subclass.py
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn.utils import rnn

import rnnscope

STEPS = 150  # training steps


class LSTM(nn.LSTM):
    """LSTM that handles zero-length sequences (as forecasting libraries write it)."""

    def init_hidden_state(self, x: torch.Tensor):
        batch = x.size(0) if self.batch_first else x.size(1)
        shape = (self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size)
        return (torch.zeros(shape, dtype=x.dtype, device=x.device),
                torch.zeros(shape, dtype=x.dtype, device=x.device))

    def handle_no_encoding(self, hidden_state, no_encoding, initial_hidden_state):
        hidden, cell = hidden_state
        hidden = hidden.masked_fill(no_encoding, 0.0) + initial_hidden_state[0] * no_encoding
        cell = cell.masked_fill(no_encoding, 0.0) + initial_hidden_state[1] * no_encoding
        return hidden, cell

    def forward(self, x, hx=None, lengths=None, enforce_sorted=True):
        if isinstance(x, rnn.PackedSequence) or lengths is None:
            return super().forward(x, hx)
        min_length, max_length = lengths.min(), lengths.max()
        assert min_length >= 0, "sequence lengths must be >= 0"
        if max_length == 0:
            hidden_state = self.init_hidden_state(x) if hx is None else hx
            batch = lengths.size(0)
            shape = (batch, x.size(1), self.hidden_size) if self.batch_first else \
                (x.size(0), batch, self.hidden_size)
            return torch.zeros(shape, dtype=x.dtype, device=x.device), hidden_state
        pack_lengths = lengths.where(lengths > 0, torch.ones_like(lengths))
        packed_out, hidden_state = super().forward(
            rnn.pack_padded_sequence(x, pack_lengths.cpu(), enforce_sorted=enforce_sorted,
                                     batch_first=self.batch_first), hx)
        if min_length == 0:  # a zero-length sequence keeps its initial state
            no_encoding = (lengths == 0)[None, :, None]
            initial = self.init_hidden_state(x) if hx is None else hx
            hidden_state = self.handle_no_encoding(hidden_state, no_encoding, initial)
        out, _ = rnn.pad_packed_sequence(packed_out, batch_first=self.batch_first,
                                         total_length=x.size(1) if self.batch_first
                                         else x.size(0))
        return out, hidden_state


class ResidualLSTM(nn.LSTM):
    """Computes something nn.LSTM does not: rescaled inputs and a residual connection."""

    def forward(self, x, hx=None):
        out, state = super().forward(2.0 * x, hx)
        return out + x[..., : self.hidden_size].sum(-1, keepdim=True), state


class Forecaster(nn.Module):
    def __init__(self, lstm_cls=LSTM, n_features=2, hidden_size=32):
        super().__init__()
        self.lstm = lstm_cls(n_features, hidden_size, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x, lengths=None):
        if lengths is None:
            out, _ = self.lstm(x)
        else:
            out, _ = self.lstm(x, lengths=lengths, enforce_sorted=False)
        return self.head(out).squeeze(-1)  # (B, T) one-step-ahead predictions


def make_series(n, T, g):
    """(n, T, 2) inputs [value, day-of-week-like covariate] and (n, T) next-value targets."""
    t = torch.arange(T + 1, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    period = 10 + 20 * torch.rand(n, 1, generator=g)
    y = torch.sin(2 * math.pi * t / period + phase) + 0.05 * torch.randn(n, T + 1, generator=g)
    cov = torch.cos(2 * math.pi * t / 7).expand(n, -1)
    x = torch.stack([y[:, :-1], cov[:, :-1]], dim=-1)
    return x, y[:, 1:]


def main() -> dict:
    steps = STEPS
    torch.set_num_threads(1)  # tiny models: one thread is fastest, also on a busy machine
    torch.manual_seed(0)
    t0 = time.perf_counter()
    T = 40
    g = torch.Generator().manual_seed(0)
    x, y = make_series(64, T, g)
    xt, yt = make_series(16, T, torch.Generator().manual_seed(1))
    model = Forecaster()
    print(f"noisy sines with a weekly covariate: x {tuple(x.shape)} (B, T, features), "
          f"model.lstm is a {type(model.lstm).__name__}(nn.LSTM) "
          f"subclass")

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with rnnscope.GradientMonitor(model, replay_every=50) as mon:
        for step in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            mon.step()
            opt.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == steps - 1:
                print(f"  step {step:3d}  train MSE {loss.item():.4f}")
    history = [r.to_dict() for r in mon.history]  # the records' JSON form
    exact = [r for r in history if r.get("exact")]
    with_state = [r for r in exact if r["layers"].get("lstm", {}).get("state_grad")]
    skipped = {n: w for r in history for n, w in r.get("skipped", {}).items()}
    print(f"monitor on the LSTM subclass: {len(history)} records, {len(exact)} exact, "
          f"{len(with_state)} with state_grad; skipped: {skipped or 'nothing'}")

    model.eval()
    # The model returns (B, T) predictions: rnnscope cannot tell those from (B, F) features,
    # so the default loss="last" is refused; say which step is "last" with a callable.
    default_refused = None
    try:
        rnnscope.gradient_profile(model, xt)
    except ValueError as e:
        default_refused = str(e)
        print(f"default loss='last' on a (B, T) output refused:\n  ValueError: {e}")
    last_pred = lambda out: out[:, -1]  # noqa: E731  (B,): each series' last prediction
    prof = rnnscope.gradient_profile(model, xt, loss=last_pred)  # float input: model input
    print(f"gradient_profile at {prof.site!r}: per_sample {tuple(prof.per_sample.shape)}; "
          f"half-life {prof.half_life():.2f} steps, effective memory "
          f"{prof.effective_memory()} of {T}")

    sg = rnnscope.state_gradients(model.lstm, xt)
    top = sg.layers[-1][0]
    print(f"state_gradients(model.lstm): top layer ‖∂L/∂c_t‖ at t = 0, T/2, T-1: "
          f"{float(top.c[:, 0].mean()):.2e}, {float(top.c[:, T // 2].mean()):.2e}, "
          f"{float(top.c[:, -1].mean()):.2e}")
    cj = rnnscope.cell_jacobians(model.lstm, xt, layer=1, keep="norms")  # top layer, c state
    curves = cj.by_distance()
    print("cell_jacobians(model.lstm, layer=1): ‖∂c_(T-1)/∂c_(T-1-k)‖₂ and the forget-gate "
          "highway's share at k = 1, 5, 10: "
          + ", ".join(f"{float(curves['spectral'][k]):.2e} ({float(curves['share'][k]):.2f})"
                      for k in (1, 5, 10)))
    share = cj.highway_share()

    # Variable lengths through the subclass's own forward (one series with no history at all).
    # The loss is each series' prediction at its own last observed step.
    lengths = torch.tensor([T] * 12 + [T // 2, 5, 1, 0])
    last_idx = (lengths - 1).clamp_min(0).unsqueeze(1)
    own_last = lambda out: out.gather(1, last_idx).squeeze(1)  # noqa: E731  (B,)
    plen = rnnscope.gradient_profile(model, xt, forward_args=(lengths,), at="lstm", loss=own_last)
    # the subclass runs a zero-length series for one step (its pack length is 1), as its
    # library original does; everything after a series' (packed) end gets no gradient
    past_end = ~(torch.arange(T).unsqueeze(0) < lengths.clamp_min(1).unsqueeze(1))
    len_pad_max = float(plen.per_sample[past_end].max())
    print(f"with lengths (last four series: {lengths.tolist()[-4:]}): site {plen.site!r}, largest "
          f"gradient past a series' end {len_pad_max:.1e}; prof.lengths "
          f"{None if plen.lengths is None else plen.lengths.tolist()}")

    # A subclass that computes something else is not replayed as if it were a plain LSTM.
    other = Forecaster(ResidualLSTM)
    other.eval()
    # gradient_profile differentiates the real forward with autograd, so it still applies:
    oprof = rnnscope.gradient_profile(other, xt, at="lstm", loss=last_pred)
    print(f"ResidualLSTM: gradient_profile (autograd on its real forward) works: effective "
          f"memory {oprof.effective_memory()} of {T}")
    refused = None
    try:
        rnnscope.state_gradients(other.lstm, xt)
    except (TypeError, ValueError) as e:
        refused = f"{type(e).__name__}: {e}"
        print(f"state_gradients(ResidualLSTM) refused, as expected:\n  {refused}")
    replay_refused = None
    try:
        rnnscope.replay(other.lstm, xt)
    except (TypeError, ValueError) as e:
        replay_refused = f"{type(e).__name__}: {e}"
        print(f"replay(ResidualLSTM) refused, as expected:\n  {type(e).__name__}")
    seconds = time.perf_counter() - t0
    print(f"done in {seconds:.1f} s")
    return {"T": T, "losses": losses, "first_loss": losses[0], "final_loss": losses[-1],
            "records": len(history), "exact_records": len(exact),
            "exact_with_state_grad": len(with_state), "skipped": skipped,
            "site": prof.site, "effective_memory": prof.effective_memory(),
            "half_life": prof.half_life(), "state_grad_c": top.c, "highway_share": share,
            "default_refused": default_refused, "lengths_pad_max": len_pad_max,
            "lengths_prof": plen.per_sample, "lengths": lengths, "refused": refused,
            "replay_refused": replay_refused, "seconds": seconds}


if __name__ == "__main__":
    main()
