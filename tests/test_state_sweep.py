"""state_sweep: total state gradients of given cotangents by a closed-form sweep, against
autograd through the replay's graph (`trace_state_gradients`), and the monitor's use of it."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnscope
from rnnscope.jacobians import trace_state_gradients
from rnnscope.monitor import capture
from rnnscope.state_sweep import can_sweep, sweep_state_gradients

CONFIGS = [c for c in itertools.product(
    ["LSTM", "GRU", "RNN"], [1, 3], [False, True], [True, False], [0, 3], [0.0, 0.4])
    if not (c[4] and c[0] != "LSTM")]


def _module(kind, layers, bidirectional, batch_first, proj, dropout, dtype=torch.float64):
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
              dropout=dropout if layers > 1 else 0.0)
    if proj:
        kw["proj_size"] = proj
    if kind == "RNN":
        kw["nonlinearity"] = "relu" if layers == 3 else "tanh"
    m = getattr(nn, kind)(4, 5, **kw).to(dtype)
    return m.train(dropout > 0)


def _cotangents(m, B, T, g, dtype):
    D = 2 if m.bidirectional else 1
    Ho = m.proj_size or m.hidden_size
    L = m.num_layers
    go = torch.randn(B, T, D * Ho, generator=g, dtype=dtype)
    ghn = torch.randn(L * D, B, Ho, generator=g, dtype=dtype)
    gcn = torch.randn(L * D, B, m.hidden_size, generator=g, dtype=dtype) \
        if isinstance(m, nn.LSTM) else None
    return go, ghn, gcn


def _autograd(m, x, rng, go, ghn, gcn):
    tr = rnnscope.replay(m, x.detach().requires_grad_(True), rng_state=rng)
    outs = [tr.output, tr.h_n] + ([tr.c_n] if gcn is not None else [])
    gouts = [go if m.batch_first else go.transpose(0, 1), ghn] + ([gcn] if gcn is not None
                                                                  else [])
    return trace_state_gradients(tr, outs, gouts)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_sweep_equals_autograd_through_the_replay(config):
    """Every layer and direction, projections, dropout masks redrawn in training mode, both
    layouts: the sweep on a graph-less replay gives autograd's norms to float64 rounding."""
    torch.manual_seed(0)
    m = _module(*config)
    g = torch.Generator().manual_seed(1)
    B, T = 3, 7
    x = torch.randn((B, T, 4) if m.batch_first else (T, B, 4), generator=g, dtype=torch.float64)
    go, ghn, gcn = _cotangents(m, B, T, g, torch.float64)
    rng = torch.get_rng_state()
    ref = _autograd(m, x, rng, go, ghn, gcn)
    with torch.no_grad():
        tr = rnnscope.replay(m, x, rng_state=rng)
    assert tr.output.grad_fn is None
    got = sweep_state_gradients(tr, go, ghn, gcn)
    for a_dirs, b_dirs in zip(ref.layers, got.layers):
        for a, b in zip(a_dirs, b_dirs):
            torch.testing.assert_close(b.h, a.h, rtol=1e-12, atol=1e-300)
            if a.c is not None:
                torch.testing.assert_close(b.c, a.c, rtol=1e-12, atol=1e-300)


def test_sweep_of_the_first_samples_and_missing_cotangents():
    """samples=k sweeps the first k samples only; absent cotangents count as zero; float32."""
    torch.manual_seed(0)
    m = nn.LSTM(4, 6, num_layers=2, batch_first=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 9, 4, generator=g)
    go, ghn, gcn = _cotangents(m, 5, 9, g, torch.float32)
    ref = _autograd(m, x[:2], None, go[:2], torch.zeros_like(ghn[:, :2]), gcn[:, :2])
    with torch.no_grad():
        tr = rnnscope.replay(m, x)
    got = sweep_state_gradients(tr, go[:2], None, gcn[:, :2], samples=2)
    for a_dirs, b_dirs in zip(ref.layers, got.layers):
        for a, b in zip(a_dirs, b_dirs):
            assert b.h.shape == (2, 9)
            torch.testing.assert_close(b.h, a.h, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(b.c, a.c, rtol=1e-5, atol=1e-7)


def test_nonfinite_cotangents_are_counted_as_autograd_counts_them():
    m = nn.GRU(3, 4, num_layers=2).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    go, ghn, _ = _cotangents(m, 2, 6, g, torch.float64)
    go[1, 3, 0] = float("nan")
    ref = _autograd(m, x, None, go, ghn, None)
    with torch.no_grad():
        got = sweep_state_gradients(rnnscope.replay(m, x), go, ghn)
    for a_dirs, b_dirs in zip(ref.layers, got.layers):
        for a, b in zip(a_dirs, b_dirs):
            assert a.nonfinite == b.nonfinite > 0
            torch.testing.assert_close(b.h, a.h, rtol=1e-12, atol=0, equal_nan=True)


def test_packed_and_cell_traces_are_refused():
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    with torch.no_grad():
        tr = rnnscope.replay(m, packed)
        cell = rnnscope.replay(nn.LSTMCell(3, 4), x)
    assert not can_sweep(tr) and not can_sweep(cell)
    with pytest.raises(ValueError, match="trace_state_gradients"):
        sweep_state_gradients(tr, None)


def test_the_monitor_replays_a_tensor_call_without_a_graph_and_a_packed_one_with():
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    plain = capture.Replayed(m, rnnscope.recurrent.describe(m),
                             capture.Call(x=x, grad_out={"out": torch.ones(2, 5, 4)}, n=2), 2)
    assert plain.swept and plain.trace.output.grad_fn is None
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    rep = capture.Replayed(m, rnnscope.recurrent.describe(m),
                           capture.Call(x=packed, grad_out={"out": torch.ones(2, 5, 4)}, n=2), 2)
    assert not rep.swept and rep.trace.output.data.grad_fn is not None
    assert set(plain.state_parts) == set(rep.state_parts) == {(0, 0)}


@pytest.mark.parametrize("loss", ["last", "all", "callable"])
def test_state_gradients_of_a_graph_less_trace_is_swept_and_equals_the_module_form(loss):
    """state_gradients(trace) of a replay made under no_grad: the loss on the top output is
    differentiated alone and the recurrence swept; keep="full" keeps the same gradients."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2).double()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    fn = (lambda out: (out ** 2).sum((1, 2))) if loss == "callable" else loss
    ref = rnnscope.state_gradients(m, x, loss=fn, keep="full")
    with torch.no_grad():
        tr = rnnscope.replay(m, x)
    got = rnnscope.state_gradients(tr, loss=fn, keep="full")
    assert got.loss == ref.loss
    for a_dirs, b_dirs in zip(ref.layers, got.layers):
        for a, b in zip(a_dirs, b_dirs):
            for f in ("h", "c", "h_full", "c_full"):
                torch.testing.assert_close(getattr(b, f), getattr(a, f), rtol=1e-12, atol=1e-300)
