"""The analyses on decay recurrences (rnnscope.modern.protocol / analyses) against float64
autograd oracles, for every built-in modern cell and for a third-party module that implements
only the protocol.

Oracles share no code with the closed forms: they run the cell's `step` one step at a time
(itself checked against the papers' equations in test_modern_cells.py) and differentiate that
loop with torch.autograd. Complex states (the LRU) are checked on their real form (Re, Im):
diag(λ) is then 2×2 scaled rotations.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnnscope import (LRU, RGLRU, SLSTM, MinGRU, MinLSTM, SelectiveSSM, cell_jacobians,
                      gate_stats, gradient_profile, lag_profile, lyapunov_spectrum,
                      state_gradients, step_jacobians)
from rnnscope.modern.protocol import describe_decay

D64 = torch.float64
RTOL = 1e-8
KINDS = ["mingru", "minlstm", "lru", "rglru", "s6", "slstm"]


def close(a, b, rtol=RTOL, what=""):
    """|a − b| ≤ rtol·(|b| + 1e-6·max|b|): relative, with a floor at a millionth of the scale."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = b.abs().max().clamp(min=1e-300)
    err = ((a - b).abs() / (b.abs() + scale * 1e-6)).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def make(kind, seed=0, I=3, H=4):
    torch.manual_seed(seed)
    if kind == "mingru":
        return MinGRU(I, H, dtype=D64)
    if kind == "minlstm":
        return MinLSTM(I, H, dtype=D64)
    if kind == "lru":
        return LRU(I, H, dtype=D64, r_min=0.5, r_max=0.99)
    if kind == "rglru":
        return RGLRU(I, H, dtype=D64)
    if kind == "s6":
        m = SelectiveSSM(I, H, state_size=3, dtype=D64)
        with torch.no_grad():
            m.dt_up.bias.fill_(0.5)  # Δ ~ 1: decays well away from 1
        return m
    m = SLSTM(I, H, dtype=D64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # both branches of the stabiliser's max are taken
    return m


def initial_state(kind, m, B, gen):
    """A random initial state as the cell's `step` takes it, and as `hx` for the module."""
    if kind == "slstm":
        H = m.hidden_size
        s = (torch.randn(B, H, generator=gen, dtype=D64),
             torch.randn(B, H, generator=gen, dtype=D64),
             torch.rand(B, H, generator=gen, dtype=D64) + 0.5,
             torch.randn(B, H, generator=gen, dtype=D64))
        return s, tuple(p.unsqueeze(0) for p in s)
    h = torch.randn(B, *m.state_shape, generator=gen, dtype=D64)
    if kind == "lru":
        h = torch.complex(h, torch.randn(B, *m.state_shape, generator=gen, dtype=D64))
    return h, h.unsqueeze(0)


def case(kind, seed=0, B=2, T=7):
    m = make(kind, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(B, T, 3, generator=gen, dtype=D64)
    s0, hx = initial_state(kind, m, B, gen)
    return m, x, s0, hx


# --- the oracle: the step loop, differentiated by autograd on the real form of the state --------

def flat(kind, s):
    """State -> (B, M) real: sLSTM (h, c, n, m) concatenated; complex -> (Re, Im)."""
    if kind == "slstm":
        return torch.cat(s, -1)
    v = s.reshape(s.shape[0], -1)
    return torch.cat([v.real, v.imag], -1) if v.is_complex() else v


def unflat(kind, m, v):
    if kind == "slstm":
        return tuple(v.chunk(4, -1))
    if kind == "lru":
        N = v.shape[-1] // 2
        return torch.complex(v[:, :N], v[:, N:])
    return v.reshape(v.shape[0], *m.state_shape)


def run(m, x, s, start, stop):
    for t in range(start, stop):
        s = m.step(x[:, t], s)
    return s


def states(m, x, s0):
    out, s = [], s0
    for t in range(x.shape[1]):
        s = m.step(x[:, t], s)
        out.append(s)
    return out


def oracle_span(kind, m, x, s0, n_from, n_to):
    """(B, M, M) real ∂s_{n_to}/∂s_{n_from} by autograd through the loop."""
    traj = states(m, x, s0)
    B = x.shape[0]
    v0 = flat(kind, traj[n_from]).detach()

    def f(v):
        return flat(kind, run(m, x, unflat(kind, m, v), n_from + 1, n_to + 1))

    J = torch.autograd.functional.jacobian(f, v0)  # (B, M, B, M)
    return torch.stack([J[b, :, b] for b in range(B)])


def oracle_step(kind, m, x, s0, n):
    """(B, M, M) ∂s_n/∂s_{n−1}."""
    prev = s0 if n == 0 else states(m, x, s0)[n - 1]
    v0 = flat(kind, prev).detach()

    def f(v):
        return flat(kind, m.step(x[:, n], unflat(kind, m, v)))

    J = torch.autograd.functional.jacobian(f, v0)
    return torch.stack([J[b, :, b] for b in range(x.shape[0])])


def real_form(D):
    """(..., N, N) complex -> (..., 2N, 2N) real acting on (Re, Im)."""
    return torch.cat([torch.cat([D.real, -D.imag], -1), torch.cat([D.imag, D.real], -1)], -2)


# --- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_step_jacobians_match_autograd(kind):
    m, x, s0, hx = case(kind)
    res = step_jacobians(m, x, hx, keep="full")
    for n in range(x.shape[1]):
        got = res.total[:, n]
        if kind == "lru":
            got = real_form(got)
        close(got, oracle_step(kind, m, x, s0, n), what=f"{kind} step {n}")
    if kind != "slstm":  # linear in h: the decay is the whole step Jacobian
        assert float(res.indirect.abs().max()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_cell_jacobians_match_autograd_span_products(kind):
    m, x, s0, hx = case(kind)
    T = x.shape[1]
    res = cell_jacobians(m, x, hx, keep="full")
    assert res.highway_is_whole == (kind != "slstm")
    for n in range(T - 1):
        want = oracle_span(kind, m, x, s0, n, T - 1)
        got = real_form(res.total[:, n]) if kind == "lru" else res.total[:, n]
        close(got, want, what=f"{kind} span from step {n}")
        close(res.spectral[:, n], torch.linalg.matrix_norm(want, ord=2), what="‖J‖₂")
        # norms of the complex matrix: its real form's Frobenius norm is √2 larger
        frob = torch.linalg.matrix_norm(want) / (math.sqrt(2) if kind == "lru" else 1)
        close(res.frobenius[:, n], frob, what="‖J‖_F")
    if kind != "slstm":  # the highway is J itself
        close(torch.diag_embed(res.direct), res.total, what="diag(direct) == total")
        assert bool((res.share == 1).all())
    else:  # the direct path: ∏ f' on the c and n blocks
        f = m.highway(x, hx)
        prod = torch.ones_like(f[:, 0])
        for n in range(T - 2, -1, -1):
            prod = prod * f[:, n + 1]
            H = m.hidden_size
            close(res.direct[:, n, H:2 * H], prod, what="∏f' on c")
            close(res.direct[:, n, 2 * H:3 * H], prod, what="∏f' on n")


@pytest.mark.parametrize("kind", KINDS)
def test_lyapunov_spectrum_matches_qr_on_autograd_jacobians(kind):
    m, x, s0, hx = case(kind, T=9)
    T = x.shape[1]
    Js = [oracle_step(kind, m, x, s0, n) for n in range(T)]
    B, M = Js[0].shape[:2]
    Q = torch.eye(M, dtype=D64).expand(B, M, M)
    logs = torch.zeros(B, M, dtype=D64)
    for n, J in enumerate(Js):
        Q, R = torch.linalg.qr(J @ Q)
        if n >= 2:  # warmup 2: the frame evolves through the first two steps uncounted
            logs += torch.diagonal(R, dim1=-2, dim2=-1).abs().log()
    want = (logs / (T - 2)).sort(-1, descending=True).values
    got = lyapunov_spectrum(m, x, hx, warmup=2).exponents
    if kind == "lru":  # each complex unit is a 2×2 scaled rotation: its exponent twice
        want = want[:, 0::2]
    if kind == "slstm":  # the top H: the rest include the stabiliser's exactly singular steps
        got, want = got[:, :m.hidden_size], want[:, :m.hidden_size]
    close(got, want, rtol=1e-7, what=f"{kind} exponents")
    if kind != "slstm":  # diagonal: the k largest exactly (QR from a fixed frame of k < M
        # columns converges to the top subspace only over long runs)
        k2 = lyapunov_spectrum(m, x, hx, warmup=2, k=2).exponents
        close(k2, got[:, :2], rtol=1e-7, what="k=2 is the top of the spectrum")


def oracle_state_gradients(kind, m, x, s0, loss):
    traj = states(m, x, s0)
    hs = [s[0] if kind == "slstm" else s for s in traj]
    seq = torch.stack(hs, 1)
    y = seq if kind == "slstm" else m.readout(x, seq)
    if loss == "last":
        L = y[:, -1].sum()
    elif loss == "all":
        L = y.sum()
    else:
        L = loss(y).sum()
    targets = hs + ([s[1] for s in traj] if kind == "slstm" else [])
    grads = torch.autograd.grad(L, targets)
    T = x.shape[1]
    gh = torch.stack(grads[:T], 1).reshape(x.shape[0], T, -1)
    gc = torch.stack(grads[T:], 1) if kind == "slstm" else None
    return gh, gc


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", ["last", "all", "weighted"])
def test_state_gradients_match_autograd_through_the_loop(kind, loss):
    m, x, s0, hx = case(kind)
    if loss == "weighted":
        w = torch.linspace(-1.0, 2.0, x.shape[1], dtype=D64)
        loss = lambda y: (y.pow(2).sum(-1) * w).sum(1)  # noqa: E731
    res = state_gradients(m, x, hx, loss=loss, keep="full")
    gh, gc = oracle_state_gradients(kind, m, x, s0, loss)
    lay = res.layers[0][0]
    close(lay.h_full, gh, what=f"{kind} ∂L/∂h_t")
    close(lay.h, gh.abs().norm(dim=-1), what="norms")
    if kind == "slstm":
        close(lay.c_full, gc, what="sLSTM ∂L/∂c_t")
    else:
        assert lay.c is None


@pytest.mark.parametrize("kind", KINDS)
def test_gate_stats_is_the_decay(kind):
    m, x, s0, hx = case(kind)
    st = gate_stats(m, x, hx)
    lay = st.layers[0]
    T = x.shape[1]
    if kind == "slstm":  # the forget gate f_t along the trajectory, from the equations
        traj = [s0] + states(m, x, s0)[:-1]
        H = m.hidden_size
        R_f = m.R[2 * H:3 * H]
        f = torch.stack([torch.sigmoid(x[:, t] @ m.W_f.t() + m.b_f + traj[t][0] @ R_f.t())
                         for t in range(T)], 1)
        mags = f
    else:  # |diagonal| of the autograd step Jacobian (|λ| = sqrt(det) of a 2×2 block for the LRU)
        Js = torch.stack([oracle_step(kind, m, x, s0, n) for n in range(T)], 1)
        d = torch.diagonal(Js, dim1=-2, dim2=-1)
        if kind == "lru":
            N = d.shape[-1] // 2
            d = torch.sqrt(Js[..., :N, :N].diagonal(dim1=-2, dim2=-1) ** 2
                           + Js[..., N:, :N].diagonal(dim1=-2, dim2=-1) ** 2)
        mags = d.abs()
    want = mags.mean((0, 1))
    close(lay.unit_mean, want, what=f"{kind} mean decay per unit")
    close(lay.memory_time, 1 / (1 - want), what="memory time 1/(1 − |a|)")
    assert lay.gate == "decay" and st.kind == describe_decay(m).kind
    close(torch.tensor(lay.mean, dtype=D64), mags.mean(), what="mean")


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_and_lag_profiles_match_autograd(kind):
    m, x, s0, hx = case(kind)
    prof = gradient_profile(m, x)  # time dim read from the module itself
    # the profile runs forward without hx: compare with zero initial state
    zero = initial_state(kind, m, x.shape[0], torch.Generator().manual_seed(0))[0]
    zero = tuple(torch.zeros_like(p) for p in zero) if kind == "slstm" else torch.zeros_like(zero)
    xg = x.clone().requires_grad_(True)
    y = torch.stack([s[0] if kind == "slstm" else s for s in states(m, xg, zero)], 1)
    y = y if kind == "slstm" else m.readout(xg, y)
    (g,) = torch.autograd.grad(y[:, -1].sum(), xg)
    close(prof.per_sample, g.norm(dim=-1), what=f"{kind} ‖∂L/∂x_t‖")
    lag = lag_profile(m, x, positions=[2, 6])
    for p, t in enumerate([2, 6]):
        xg = x.clone().requires_grad_(True)
        y = torch.stack([s[0] if kind == "slstm" else s for s in states(m, xg, zero)], 1)
        y = y if kind == "slstm" else m.readout(xg, y)
        (g,) = torch.autograd.grad(y[:, t].sum(), xg)
        close(lag.per_sample[:, p], g.norm(dim=-1), what=f"{kind} ‖∂ℓ_{t}/∂x_s‖")


def test_linear_closed_forms_survive_long_spans_and_batch_major_layouts():
    """T = 3000, time-major: the product over the last 300 steps (≈ e^−250, well inside float64)
    against its log computed independently; far older spans underflow to exactly 0."""
    torch.manual_seed(1)
    m = MinGRU(3, 4, dtype=D64, batch_first=False)
    x = torch.randn(3000, 2, 3, dtype=D64)
    res = cell_jacobians(m, x, keep="norms")
    assert res.total is None and res.direct.shape == (2, 3000, 4)
    a = 1 - torch.sigmoid(m.linear_z(x.transpose(0, 1)))  # (B, T, H)
    want = a[:, 2700:].log().sum(1)  # log ∏_{m ≥ 2700} a
    close(res.direct[:, 2699].log(), want, rtol=1e-9, what="log of a 300-step decay product")
    assert bool((res.direct[:, 0] == 0).all()) and bool((res.spectral[:, 0] == 0).all())


# --- a third-party module: the protocol alone --------------------------------------------------

class Leaky(nn.Module):
    """h_t = σ(w) ⊙ h_{t−1} + tanh(W x_t): written here, no rnnscope base class, its own weights.
    Time-major, to check that the protocol's `batch_first` is honoured."""

    linear_in_state = True
    batch_first = False

    def __init__(self, I=3, N=5):
        super().__init__()
        self.input_size = I
        self.w = nn.Parameter(torch.linspace(-2.0, 3.0, N, dtype=D64))
        self.inp = nn.Linear(I, N, dtype=D64)
        self.out = nn.Linear(N, 2, dtype=D64)

    def decay(self, x):  # x (T, B, I) -> (B, T, N)
        return torch.sigmoid(self.w).expand(x.shape[1], x.shape[0], -1)

    def hidden_states(self, x, hx=None):
        h = torch.zeros(x.shape[1], self.w.shape[0], dtype=x.dtype) if hx is None else hx[0]
        hs = []
        for u in torch.tanh(self.inp(x)).unbind(0):
            h = torch.sigmoid(self.w) * h + u
            hs.append(h)
        return torch.stack(hs, 1)

    def readout(self, xb, states):
        return self.out(states)

    def forward(self, x, hx=None):
        h = self.hidden_states(x, hx)
        return self.readout(x.transpose(0, 1), h).transpose(0, 1), h[:, -1].unsqueeze(0)


def test_third_party_module_gets_every_analysis_from_the_protocol():
    m = Leaky()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(6, 2, 3, dtype=D64)  # (T, B, I)
    T = x.shape[0]
    lam = torch.sigmoid(m.w).detach()
    J = cell_jacobians(m, x, keep="full")
    assert J.kind == "protocol" and J.highway_is_whole
    for n in range(T):
        close(J.direct[:, n], lam.pow(T - 1 - n).expand(2, -1), what=f"λ^(T−1−n) at {n}")
    close(lyapunov_spectrum(m, x).exponents, lam.log().sort(descending=True).values.expand(2, -1),
          what="exponents = log λ")
    # state gradients against autograd through the module's own loop
    h = m.hidden_states(x)
    hs = list(h.unbind(1))
    hs_leaf = []
    hh = torch.zeros(2, 5, dtype=D64)
    for u in torch.tanh(m.inp(x)).unbind(0):
        hh = torch.sigmoid(m.w) * hh + u
        hs_leaf.append(hh)
    L = m.out(torch.stack(hs_leaf, 1))[:, -1].sum()
    want = torch.stack(torch.autograd.grad(L, hs_leaf), 1)
    close(state_gradients(m, x, keep="full").layers[0][0].h_full, want, what="∂L/∂h_t")
    st = gate_stats(m, x)
    close(st.layers[0].memory_time, 1 / (1 - lam), what="memory time")
    prof = gradient_profile(m, x)  # time axis from the module's batch_first=False
    assert prof.per_sample.shape == (2, T)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert len(hs) == T


def test_incomplete_protocol_is_refused_loudly():
    class Half(nn.Module):
        linear_in_state = True

        def decay(self, x):
            return x

    with pytest.raises(TypeError, match="lacks hidden_states"):
        cell_jacobians(Half(), torch.randn(2, 3, 1))

    class Gated(Leaky):
        linear_in_state = False

    with pytest.raises(TypeError, match="lacks step_jacobians"):
        lyapunov_spectrum(Gated(), torch.randn(4, 2, 3, dtype=D64))

    with pytest.raises(ValueError, match="one layer and one direction"):
        cell_jacobians(MinGRU(3, 4), torch.randn(2, 5, 3), layer=1)
    with pytest.raises(ValueError, match="closed-form decays"):
        cell_jacobians(MinGRU(3, 4), torch.randn(2, 5, 3), method="autograd")


def test_replay_of_a_decay_recurrence_is_its_decay_trace():
    from rnnscope import replay
    from rnnscope.modern.decay_trace import DecayTrace

    m, x = MinGRU(3, 4), torch.randn(2, 5, 3)
    tr = replay(m, x)  # the decays as gates: tests/test_modern_replay.py
    assert isinstance(tr, DecayTrace) and torch.equal(tr.decay, m.decay(x))
