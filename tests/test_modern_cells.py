"""Modern recurrences (rnnscope.modern) against independent plain-loop references written here
from the papers' equations, and their closed-form step Jacobians against float64 autograd.

The references read the parameters by name and share no code with the package: minGRU/minLSTM
(Feng et al. 2024), LRU (Orvieto et al. 2023, polar form of λ), RG-LRU (De et al. 2024, a^(c r)
literally), S6 (Gu & Dao 2023, per step), sLSTM (Beck et al. 2024, UNSTABILISED c, n — the
stabiliser must cancel in h and rescale c, n by e^{−m}).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from rnnscope.modern import LRU, RGLRU, SLSTM, MinGRU, MinLSTM, SelectiveSSM
from rnnscope.modern.scan import linear_scan, log_space_scan

D64 = torch.float64
RTOL = 1e-10


def close(a, b, rtol=RTOL, what="", atol=0.0):
    """|a − b| ≤ rtol·(|b| + 1e-3·scale) + atol: relative, with a thousandth of the tensor's
    own scale as the floor."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = b.abs().max().clamp(min=1e-300)
    err = (((a - b).abs() - atol).clamp(min=0) / (b.abs() + scale * 1e-3)).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def sig(v):
    return 1 / (1 + torch.exp(-v))


def g_ref(v):
    return torch.where(v >= 0, v + 0.5, sig(v))


def lin(x, lin_module):
    return x @ lin_module.weight.t() + (0 if lin_module.bias is None else lin_module.bias)


# --- independent references: x (B, T, I), h0 (B, *S) -> outputs (B, T, O), states (B, T, *S)

def ref_mingru(m, x, h0):
    h, hs = h0, []
    for t in range(x.shape[1]):
        z = sig(lin(x[:, t], m.linear_z))
        h = (1 - z) * h + z * g_ref(lin(x[:, t], m.linear_h))
        hs.append(h)
    s = torch.stack(hs, 1)
    return s, s


def ref_minlstm(m, x, h0):
    h, hs = h0, []
    for t in range(x.shape[1]):
        f, i = sig(lin(x[:, t], m.linear_f)), sig(lin(x[:, t], m.linear_i))
        h = f / (f + i) * h + i / (f + i) * g_ref(lin(x[:, t], m.linear_h))
        hs.append(h)
    s = torch.stack(hs, 1)
    return s, s


def ref_lru_lambda(m):
    r, phase = torch.exp(-torch.exp(m.nu_log)), torch.exp(m.theta_log)
    return torch.polar(r, phase)


def ref_lru(m, x, h0):
    lam, gamma = ref_lru_lambda(m), torch.exp(m.gamma_log)
    Bc, Cc = torch.complex(m.B_re, m.B_im), torch.complex(m.C_re, m.C_im)
    h, hs, ys = h0, [], []
    for t in range(x.shape[1]):
        u = x[:, t].to(Bc.dtype)
        h = lam * h + gamma * (u @ Bc.t())
        hs.append(h)
        ys.append((h @ Cc.t()).real + m.D * x[:, t])
    return torch.stack(ys, 1), torch.stack(hs, 1)


def ref_rglru(m, x, h0):
    """a_t = σ(Λ)^(c r_t) taken through its logarithm, log σ(Λ) = −log1p(e^{−Λ}), and
    1 − a² = −expm1(2 log a): the literal σ(Λ)^(c r) and 1 − a² lose about eps/(1 − a)
    relative digits for a near 1 (1e-9 at the decays tested), more than the tolerance."""
    h, hs = h0, []
    for t in range(x.shape[1]):
        u = lin(x[:, t], m.linear_u)
        log_a = m.c * sig(lin(u, m.gate_a)) * -torch.log1p(torch.exp(-m.a_param))
        a = torch.exp(log_a)
        h = a * h + torch.sqrt(-torch.expm1(2 * log_a)) * (sig(lin(u, m.gate_x)) * u)
        hs.append(h)
    s = torch.stack(hs, 1)
    return s, s


def ref_s6_step_parts(m, x_t):
    u = lin(x_t, m.in_proj)  # (B, H)
    delta = torch.log1p(torch.exp(lin(lin(u, m.dt_down), m.dt_up)))  # softplus
    A = -torch.exp(m.A_log)  # (H, N)
    return u, delta, A


def ref_s6(m, x, h0):
    h, hs, ys = h0, [], []
    for t in range(x.shape[1]):
        u, delta, A = ref_s6_step_parts(m, x[:, t])
        Bt, Ct = lin(u, m.B_proj), lin(u, m.C_proj)  # (B, N)
        h = torch.exp(delta[:, :, None] * A) * h + delta[:, :, None] * Bt[:, None, :] * u[:, :, None]
        hs.append(h)
        ys.append(torch.einsum("bdn,bn->bd", h, Ct) + m.D * u)
    return torch.stack(ys, 1), torch.stack(hs, 1)


def ref_slstm(m, x, state0):
    """Unstabilised sLSTM; returns h (B, T, H) and the stabilised (h, c, n, m) per step."""
    H = m.hidden_size
    W = torch.cat([m.W_zio[:2 * H], m.W_f, m.W_zio[2 * H:]])
    b = torch.cat([m.b_zio[:2 * H], m.b_f, m.b_zio[2 * H:]])
    h, c_s, n_s, mm = state0
    c, n = c_s * torch.exp(mm), n_s * torch.exp(mm)  # true (unstabilised) c, n
    out = []
    for t in range(x.shape[1]):
        pre = x[:, t] @ W.t() + h @ m.R.t() + b
        zp, ip, fp, op = pre[:, :H], pre[:, H:2 * H], pre[:, 2 * H:3 * H], pre[:, 3 * H:]
        f = torch.exp(fp) if m.forget_gate == "exp" else sig(fp)
        i = torch.exp(ip)
        c = f * c + i * torch.tanh(zp)
        n = f * n + i
        h = sig(op) * c / n
        mm = torch.maximum(torch.log(f) + mm, ip)
        out.append((h, c * torch.exp(-mm), n * torch.exp(-mm), mm))
    return torch.stack([o[0] for o in out], 1), out


REFS = {"mingru": ref_mingru, "minlstm": ref_minlstm, "lru": ref_lru, "rglru": ref_rglru,
        "s6": ref_s6}


def make(kind, regime, I=3, H=4, seed=0, **kw):
    """A float64 module; regime 'mid', 'near1' (decays within ~1e-6 of 1) or 'near0'."""
    torch.manual_seed(seed)
    with torch.no_grad():
        if kind == "mingru":
            m = MinGRU(I, H, dtype=D64, **kw)
            if regime != "mid":  # a = σ(−k_z)
                m.linear_z.bias.fill_(-14.0 if regime == "near1" else 40.0)
        elif kind == "minlstm":
            m = MinLSTM(I, H, dtype=D64, **kw)
            if regime != "mid":  # f' ≈ f/i when small, ≈ 1 − i/f near 1
                m.linear_f.bias.fill_(14.0 if regime == "near1" else -30.0)
                m.linear_i.bias.fill_(-14.0 if regime == "near1" else 30.0)
        elif kind == "lru":
            m = LRU(I, H, dtype=D64, **kw)
            if regime == "near1":
                m.nu_log.copy_(torch.log(-torch.log(1 - torch.logspace(-6, -2, H, dtype=D64))))
            elif regime == "near0":
                m.nu_log.fill_(math.log(40.0))  # |λ| = e^{−40}
        elif kind == "rglru":
            m = RGLRU(I, H, dtype=D64, **kw)
            if regime == "near1":
                m.a_param.fill_(17.0)  # 1 − σ(17) ≈ 4e-8, times c·r
            elif regime == "near0":
                m.a_param.fill_(-6.0)
                m.gate_a.bias.fill_(8.0)
        elif kind == "s6":
            m = SelectiveSSM(I, H, state_size=3, dtype=D64, **kw)
            if regime == "near1":
                m.dt_up.bias.fill_(-14.0)  # Δ ≈ 8e-7
            elif regime == "near0":
                m.dt_up.bias.fill_(12.0)
                m.A_log.add_(2.0)
        else:
            raise ValueError(kind)
    return m


LINEAR_KINDS = ["mingru", "minlstm", "lru", "rglru", "s6"]
REGIMES = ["mid", "near1", "near0"]


# --- the scan itself ------------------------------------------------------------------------

def loop_scan(a, b, h0):
    h, hs = h0, []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, 1)


@pytest.mark.parametrize("seed", range(6))
def test_linear_scan_matches_loop_across_decays(seed):
    gen = torch.Generator().manual_seed(seed)
    T = [1, 2, 17, 300, 1024, 3001][seed]
    complex_ = seed % 2 == 1
    # decays mixing near 1, near 0, exactly 0 and in between
    a = torch.rand(2, T, 5, generator=gen, dtype=D64)
    a[..., 0] = 1 - 1e-7 * a[..., 0]
    a[..., 1] = 1e-30 * a[..., 1]
    a[..., 2] = 0.0
    b = torch.randn(2, T, 5, generator=gen, dtype=D64)
    h0 = torch.randn(2, 5, generator=gen, dtype=D64)
    if complex_:
        a = a * torch.exp(1j * torch.rand(2, T, 5, generator=gen, dtype=D64))
        b, h0 = b.to(torch.complex128), h0.to(torch.complex128)
    close(linear_scan(a, b, h0), loop_scan(a, b, h0), what="scan vs loop")
    close(linear_scan(a, b), loop_scan(a, b, torch.zeros_like(h0)), what="scan, h0 None")


def test_linear_scan_gradients_and_double_backward():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 37, 3, generator=gen, dtype=D64).requires_grad_()
    b = torch.randn(2, 37, 3, generator=gen, dtype=D64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=gen, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))
    assert torch.autograd.gradgradcheck(linear_scan, (a[:, :9], b[:, :9], h0))
    ac = (torch.rand(2, 20, 3, generator=gen, dtype=D64) * torch.exp(
        1j * torch.randn(2, 20, 3, generator=gen, dtype=D64))).requires_grad_()
    bc = torch.randn(2, 20, 3, generator=gen, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(linear_scan, (ac, bc, h0.to(torch.complex128)))


def test_linear_scan_forward_mode_matches_reverse():
    from torch.func import jacfwd, jacrev
    gen = torch.Generator().manual_seed(2)
    r = torch.rand(2, 40, 3, generator=gen, dtype=D64)
    b = torch.randn(2, 40, 3, generator=gen, dtype=torch.complex128)

    def f(r):  # real input -> complex decays -> real view of the states
        return torch.view_as_real(linear_scan(r * torch.exp(1j * r), b))

    close(jacfwd(f)(r), jacrev(f)(r), rtol=1e-12, what="jacfwd vs jacrev")


def test_linear_scan_long_sequence_float64():
    """T = 10⁵: the blocked scan equals the plain loop at the last step."""
    gen = torch.Generator().manual_seed(3)
    a = 1 - torch.rand(1, 100_000, 2, generator=gen, dtype=D64) ** 3  # many decays near 1
    b = torch.randn(1, 100_000, 2, generator=gen, dtype=D64)
    h = torch.zeros(1, 2, dtype=D64)
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
        h = a_t * h + b_t
    close(linear_scan(a, b)[:, -1], h, rtol=1e-9, what="T=1e5 last state")


def test_log_space_scan_agrees_and_its_error_grows_with_total_decay():
    gen = torch.Generator().manual_seed(4)
    log_a = torch.log(torch.rand(2, 200, 3, generator=gen, dtype=D64) * 0.5 + 0.5)
    log_b = torch.randn(2, 200, 3, generator=gen, dtype=D64)
    ref = loop_scan(log_a.exp(), log_b.exp(), torch.ones(2, 3, dtype=D64))
    close(log_space_scan(log_a, log_b, torch.zeros(2, 3, dtype=D64)), ref, what="log-space")
    # strong decay over a long sequence: |Σ log a| ~ 1e5 costs the log form ~1e-11 relative,
    # the blocked scan keeps full precision
    log_a = torch.full((1, 5000, 1), -20.0, dtype=D64)
    log_b = torch.randn(1, 5000, 1, generator=gen, dtype=D64)
    ref = loop_scan(log_a.exp(), log_b.exp(), torch.zeros(1, 1, dtype=D64))
    close(linear_scan(log_a.exp(), log_b.exp()), ref, rtol=1e-13, what="blocked, strong decay")
    err_log = ((log_space_scan(log_a, log_b) - ref).abs() / ref.abs()).max().item()
    assert err_log < 1e-16 * 20 * 5000 * 10


# --- modules against their references ---------------------------------------------------------

def layout(x, batch_first):
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_hx", [False, True])
def test_linear_module_matches_reference(kind, regime, batch_first, with_hx):
    seed = zlib.crc32(repr((kind, regime, batch_first, with_hx)).encode()) % 1000
    m = make(kind, regime, seed=seed, batch_first=batch_first)
    gen = torch.Generator().manual_seed(seed)
    T = 1500 if regime == "near1" else 120
    x = torch.randn(3, T, 3, generator=gen, dtype=D64)
    S = m.state_shape
    h0 = torch.randn(3, *S, generator=gen, dtype=D64)
    if kind == "lru":
        h0 = h0 + 1j * torch.randn(3, *S, generator=gen, dtype=D64)
    hx = h0.unsqueeze(0) if with_hx else None
    with torch.no_grad():
        y_ref, s_ref = REFS[kind](m, x, h0 if with_hx else torch.zeros_like(h0))
        y, h_n = m(layout(x, batch_first), hx)
        y_loop, h_loop = m.forward_steps(layout(x, batch_first), hx)
        states = m.hidden_states(layout(x, batch_first), hx)
    close(layout(y, batch_first), y_ref, what=f"{kind} scan output")
    close(layout(y_loop, batch_first), y_ref, what=f"{kind} loop output")
    close(states, s_ref, what=f"{kind} states")
    close(h_n, s_ref[:, -1].unsqueeze(0), what=f"{kind} h_n")
    close(h_loop, h_n, what=f"{kind} loop h_n vs scan h_n")
    if regime == "near0":
        assert m.decay(layout(x, batch_first)).abs().max() < 1e-6
    if regime == "near1":
        assert m.decay(layout(x, batch_first)).abs().max() > 1 - 1e-5


@pytest.mark.parametrize("kind", LINEAR_KINDS)
@pytest.mark.parametrize("regime", ["mid", "near1"])
def test_linear_module_gradients_match_reference(kind, regime):
    m = make(kind, regime, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 200, 3, generator=gen, dtype=D64, requires_grad=True)
    S = m.state_shape
    dt = torch.complex128 if kind == "lru" else D64
    h0 = torch.randn(2, *S, generator=gen, dtype=dt, requires_grad=True)
    w_y = torch.randn(2, 200, m(x[:, :1])[0].shape[-1], generator=gen, dtype=D64)
    w_h = torch.randn(2, *S, generator=gen, dtype=dt)
    params = [p for p in m.parameters()]

    def loss(y, h_last):
        return (y * w_y).sum() + (h_last * w_h.conj()).real.sum()

    y, h_n = m(x, h0.unsqueeze(0))
    g_scan = torch.autograd.grad(loss(y, h_n[0]), [x, h0] + params)
    y_r, s_r = REFS[kind](m, x, h0)
    g_ref = torch.autograd.grad(loss(y_r, s_r[:, -1]), [x, h0] + params)
    names = ["x", "h0"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, g_scan, g_ref):
        close(a, b, rtol=1e-9, what=f"{kind} grad {name}")


@pytest.mark.parametrize("kind", LINEAR_KINDS + ["slstm"])
def test_unbatched_input(kind):
    m = SLSTM(3, 4, dtype=D64) if kind == "slstm" else make(kind, "mid")
    x = torch.randn(2, 9, 3, dtype=D64)
    with torch.no_grad():
        y1, h1 = m(x[0])
        yb, hb = m(x)
    close(y1, yb[0], what="unbatched output")
    if kind == "slstm":
        for a, b in zip(h1, hb):
            close(a, b[:, 0], what="unbatched state")
    else:
        close(h1, hb[:, 0], what="unbatched state")


# --- sLSTM -----------------------------------------------------------------------------------

def make_slstm(forget_gate, seed, batch_first=True, H=4):
    torch.manual_seed(seed)
    m = SLSTM(3, H, dtype=D64, forget_gate=forget_gate, batch_first=batch_first)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # larger weights: both branches of the max are taken
    return m


def slstm_state0(B, H, gen):
    h = torch.randn(B, H, generator=gen, dtype=D64)
    c = torch.randn(B, H, generator=gen, dtype=D64)
    n = torch.rand(B, H, generator=gen, dtype=D64) + 0.5
    mm = torch.randn(B, H, generator=gen, dtype=D64)
    return h, c, n, mm


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_hx", [False, True])
def test_slstm_matches_unstabilised_reference(forget_gate, batch_first, with_hx):
    seed = zlib.crc32(repr((forget_gate, batch_first, with_hx)).encode()) % 1000
    m = make_slstm(forget_gate, seed, batch_first)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 60, 3, generator=gen, dtype=D64) * 0.5
    state0 = slstm_state0(3, 4, gen) if with_hx else tuple(torch.zeros(3, 4, dtype=D64)
                                                           for _ in range(4))
    hx = tuple(s.unsqueeze(0) for s in state0) if with_hx else None
    with torch.no_grad():
        y, h_n = m(layout(x, batch_first), hx)
        h_ref, steps = ref_slstm(m, x, state0)
    close(layout(y, batch_first), h_ref, what="sLSTM h")
    for k, name in enumerate("hcnm"):
        close(h_n[k][0], steps[-1][k], what=f"sLSTM final {name}")
    # both branches of the stabiliser's max occur along the way
    f = m.decay(layout(x, batch_first), hx)
    assert f.shape == (3, 60, 4) and bool((f > 0).all())


def test_slstm_gradients_match_reference():
    m = make_slstm("sigmoid", 3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 3, generator=gen, dtype=D64, requires_grad=True)
    w = torch.randn(2, 40, 4, generator=gen, dtype=D64)
    y, _ = m(x)
    g1 = torch.autograd.grad((y * w).sum(), [x] + list(m.parameters()))
    h_ref, _ = ref_slstm(m, x, tuple(torch.zeros(2, 4, dtype=D64) for _ in range(4)))
    g2 = torch.autograd.grad((h_ref * w).sum(), [x] + list(m.parameters()))
    for a, b in zip(g1, g2):
        close(a, b, rtol=1e-9, what="sLSTM gradient")


# --- closed-form step Jacobians against float64 autograd ---------------------------------------

def ref_step(kind, m, x_t, h):
    """One step of the reference (x_t (B, I), h (B, *S)) -> h'."""
    return REFS[kind](m, x_t.unsqueeze(1), h)[1][:, 0]


@pytest.mark.parametrize("kind", LINEAR_KINDS)
@pytest.mark.parametrize("regime", REGIMES)
def test_linear_step_jacobian_is_diagonal_decay(kind, regime):
    m = make(kind, regime, seed=11)
    assert m.linear_in_state
    gen = torch.Generator().manual_seed(12)
    B, T = 2, 6
    x = torch.randn(B, T, 3, generator=gen, dtype=D64)
    with torch.no_grad():
        J = m.step_jacobians(x)
        states = m.hidden_states(x)
    S = m.state_shape
    assert J.shape == (B, T, *S)
    n = math.prod(S)
    for t in range(T):
        h_prev = states[:, t - 1] if t else torch.zeros_like(states[:, 0])
        for b in range(B):
            if kind == "lru":  # the real 2N-dimensional map (Re h, Im h) -> (Re h', Im h')
                def f(hr, b=b, t=t):
                    h = torch.view_as_complex(hr)
                    return torch.view_as_real(ref_step(kind, m, x[b:b + 1, t], h[None])[0])
                A = torch.autograd.functional.jacobian(f, torch.view_as_real(h_prev[b]).contiguous())
                A = A.reshape(2 * n, 2 * n)
                lam = J[b, t]
                blocks = torch.zeros(n, 2, n, 2, dtype=D64)
                idx = torch.arange(n)
                blocks[idx, 0, idx, 0] = lam.real
                blocks[idx, 0, idx, 1] = -lam.imag
                blocks[idx, 1, idx, 0] = lam.imag
                blocks[idx, 1, idx, 1] = lam.real
                close(blocks.reshape(2 * n, 2 * n), A, rtol=1e-8, what="LRU Jacobian")
            else:
                def f(h, b=b, t=t):
                    return ref_step(kind, m, x[b:b + 1, t], h.reshape(1, *S)).reshape(n)
                A = torch.autograd.functional.jacobian(f, h_prev[b].reshape(n))
                # atol: the reference's 1 − z (minGRU) rounds to 0 where z ≈ 1
                close(torch.diag(J[b, t].reshape(n)), A, rtol=1e-8, atol=1e-15,
                      what=f"{kind} Jacobian")


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_slstm_step_jacobian_matches_autograd(forget_gate, with_hx):
    m = make_slstm(forget_gate, 21 + with_hx)
    gen = torch.Generator().manual_seed(22)
    B, T, H = 2, 12, 4
    x = torch.randn(B, T, 3, generator=gen, dtype=D64) * 0.7
    state0 = slstm_state0(B, H, gen) if with_hx else tuple(torch.zeros(B, H, dtype=D64)
                                                           for _ in range(4))
    hx = tuple(s.unsqueeze(0) for s in state0) if with_hx else None
    with torch.no_grad():
        J = m.step_jacobians(x, hx)
        _, steps = ref_slstm(m, x, state0)
    assert J.shape == (B, T, 4 * H, 4 * H)
    W = torch.cat([m.W_zio[:2 * H], m.W_f, m.W_zio[2 * H:]]).detach()
    bias = torch.cat([m.b_zio[:2 * H], m.b_f, m.b_zio[2 * H:]]).detach()
    R = m.R.detach()

    def step(s, x_t):  # stabilised step written out here, on the flat state (h, c, n, m)
        h, c, n, mm = s[:H], s[H:2 * H], s[2 * H:3 * H], s[3 * H:]
        pre = W @ x_t + R @ h + bias
        zp, ip, fp, op = pre[:H], pre[H:2 * H], pre[2 * H:3 * H], pre[3 * H:]
        lf = fp if forget_gate == "exp" else -torch.log1p(torch.exp(-fp))
        m_new = torch.maximum(lf + mm, ip)
        i_s, f_s = torch.exp(ip - m_new), torch.exp(lf + mm - m_new)
        c_new = f_s * c + i_s * torch.tanh(zp)
        n_new = f_s * n + i_s
        return torch.cat([sig(op) * c_new / n_new, c_new, n_new, m_new])

    for t in range(T):
        prev = state0 if t == 0 else steps[t - 1]
        for b in range(B):
            s = torch.cat([p[b] for p in prev])
            A = torch.autograd.functional.jacobian(lambda s_: step(s_, x[b, t]), s)
            close(J[b, t], A, rtol=1e-8, what=f"sLSTM Jacobian t={t} b={b}")
    # the highway is the diagonal of the c and n blocks
    f_s = m.highway(x, hx)
    close(torch.diagonal(J[..., H:2 * H, H:2 * H], dim1=-2, dim2=-1), f_s, what="highway")


def test_slstm_jacobian_covers_both_stabiliser_branches():
    m = make_slstm("exp", 5)
    x = torch.randn(4, 30, 3, dtype=D64)
    with torch.no_grad():
        J = m.step_jacobians(x)
    s = torch.diagonal(J[..., 12:, 12:], dim1=-2, dim2=-1)  # ∂m/∂m = diag(s)
    assert bool((s == 1).any()) and bool((s == 0).any())


# --- errors --------------------------------------------------------------------------------

def test_clear_errors():
    m = MinGRU(3, 4, dtype=D64)
    with pytest.raises(ValueError, match=r"inputs must be \(B, T, I\)"):
        m(torch.randn(2, 5, 7, dtype=D64))
    with pytest.raises(TypeError, match="float32 but MinGRU's parameters are torch.float64"):
        m(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"hx must be \(1, 2, 4\)"):
        m(torch.randn(2, 5, 3, dtype=D64), torch.zeros(2, 4, dtype=D64))
    with pytest.raises(ValueError, match="T=0"):
        m(torch.randn(2, 0, 3, dtype=D64))
    mlog = MinGRU(3, 4, dtype=D64, scan="log")
    with pytest.raises(ValueError, match="scan='log' needs an initial state"):
        mlog(torch.randn(2, 5, 3, dtype=D64), -torch.ones(1, 2, 4, dtype=D64))
    with pytest.raises(ValueError, match="hx must be a tuple"):
        SLSTM(3, 4, dtype=D64)(torch.randn(2, 5, 3, dtype=D64), torch.zeros(1, 2, 4, dtype=D64))
    with pytest.raises(ValueError, match=r"hx must be \(1, 2, 4, 3\)"):
        SelectiveSSM(3, 4, state_size=3, dtype=D64)(torch.randn(2, 5, 3, dtype=D64),
                                                     torch.zeros(1, 2, 4, dtype=D64))


@pytest.mark.parametrize("kind", ["mingru", "minlstm"])
def test_log_space_mode_matches_reference(kind):
    m = make(kind, "mid", seed=31, scan="log")
    x = torch.randn(2, 300, 3, dtype=D64)
    h0 = torch.rand(2, 4, dtype=D64) + 0.1
    with torch.no_grad():
        y, _ = m(x, h0.unsqueeze(0))
        y_ref, _ = REFS[kind](m, x, h0)
    close(y, y_ref, what=f"{kind} log-space")
