"""lag_profile's adjoint-sweep path against an independent float64 autograd oracle.

The oracle shares no code with rnnscope: a plain float64 forward of the user's model with the
measured tensor as a leaf, then one torch.autograd.grad per loss position t of Σ_b ℓ_t[b]
(the samples do not interact in these models, so sample b's slice is ∂ℓ_t[b]/∂x_b), and the
norm over features of every step s. Agreement is required to 1e-10, and the result must say
which path computed it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnscope
from rnnscope import lag_sweep

TOL = dict(rtol=1e-10, atol=1e-10)


def close(actual, expected):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), **TOL)


def oracle(model, x, positions, per_step, *, batch_first=True, forward_args=()):
    """(B, P, T) ‖∂ℓ_t/∂x_s‖: per_step(model output) -> (B, T) losses, one grad per position."""
    xl = x.detach().clone().requires_grad_(True)
    losses = per_step(model(xl, *forward_args))
    rows = []
    for t in positions:
        (g,) = torch.autograd.grad(losses[:, t].sum(), xl, retain_graph=True)
        g = g if batch_first else g.transpose(0, 1)  # (B, T, I)
        rows.append(g.norm(dim=-1))
    return torch.stack(rows, dim=1)


def make_rnn(kind, layers, batch_first, I=3, H=5, proj=0):
    if kind == "lstm":
        return nn.LSTM(I, H, num_layers=layers, batch_first=batch_first, proj_size=proj)
    if kind == "gru":
        return nn.GRU(I, H, num_layers=layers, batch_first=batch_first)
    return nn.RNN(I, H, num_layers=layers, batch_first=batch_first,
                  nonlinearity=kind.split("_")[1])


class TimeMixingHead(nn.Module):
    """rnn -> Linear -> a cumulative sum over time: ℓ_t depends on every output step ≤ t (or,
    reversed, ≥ t), so the head's vector-Jacobian product is really exercised."""

    def __init__(self, rnn, reverse=False):
        super().__init__()
        self.rnn = rnn
        out = rnn.proj_size or rnn.hidden_size
        self.proj = nn.Linear(out, 2)
        self.reverse = reverse

    def forward(self, x, hx=None):
        y, state = self.rnn(x, hx)
        tdim = 1 if self.rnn.batch_first else 0
        y = self.proj(y)
        if self.reverse:
            y = y.flip(tdim).cumsum(tdim).flip(tdim)
        else:
            y = y.cumsum(tdim)
        return y, state


def per_step_sum(batch_first):
    def f(out):
        y = out[0]
        y = y if batch_first else y.transpose(0, 1)
        return y.sum(-1)  # (B, T)
    return f


def prepared(model):
    """float64, train mode, some .grad already there and a user hook: all must survive."""
    model = model.double().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.register_forward_hook(lambda m, a, o: None)
    return model


CASES = [(k, L, bf) for k in ("lstm", "gru", "rnn_tanh", "rnn_relu") for L in (1, 2)
         for bf in (True, False)]


@pytest.mark.parametrize("kind,layers,batch_first", CASES)
def test_sweep_matches_oracle_through_a_time_mixing_head(untouched, kind, layers, batch_first):
    snap, check = untouched
    torch.manual_seed(1)
    model = prepared(TimeMixingHead(make_rnn(kind, layers, batch_first)))
    B, T = 3, 11
    x = torch.randn(B, T, 3, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    positions = [0, 4, 7, 10]
    ref = oracle(model, x, positions, per_step_sum(batch_first), batch_first=batch_first)
    before = snap(model)
    lp = rnnscope.lag_profile(model, x, positions=positions)
    check(model, before)
    assert lp.config["method"].startswith(lag_sweep.METHOD), lp.config["method"]
    assert lp.per_sample.shape == (B, 4, T)
    close(lp.per_sample, ref)
    # causal: nothing after a position, something before it (not a trivially zero result)
    future = torch.tensor([[s > t for s in range(T)] for t in positions])
    assert torch.all(lp.per_sample[:, future] == 0)
    if kind != "rnn_relu":
        assert torch.all(lp.per_sample[:, ~future] > 0)
    # the same measured at the submodule by name
    lp_sub = rnnscope.lag_profile(model, x, positions=positions, at="rnn")
    assert lp_sub.config["method"].startswith(lag_sweep.METHOD)
    close(lp_sub.per_sample, ref)


@pytest.mark.parametrize("layers", [1, 2])
def test_sweep_lstm_projection(layers):
    torch.manual_seed(2)
    model = prepared(TimeMixingHead(make_rnn("lstm", layers, True, H=6, proj=3)))
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    positions = [2, 8]
    ref = oracle(model, x, positions, per_step_sum(True))
    lp = rnnscope.lag_profile(model, x, positions=positions)
    assert lp.config["method"].startswith(lag_sweep.METHOD)
    close(lp.per_sample, ref)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("layers", [1, 2])
def test_sweep_reverse_head_final_state_and_initial_state(kind, layers):
    """A head that reaches back from later steps (ℓ_t sees outputs ≥ t), a loss that also uses
    the final states h_n (and c_n), and a given nonzero initial state."""
    torch.manual_seed(3)
    rnn = make_rnn(kind, layers, False)
    model = prepared(TimeMixingHead(rnn, reverse=True))
    B, T = 3, 8
    x = torch.randn(T, B, 3, dtype=torch.float64)
    h0 = torch.randn(layers, B, 5, dtype=torch.float64)
    hx = (h0, torch.randn(layers, B, 5, dtype=torch.float64)) if kind == "lstm" else h0

    def loss(out):
        y, state = out
        states = state if isinstance(state, tuple) else (state,)
        final = sum((s ** 2).sum(-1) for s in states).sum(0)  # (B,) from h_n (and c_n)
        return y.transpose(0, 1).sum(-1) + 0.3 * final.unsqueeze(1)

    positions = [1, 5]
    ref = oracle(model, x, positions, loss, batch_first=False, forward_args=(hx,))
    lp = rnnscope.lag_profile(model, x, positions=positions, loss=loss, forward_args=(hx,))
    assert lp.config["method"].startswith(lag_sweep.METHOD)
    close(lp.per_sample, ref)
    assert torch.all(lp.per_sample > 0)  # every step reaches every loss here


def test_sweep_bare_module_all_positions_and_float32():
    """The module itself as the model (the benchmark's shape), every position; and float32
    inputs give float32-accurate numbers through the same path."""
    torch.manual_seed(4)
    lstm = nn.LSTM(3, 6, batch_first=True).double()
    x = torch.randn(4, 12, 3, dtype=torch.float64)
    ref = oracle(lstm, x, list(range(12)), lambda out: out[0].sum(-1))
    lp = rnnscope.lag_profile(lstm, x, positions=12)
    assert lp.config["method"].startswith(lag_sweep.METHOD)
    close(lp.per_sample, ref)
    lstm32 = lstm.float()
    lp32 = rnnscope.lag_profile(lstm32, x.float(), positions=12)
    assert lp32.config["method"].startswith(lag_sweep.METHOD)
    torch.testing.assert_close(lp32.per_sample, ref, rtol=1e-4, atol=1e-6)


def test_fallback_bidirectional_is_exact():
    torch.manual_seed(5)
    model = prepared(TimeMixingHead(nn.LSTM(3, 5, num_layers=2, batch_first=True,
                                            bidirectional=True).double()))
    model.proj = nn.Linear(10, 2).double()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    ref = oracle(model, x, [0, 3, 6], per_step_sum(True))
    lp = rnnscope.lag_profile(model, x, positions=[0, 3, 6])
    assert not lp.config["method"].startswith(lag_sweep.METHOD)
    assert "bidirectional" in lp.config["method"]
    close(lp.per_sample, ref)


class Residual(nn.Module):
    """The loss reaches the input also around the recurrent module."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 3, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0] + x.cumsum(1)


def test_fallback_when_the_loss_reaches_the_site_around_the_module():
    torch.manual_seed(6)
    model = Residual().double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    ref = oracle(model, x, [1, 5], lambda y: y.sum(-1))
    lp = rnnscope.lag_profile(model, x, positions=[1, 5])
    assert "around the recurrent module" in lp.config["method"]
    close(lp.per_sample, ref)
    # measured at the GRU's input, the residual is not part of the site's gradient: sweep
    inner = oracle(lambda x_: model.rnn(x_)[0], x, [1, 5], lambda y: y.sum(-1))
    lp_sub = rnnscope.lag_profile(model, x, positions=[1, 5], at="rnn")
    assert lp_sub.config["method"].startswith(lag_sweep.METHOD)
    close(lp_sub.per_sample, inner)


def test_fallback_when_a_hook_replaces_the_output(untouched):
    snap, check = untouched
    torch.manual_seed(7)
    model = TimeMixingHead(nn.LSTM(3, 5, batch_first=True)).double()
    model.rnn.register_forward_hook(lambda m, a, out: (out[0] * 2.0, out[1]))
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    ref = oracle(model, x, [2, 5], per_step_sum(True))
    before = snap(model)
    lp = rnnscope.lag_profile(model, x, positions=[2, 5])
    check(model, before)
    assert "replaced" in lp.config["method"]
    close(lp.per_sample, ref)


def test_fallback_training_dropout_between_layers():
    torch.manual_seed(8)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True).double().train()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    lp = rnnscope.lag_profile(lstm, x, positions=[3])
    assert "dropout" in lp.config["method"]
    lstm.eval()
    ref = oracle(lstm, x, [3], lambda out: out[0].sum(-1))
    lp_eval = rnnscope.lag_profile(lstm, x, positions=[3])
    assert lp_eval.config["method"].startswith(lag_sweep.METHOD)
    close(lp_eval.per_sample, ref)


def test_sweep_subclass_that_computes_its_parent():
    class MyLSTM(nn.LSTM):
        pass

    class Doubling(nn.GRU):
        def forward(self, x, hx=None):
            y, h = super().forward(x, hx)
            return 2 * y, h

    torch.manual_seed(9)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    same = MyLSTM(3, 4, batch_first=True).double()
    lp = rnnscope.lag_profile(same, x, positions=[2, 5])
    assert lp.config["method"].startswith(lag_sweep.METHOD)
    close(lp.per_sample, oracle(same, x, [2, 5], lambda out: out[0].sum(-1)))
    other = Doubling(3, 4, batch_first=True).double()
    lp = rnnscope.lag_profile(other, x, positions=[2, 5])
    assert not lp.config["method"].startswith(lag_sweep.METHOD)
    close(lp.per_sample, oracle(other, x, [2, 5], lambda out: out[0].sum(-1)))


class LinearThenRNN(nn.Module):
    """Layers before the recurrence: the model's input is not the recurrent module's input."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 3)
        self.rnn = nn.LSTM(3, 5, batch_first=True)

    def forward(self, x):
        return self.rnn(torch.tanh(self.inp(x)))[0]


def test_site_before_the_recurrence_falls_back_and_the_module_input_sweeps():
    torch.manual_seed(10)
    model = LinearThenRNN().double()
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    ref = oracle(model, x, [3, 6], lambda y: y.sum(-1))
    lp = rnnscope.lag_profile(model, x, positions=[3, 6])
    assert "not the input of one recurrent module call" in lp.config["method"]
    close(lp.per_sample, ref)
    u = torch.tanh(model.inp(x)).detach()
    inner = oracle(lambda u_: model.rnn(u_)[0], u, [3, 6], lambda y: y.sum(-1))
    lp_rnn = rnnscope.lag_profile(model, x, positions=[3, 6], at="rnn")
    assert lp_rnn.config["method"].startswith(lag_sweep.METHOD)
    close(lp_rnn.per_sample, inner)


def test_packed_input_takes_the_general_path():
    from torch.nn.utils.rnn import pack_padded_sequence
    torch.manual_seed(11)
    gru = nn.GRU(3, 4, batch_first=True).double()
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True,
                                  enforce_sorted=False)
    lp = rnnscope.lag_profile(gru, packed, positions=[1, 5])
    assert "packed" in lp.config["method"]


def test_zero_cotangents_give_zero_norms_without_work():
    torch.manual_seed(12)
    gru = nn.GRU(3, 4, batch_first=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    later = (torch.arange(6) >= 3).to(torch.float64)  # losses only from step 3 on

    def loss(out):
        return out[0].sum(-1) * later

    lp = rnnscope.lag_profile(gru, x, positions=[1, 4], loss=loss)
    assert lp.config["method"].startswith(lag_sweep.METHOD)
    close(lp.per_sample, oracle(gru, x, [1, 4], loss))
    assert torch.all(lp.per_sample[:, 0] == 0) and torch.all(lp.per_sample[:, 1, :5] > 0)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_sweep_without_biases(kind):
    torch.manual_seed(13)
    rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}[kind](3, 5, batch_first=True,
                                                                     bias=False)
    model = prepared(TimeMixingHead(rnn))
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    lp = rnnscope.lag_profile(model, x, positions=[3, 7])
    assert lp.config["method"].startswith(lag_sweep.METHOD)
    close(lp.per_sample, oracle(model, x, [3, 7], per_step_sum(True)))


@pytest.mark.parametrize("kind, layers, batch_first, with_trace", [
    ("lstm", 2, True, True), ("gru", 1, False, False), ("rnn_tanh", 3, False, True)])
def test_output_step_sweep_of_the_first_samples_equals_the_whole_sweep_narrowed(
        kind, layers, batch_first, with_trace):
    """samples=n sweeps only the first n samples (reading a whole-batch trace, or the module's
    own output and state) and gives the whole batch's rows for them."""
    torch.manual_seed(5)
    rnn = make_rnn(kind, layers, batch_first).double()
    B, T, P, n = 5, 7, 3, 2
    x = torch.randn(B, T, 3, dtype=torch.float64)
    xin = x if batch_first else x.transpose(0, 1)
    hx = torch.randn(layers, B, 5, dtype=torch.float64)
    hx = (hx, torch.randn_like(hx)) if kind == "lstm" else hx
    out, _ = rnn(xin, hx)
    cot = torch.randn((P,) + tuple(out.shape), dtype=torch.float64)
    trace = rnnscope.replay(rnn, xin, hx) if with_trace else None
    whole = lag_sweep.output_step_lag_norms(rnn, xin, hx, out, cot, trace=trace)
    head = lag_sweep.output_step_lag_norms(rnn, xin, hx, out, cot, trace=trace, samples=n)
    assert head.shape == (n, P, T)
    torch.testing.assert_close(head, whole[:n], rtol=1e-12, atol=1e-15)
