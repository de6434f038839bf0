"""One replay, many analyses: every analysis given a `Trace` from `replay` returns what it
returns given (module, inputs, hx), exactly, and refuses to mix the two forms."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnscope

MODULES = {
    "lstm-2l-bi-proj": lambda: nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4),
    "gru-2l": lambda: nn.GRU(3, 5, num_layers=2, batch_first=True),
    "rnn-relu": lambda: nn.RNN(3, 5, nonlinearity="relu"),
}


def _inputs(module, B=3, T=7, packed=False):
    torch.manual_seed(1)
    x = torch.randn(B, T, 3, dtype=torch.float64)
    if packed:
        return pack_padded_sequence(x if module.batch_first else x.transpose(0, 1),
                                    torch.tensor([7, 4, 2]), batch_first=module.batch_first,
                                    enforce_sorted=False)
    return x if module.batch_first else x.transpose(0, 1)


def _same(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("name", list(MODULES))
def test_jacobian_analyses_from_one_trace(name, packed):
    torch.manual_seed(0)
    m = MODULES[name]().double()
    x = _inputs(m, packed=packed)
    with torch.no_grad():
        tr = rnnscope.replay(m, x)
    spec = tr.spec
    for layer in range(spec.num_layers):
        for d in range(spec.num_directions):
            kw = dict(layer=layer, direction=d)
            a, b = rnnscope.cell_jacobians(m, x, **kw), rnnscope.cell_jacobians(tr, **kw)
            for f in ("total", "direct", "spectral", "frobenius", "share"):
                _same(getattr(a, f), getattr(b, f))
            a, b = rnnscope.step_jacobians(m, x, **kw), rnnscope.step_jacobians(tr, **kw)
            _same(a.direct, b.direct)
            _same(a.indirect, b.indirect)
            _same(rnnscope.lyapunov_spectrum(m, x, k=2, **kw).exponents,
                  rnnscope.lyapunov_spectrum(tr, k=2, **kw).exponents)
    if spec.kind != "rnn":
        a, b = rnnscope.gate_stats(m, x), rnnscope.gate_stats(tr)
        for la, lb in zip(a.layers, b.layers):
            assert la.mean == lb.mean and la.quantiles == lb.quantiles
            _same(la.unit_mean, lb.unit_mean)


@pytest.mark.parametrize("loss", ["last", "all"])
@pytest.mark.parametrize("name", list(MODULES))
def test_state_gradients_from_one_trace_twice(name, loss):
    torch.manual_seed(0)
    m = MODULES[name]().double()
    x = _inputs(m)
    ref = rnnscope.state_gradients(m, x, loss=loss, keep="full")
    tr = rnnscope.replay(m, x.requires_grad_(True))
    for _ in range(2):  # the trace's graph is kept: it serves again
        got = rnnscope.state_gradients(tr, loss=loss, keep="full")
        for la, lb in zip(ref.layers, got.layers):
            for da, db in zip(la, lb):
                for f in ("h", "c", "h_full", "c_full"):
                    if getattr(da, f) is not None:
                        torch.testing.assert_close(getattr(da, f), getattr(db, f),
                                                   rtol=1e-12, atol=0)
    assert all(p.grad is None for p in m.parameters())


def test_trace_forms_refuse_what_they_cannot_use():
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        tr = rnnscope.replay(m, x)
    with pytest.raises(TypeError, match="given a Trace from replay"):
        rnnscope.cell_jacobians(tr, x)
    # a graph-less trace of an unpacked batch is swept in closed form (float32 rounding apart,
    # what autograd gives); a packed one is differentiated through its graph, which it must have
    sg = rnnscope.state_gradients(tr)
    torch.testing.assert_close(sg.layers[0][0].c, rnnscope.state_gradients(m, x).layers[0][0].c,
                               rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        packed = rnnscope.replay(m, pack_padded_sequence(x, torch.tensor([5, 3]),
                                                         batch_first=True))
    with pytest.raises(ValueError, match="needs a Trace with a graph"):
        rnnscope.state_gradients(packed)
    with pytest.raises(ValueError, match="method='autograd' runs the module itself"):
        rnnscope.step_jacobians(tr, method="autograd")
