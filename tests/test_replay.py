import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import rnnscope
from reference import KINDS, reference_forward

@st.composite
def configs(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    cfg = dict(input_size=draw(st.integers(1, 5)), hidden_size=draw(st.integers(1, 6)),
               num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
               batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    if kind == "lstm" and draw(st.booleans()) and cfg["hidden_size"] > 1:
        cfg["proj_size"] = draw(st.integers(1, cfg["hidden_size"] - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    with_hx = draw(st.booleans())
    unbatched = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return kind, cfg, dtype, B, T, with_hx, unbatched, seed


def _unpack(kind, out):
    o, hx = out
    return (o, hx[0], hx[1]) if kind == "lstm" else (o, hx, None)


def _make(kind, cfg, dtype, B, T, with_hx, unbatched, seed):
    torch.manual_seed(seed)
    m = KINDS[kind](**cfg).to(dtype)
    L, D = cfg["num_layers"], 2 if cfg["bidirectional"] else 1
    H, P = cfg["hidden_size"], cfg.get("proj_size", 0) or cfg["hidden_size"]
    if unbatched:
        x = torch.randn(T, cfg["input_size"], dtype=dtype)
        hshape, cshape = (L * D, P), (L * D, H)
    else:
        x = torch.randn(B, T, cfg["input_size"], dtype=dtype)
        if not cfg["batch_first"]:
            x = x.transpose(0, 1).contiguous()
        hshape, cshape = (L * D, B, P), (L * D, B, H)
    hx = None
    if with_hx:
        hx = torch.randn(hshape, dtype=dtype)
        if kind == "lstm":
            hx = (hx, torch.randn(cshape, dtype=dtype))
    return m, x, hx


@given(configs())
def test_replay_equals_module_outputs_and_gradients(config):
    kind, cfg, dtype, *_ = config
    m, x, hx = _make(*config)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    ref = _unpack(kind, m(x, hx))
    tr = rnnscope.replay(m, x, hx)
    got = (tr.output, tr.h_n, tr.c_n)
    for a, b in zip(got, ref):
        if b is None:
            assert a is None
        else:
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= tol
    # gradients through the trace equal gradients through the module
    w = [torch.randn_like(t) for t in ref if t is not None]
    params = list(m.parameters())
    g_mod = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(
        [t for t in ref if t is not None], w)), params, allow_unused=True)
    g_rep = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(
        [t for t in got if t is not None], w)), params, allow_unused=True)
    gtol = 1e-4 if dtype == torch.float32 else 1e-9
    for a, b in zip(g_rep, g_mod):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max().item() <= gtol * (1 + b.abs().max().item())


@given(configs())
def test_layer_states_and_gates_match_reference_loop(config):
    kind, cfg, dtype, B, T, with_hx, unbatched, seed = config
    m, x, hx = _make(kind, cfg, torch.float64, B, T, with_hx, False, seed)
    tr = rnnscope.replay(m, x, hx)
    xb = x if cfg["batch_first"] else x.transpose(0, 1)
    out, h_n, c_n, states = reference_forward(m, xb, hx)
    D = 2 if cfg["bidirectional"] else 1
    for layer in range(cfg["num_layers"]):
        for d in range(D):
            lt = tr.layers[layer][d]
            ref_h = torch.stack([s[0] for s in states[layer][d]], 1)  # processing order
            assert torch.allclose(lt.in_steps(lt.h), ref_h, atol=1e-12)
            assert lt.h.shape == (B, T, cfg.get("proj_size", 0) or cfg["hidden_size"])
            if kind == "lstm":
                ref_c = torch.stack([s[1] for s in states[layer][d]], 1)
                assert torch.allclose(lt.in_steps(lt.c), ref_c, atol=1e-12)
                assert set(lt.gates) == {"i", "f", "g", "o"}
            elif kind == "gru":
                assert set(lt.gates) == {"r", "z", "n"}
            for g in lt.gates.values():
                assert g.shape == (B, T, cfg["hidden_size"])


def test_lstm_gates_recompute_the_states():
    """The exposed gates are the ones the states were computed from: c_t = f c_{t-1} + i g."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, batch_first=True, bidirectional=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    tr = rnnscope.replay(m, x)
    for lt in tr.layers[0]:
        g = {k: lt.in_steps(v) for k, v in lt.gates.items()}
        c = lt.in_steps(lt.c)
        c_prev = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], 1)
        assert torch.allclose(c, g["f"] * c_prev + g["i"] * g["g"], atol=1e-12)
        assert torch.allclose(lt.in_steps(lt.h), g["o"] * torch.tanh(c), atol=1e-12)


def test_gru_retain_gate_semantics():
    torch.manual_seed(0)
    m = nn.GRU(3, 4, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    lt = rnnscope.replay(m, x).layers[0][0]
    h = lt.h
    h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
    z, n = lt.gates["z"], lt.gates["n"]
    assert torch.allclose(h, (1 - z) * n + z * h_prev, atol=1e-12)


@pytest.mark.parametrize("cell_cls", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_cells_are_unrolled_over_a_sequence(cell_cls):
    torch.manual_seed(0)
    cell = cell_cls(3, 5).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    tr = rnnscope.replay(cell, x)
    state = None
    outs = []
    for t in range(7):
        state = cell(x[:, t], state)
        outs.append(state[0] if isinstance(state, tuple) else state)
    assert torch.allclose(tr.output, torch.stack(outs, 1), atol=1e-12)
    assert torch.allclose(tr.h_n, outs[-1], atol=1e-12)


def test_dropout_in_training_mode_is_refused_with_advice():
    m = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    with pytest.raises(ValueError, match=r"dropout=0.5.*module.eval\(\)"):
        rnnscope.replay(m, torch.randn(5, 2, 3))
    m.eval()
    tr = rnnscope.replay(m, torch.randn(5, 2, 3))
    assert tr.output.shape == (5, 2, 4)


@pytest.mark.parametrize("bad, exc, msg", [
    (torch.randn(2, 5, 7), ValueError, r"\(B, T, I=3\).*got \(2, 5, 7\)"),
    (torch.randn(2, 5, 3, 1), ValueError, r"got \(2, 5, 3, 1\)"),
    (torch.zeros(2, 0, 3), ValueError, "empty time"),
    (torch.zeros(2, 5, 3, dtype=torch.long), TypeError, "floating-point"),
    (torch.randn(2, 5, 3, dtype=torch.float64), TypeError, "float64.*float32"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_inputs_get_clear_errors(bad, exc, msg):
    m = nn.LSTM(3, 4, batch_first=True)
    with pytest.raises(exc, match=msg):
        rnnscope.replay(m, bad)


def test_bad_hx_and_unsupported_modules():
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match=r"tuple of two tensors \(h0, c0\); got a Tensor"):
        rnnscope.replay(m, x, torch.zeros(1, 2, 4))
    h = torch.zeros(1, 2, 4)
    with pytest.raises(TypeError, match=r"\(h0, c0\); got a tuple of 3"):
        rnnscope.replay(m, x, (h, h, h))
    with pytest.raises(TypeError, match=r"h0 for this LSTM must be a tensor; got NoneType.*hx=None"):
        rnnscope.replay(m, x, (None, None))
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 2, 4\)"):
        rnnscope.replay(m, x, (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)))

    class MyLSTM(nn.LSTM):
        pass

    sub = MyLSTM(3, 4)  # its forward is nn.LSTM's: accepted (refusals: test_replay_real.py)
    torch.testing.assert_close(rnnscope.replay(sub, x).output, sub(x)[0])
    with pytest.raises(TypeError, match="cannot replay a Linear"):
        rnnscope.replay(nn.Linear(3, 4), x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rnnscope.replay("lstm", x)


def test_replay_uses_the_modules_own_parameters():
    m = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    tr = rnnscope.replay(m, x)
    tr.output.sum().backward()
    assert m.weight_hh_l0.grad is not None and m.weight_hh_l0.grad.abs().sum() > 0
    with torch.no_grad():
        m.weight_hh_l0.mul_(0.5)
    assert torch.allclose(rnnscope.replay(m, x).output, m(x)[0], atol=1e-6)
