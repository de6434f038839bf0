"""`replay` on a decay recurrence gives a DecayTrace: its states and per-step decays ("gates"),
checked against the independent reference loops of test_modern_cells (the papers' equations),
and the analyses take it as they take a Trace. nn.RNN/LSTM/GRU keep their Trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnnscope import (cell_jacobians, gate_stats, lyapunov_spectrum, replay, state_gradients,
                      step_jacobians)
from rnnscope.modern.decay_trace import DecayTrace
from rnnscope.replay import Trace
from test_modern_cells import REFS, lin, make, make_slstm, ref_slstm, sig, slstm_state0

D64 = torch.float64
KINDS = ["mingru", "minlstm", "lru", "rglru", "s6", "slstm"]


def close(a, b, rtol=1e-10, what=""):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = b.abs().max().clamp(min=1e-300)
    err = ((a - b).abs() / (b.abs() + scale * 1e-6)).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def ref_decay(kind, m, x, state0):
    """a_t (B, T, *S) from the papers' equations, per step (sLSTM: f_t = σ(f̃_t) along the
    unstabilised reference trajectory)."""
    B, T = x.shape[:2]
    if kind == "mingru":
        return torch.stack([1 - sig(lin(x[:, t], m.linear_z)) for t in range(T)], 1)
    if kind == "minlstm":
        out = []
        for t in range(T):
            f, i = sig(lin(x[:, t], m.linear_f)), sig(lin(x[:, t], m.linear_i))
            out.append(f / (f + i))
        return torch.stack(out, 1)
    if kind == "lru":
        lam = torch.polar(torch.exp(-torch.exp(m.nu_log)), torch.exp(m.theta_log))
        return lam.expand(B, T, -1)
    if kind == "rglru":
        out = []
        for t in range(T):
            u = lin(x[:, t], m.linear_u)
            # a_t = σ(Λ)^(c r_t), through log σ(Λ) = −log1p(e^{−Λ})
            out.append(torch.exp(m.c * sig(lin(u, m.gate_a)) * -torch.log1p(torch.exp(-m.a_param))))
        return torch.stack(out, 1)
    if kind == "s6":
        out = []
        for t in range(T):
            u = lin(x[:, t], m.in_proj)
            delta = torch.log1p(torch.exp(lin(lin(u, m.dt_down), m.dt_up)))
            out.append(torch.exp(delta[:, :, None] * -torch.exp(m.A_log)))
        return torch.stack(out, 1)
    H = m.hidden_size
    _, steps = ref_slstm(m, x, state0)
    prev = [state0[0]] + [s[0] for s in steps[:-1]]
    W = torch.cat([m.W_zio[:2 * H], m.W_f, m.W_zio[2 * H:]])
    b = torch.cat([m.b_zio[:2 * H], m.b_f, m.b_zio[2 * H:]])
    f_pre = [(x[:, t] @ W.t() + prev[t] @ m.R.t() + b)[:, 2 * H:3 * H] for t in range(T)]
    f = [torch.exp(v) if m.forget_gate == "exp" else sig(v) for v in f_pre]
    return torch.stack(f, 1)


def case(kind, seed, with_hx, B=3, T=9):
    gen = torch.Generator().manual_seed(seed)
    m = make_slstm(("sigmoid", "exp")[seed % 2], seed) if kind == "slstm" else \
        make(kind, "mid", seed=seed)
    x = torch.randn(B, T, 3, generator=gen, dtype=D64)
    if kind == "slstm":
        s0 = slstm_state0(B, m.hidden_size, gen) if with_hx else \
            tuple(torch.zeros(B, m.hidden_size, dtype=D64) for _ in range(4))
        hx = tuple(p.unsqueeze(0) for p in s0) if with_hx else None
    else:
        s0 = torch.randn(B, *m.state_shape, generator=gen, dtype=D64) if with_hx else \
            torch.zeros(B, *m.state_shape, dtype=D64)
        if kind == "lru":
            s0 = torch.complex(s0, torch.randn_like(s0) if with_hx else torch.zeros_like(s0))
        hx = s0.unsqueeze(0) if with_hx else None
    return m, x, s0, hx


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed,with_hx", [(1, False), (2, True), (5, True)])
def test_replay_exposes_states_and_decays_of_the_reference_loop(kind, seed, with_hx):
    m, x, s0, hx = case(kind, seed, with_hx)
    tr = replay(m, x, hx)
    assert isinstance(tr, DecayTrace) and not isinstance(tr, Trace)
    with torch.no_grad():
        want_a = ref_decay(kind, m, x, s0)
        if kind == "slstm":
            want_h, _ = ref_slstm(m, x, s0)
        else:
            _, want_h = REFS[kind](m, x, s0)
        out, h_n = m(x, hx)
    close(tr.decay.detach(), want_a, what=f"{kind} decay")
    close(tr.h.detach(), want_h, what=f"{kind} states")
    close(tr.gates["a"].detach(), want_a.abs().reshape(x.shape[0], x.shape[1], -1),
          what=f"{kind} gates['a'] = |a_t|")
    close(tr.output.detach(), out, what="output as module(x, hx)")
    for got, want in zip(h_n if kind == "slstm" else (h_n,), tr.h_n if kind == "slstm"
                         else (tr.h_n,)):
        close(got.detach(), want.detach(), what="h_n as module(x, hx)")
    # part of the parameters' graph, as a Trace's tensors: gradients equal the reference's
    params = [p for p in m.parameters()]
    g1 = torch.autograd.grad(tr.gates["a"].pow(2).sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(ref_decay(kind, m, x, s0).abs().pow(2).sum(), params,
                             allow_unused=True)
    for p, a, b in zip(params, g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b, rtol=1e-9, what=f"{kind} ∂Σ|a|²/∂{tuple(p.shape)}")


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_time_major_and_unbatched(kind):
    m, x, s0, hx = case(kind, 3, False, B=2)
    m.batch_first = False
    tr = replay(m, x.transpose(0, 1))
    m.batch_first = True
    close(tr.decay.detach(), replay(m, x).decay.detach(), what="time-major inputs")
    un = replay(m, x[0])
    assert un.unbatched and un.decay.shape[0] == 1
    close(un.decay.detach(), replay(m, x).decay.detach()[:1], what="unbatched")


@pytest.mark.parametrize("kind", KINDS)
def test_analyses_take_the_decay_trace(kind):
    m, x, s0, hx = case(kind, 4, True)
    tr = replay(m, x, hx)
    assert gate_stats(tr).to_dict() == gate_stats(m, x, hx).to_dict()
    a = cell_jacobians(tr, keep="full")
    b = cell_jacobians(m, x, hx, keep="full")
    close(a.total.abs() if a.total.is_complex() else a.total,
          b.total.abs() if b.total.is_complex() else b.total, rtol=0, what="cell_jacobians")
    assert torch.equal(step_jacobians(tr).direct, step_jacobians(m, x, hx).direct)
    assert torch.equal(state_gradients(tr).layers[0][0].h, state_gradients(m, x, hx).layers[0][0].h)
    ex1, ex2 = lyapunov_spectrum(tr).exponents, lyapunov_spectrum(m, x, hx).exponents
    assert torch.equal(ex1.nan_to_num(), ex2.nan_to_num())
    with pytest.raises(TypeError, match="do not pass inputs or hx"):
        gate_stats(tr, x)


def test_gate_stats_of_the_trace_is_the_memory_time_of_its_gates():
    m, x, _, _ = case("rglru", 6, False)
    tr = replay(m, x)
    lay = gate_stats(tr).layers[0]
    mean = tr.gates["a"].detach().mean((0, 1))
    close(lay.unit_mean, mean, what="unit mean")
    close(lay.memory_time, 1 / (1 - mean), what="memory time")


def test_fused_modules_keep_their_trace_and_decay_modules_refuse_rng_state():
    lstm = nn.LSTM(3, 4, batch_first=True)
    tr = replay(lstm, torch.randn(2, 5, 3))
    assert isinstance(tr, Trace) and set(tr.layers[0][0].gates) == {"i", "f", "g", "o"}
    m, x, _, _ = case("mingru", 1, False)
    with pytest.raises(ValueError, match="without rng_state"):
        replay(m, x, rng_state=torch.get_rng_state())


def test_third_party_protocol_module_replays_without_an_output():
    class Leaky(nn.Module):  # h_t = σ(w) ⊙ h_{t−1} + W x_t, nothing but the protocol
        linear_in_state = True

        def __init__(self):
            super().__init__()
            self.w, self.inp = nn.Parameter(torch.randn(4)), nn.Linear(3, 4)

        def decay(self, x):
            return torch.sigmoid(self.w).expand(x.shape[0], x.shape[1], 4)

        def hidden_states(self, x, hx=None):
            h, hs = torch.zeros(x.shape[0], 4), []
            for x_t in self.inp(x).unbind(1):
                h = torch.sigmoid(self.w) * h + x_t
                hs.append(h)
            return torch.stack(hs, 1)

    leaky, x = Leaky(), torch.randn(2, 6, 3)
    tr = replay(leaky, x)
    assert tr.kind == "protocol" and tr.output is None and tr.h_n is None
    close(tr.gates["a"].detach(), torch.sigmoid(leaky.w).detach().expand(2, 6, 4), what="σ(w)")
    assert gate_stats(tr).to_dict() == gate_stats(leaky, x).to_dict()
