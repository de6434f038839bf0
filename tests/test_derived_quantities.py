"""Every derived quantity against an independent computation from oracle tensors.

The oracles are float64 autograd Jacobians and the plain-loop reference of tests/reference.py
(PyTorch's documented equations), or a plain Python loop over a result's own raw tensor. All
cases are away from the trivial ones: W_hh ≠ 0 (indirect paths matter), gates that vary over
time and units, uneven lengths, so that a wrong formula (a planted 0.5, a flipped index, a
dropped term) changes the numbers.
"""

import math

import pytest
import torch
from torch import nn

import rnnscope
from reference import layer_params, oracle_cell_jacobians, reference_forward, reference_step
from rnnscope.results import (GradientProfile, LagProfile, effective_memory, fit_decay_rate,
                              half_life_from_rate)
from rnnscope.spectral import spectral_norms


# ----------------------------------------------------------------------------------------------
# helpers (independent of rnnscope)


def _model(kind, seed, H=3, I=2, scale=1.5, **kw):
    torch.manual_seed(seed)
    m = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](I, H, batch_first=True,
                                                             **kw).double()
    with torch.no_grad():  # larger weights: indirect paths and gate spread matter
        for p in m.parameters():
            p.mul_(scale)
    return m


def _gates(module, x, layer=0, direction=0):
    """Per-step gate values (B, T, H) in processing order, one gate block at a time, from the
    reference loop's states (LSTM: i, f, g, o; GRU: r, z, n)."""
    ins = []
    _, _, _, states = reference_forward(module, x, layer_inputs=ins)
    inp = ins[layer]
    p = layer_params(module, layer, direction)
    H = module.hidden_size
    B, T = inp.shape[:2]
    order = range(T - 1, -1, -1) if direction else range(T)
    lstm = isinstance(module, nn.LSTM)
    names = ("i", "f", "g", "o") if lstm else ("r", "z", "n")
    out = {k: [] for k in names}
    h_prev = torch.zeros(B, p["w_hh"].shape[1], dtype=x.dtype)
    for n, t in enumerate(order):
        for k, name in enumerate(names):
            sl = slice(k * H, (k + 1) * H)
            xi = inp[:, t] @ p["w_ih"][sl].t() + p["b_ih"][sl]
            hh = h_prev @ p["w_hh"][sl].t() + p["b_hh"][sl]
            if name == "n":
                pre = xi + out["r"][-1] * hh
            else:
                pre = xi + hh
            act = torch.tanh if name in ("g", "n") else torch.sigmoid
            out[name].append(act(pre).detach())
        h_prev = states[layer][direction][n][0].detach()
    return {k: torch.stack(v, 1) for k, v in out.items()}


def _share(J, direct):
    """‖D‖²/(‖D‖² + ‖J−D‖²) computed after rescaling by max|J| (so nothing underflows)."""
    D = torch.diag_embed(direct)
    s = J.abs().amax((-2, -1), keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    d2 = (D / s).pow(2).sum((-2, -1))
    r2 = ((J - D) / s).pow(2).sum((-2, -1))
    return d2 / (d2 + r2)


def _gate_product(gate):
    """direct[:, n] = ∏_{m=n+1}^{T−1} gate[:, m], by an explicit loop."""
    B, T, H = gate.shape
    out = torch.ones(B, T, H, dtype=torch.float64)
    for n in range(T):
        for m in range(n + 1, T):
            out[:, n] *= gate[:, m]
    return out


# ----------------------------------------------------------------------------------------------
# cell Jacobians: direct path, spectral and Frobenius norms, highway share, by_distance


@pytest.mark.parametrize("kind, state, direction", [("lstm", "c", 0), ("lstm", "c", 1),
                                                    ("gru", "h", 0), ("gru", "h", 1)])
def test_cell_jacobian_derived_quantities_equal_the_oracle(kind, state, direction):
    m = _model(kind, seed=3, bidirectional=bool(direction))
    x = torch.randn(3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    J = oracle_cell_jacobians(m, x, None, 0, direction, state)  # (B, T, N, N)
    gate = _gates(m, x, 0, direction)["f" if kind == "lstm" else "z"]
    want_direct = _gate_product(gate)
    want_share = _share(J, want_direct)
    for keep in ("full", "norms"):
        got = rnnscope.cell_jacobians(m, x, layer=0, direction=direction, state=state, keep=keep)
        torch.testing.assert_close(got.direct, want_direct, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got.spectral_norm(), torch.linalg.matrix_norm(J, ord=2),
                                   rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(got.frobenius, torch.linalg.matrix_norm(J), rtol=1e-9,
                                   atol=1e-14)
        torch.testing.assert_close(got.highway_share(), want_share, rtol=1e-8, atol=1e-12)
        # by distance k = T−1−n: batch means, flipped
        bd = got.by_distance()
        torch.testing.assert_close(bd["spectral"],
                                   torch.linalg.matrix_norm(J, ord=2).mean(0).flip(0))
        torch.testing.assert_close(bd["direct"], want_direct.abs().mean(-1).mean(0).flip(0))
        torch.testing.assert_close(bd["direct_spectral"],
                                   want_direct.abs().amax(-1).mean(0).flip(0))
        torch.testing.assert_close(bd["share"], want_share.mean(0).flip(0))
    # away from the trivial case: the indirect paths carry a real part of the energy, so a
    # changed weighting of ‖J − D‖² cannot pass
    assert (want_share[:, :-2] < 0.95).any() and (want_share[:, :-2] > 0.01).any()
    planted = (want_direct ** 2).sum(-1) / ((want_direct ** 2).sum(-1) + 0.5 * (
        (J - torch.diag_embed(want_direct)) ** 2).sum((-2, -1)))
    assert not torch.allclose(planted, want_share, rtol=1e-3)
    assert want_share[:, -1].eq(1).all()  # J_{T−1} = I = D


def test_cell_jacobians_without_highway_have_no_share_and_match_oracle_norms():
    m = _model("rnn", seed=5)
    x = torch.randn(2, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    J = oracle_cell_jacobians(m, x, None, 0, 0, "h")
    got = rnnscope.cell_jacobians(m, x, keep="norms")
    assert got.direct is None and got.highway_share() is None
    torch.testing.assert_close(got.spectral, torch.linalg.matrix_norm(J, ord=2))
    assert "share" not in got.by_distance() and "direct" not in got.by_distance()
    # LSTM "h": no diagonal highway either
    lstm = _model("lstm", seed=5)
    got_h = rnnscope.cell_jacobians(lstm, x, state="h", keep="full")
    assert got_h.direct is None and got_h.share is None
    torch.testing.assert_close(got_h.total, oracle_cell_jacobians(lstm, x, None, 0, 0, "h"))


def test_highway_share_of_tiny_jacobians_is_not_nan():
    """The docstring promises nan only where J = 0. A strongly contracting LSTM (forget gate
    ≈ e^−5, small W_hh): ‖J‖ falls below 1e−162, where its square underflows, long before
    n = 0, yet J and D stay representable in float64 (down to ~1e−260)."""
    m = _model("lstm", seed=7, H=2, scale=0.05)
    with torch.no_grad():
        m.bias_ih_l0[2:4] = -5.0
    x = torch.randn(1, 120, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    got = rnnscope.cell_jacobians(m, x, state="c", keep="full")
    tiny = got.spectral < 1e-162
    assert tiny.sum() > 10 and (got.spectral > 0).all() and (got.direct > 0).all()
    want = _share(got.total, got.direct)  # rescaled before squaring
    assert not want.isnan().any() and (want[tiny] > 0).all()
    assert not got.share.isnan().any(), (
        f"highway_share is nan at {int(got.share.isnan().sum())} steps where J ≠ 0 "
        f"(smallest ‖J‖₂ = {float(got.spectral.min()):.3g}): the squares underflow")
    torch.testing.assert_close(got.share, want, rtol=1e-8, atol=0)




# ----------------------------------------------------------------------------------------------
# step Jacobians: the highway diagonal is the gate itself


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_step_jacobian_direct_is_the_reference_gate(kind):
    m = _model(kind, seed=9)
    x = torch.randn(2, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    sj = rnnscope.step_jacobians(m, x, keep="full")
    gate = _gates(m, x)["f" if kind == "lstm" else "z"]
    torch.testing.assert_close(sj.direct, gate, rtol=1e-12, atol=1e-14)
    s = sj.summary()
    torch.testing.assert_close(s["direct_mean"], gate.abs().mean((0, 2)))
    torch.testing.assert_close(s["indirect_spectral"],
                               torch.linalg.matrix_norm(sj.indirect, ord=2).mean(0))
    # the one-step Jacobian of the span oracle: J_{T−2} = ∂s_{T−1}/∂s_{T−2} = total[:, T−1]
    state = "c" if kind == "lstm" else "h"
    J = oracle_cell_jacobians(m, x, None, 0, 0, state)
    torch.testing.assert_close(sj.total[:, -1], J[:, -2], rtol=1e-10, atol=1e-13)
    assert sj.indirect.abs().amax() > 1e-3  # W_hh ≠ 0: not the trivial split


# ----------------------------------------------------------------------------------------------
# spectral norm helper


def test_spectral_norm_against_svd_on_rectangular_and_scaled_batches():
    g = torch.Generator().manual_seed(11)
    for shape in [(4, 3, 5), (2, 6, 2), (3, 1, 4), (2, 4, 4)]:
        a = torch.randn(*shape, dtype=torch.float64, generator=g)
        for scale in (1.0, 1e-200, 1e150):
            want = torch.linalg.svdvals(a)[..., 0] * scale
            torch.testing.assert_close(spectral_norms(a * scale), want, rtol=1e-12, atol=0)
    assert spectral_norms(torch.zeros(2, 3, 3)).eq(0).all()


# ----------------------------------------------------------------------------------------------
# Lyapunov exponents: QR method on float64 autograd one-step Jacobians of the reference step


def _oracle_step_jacobians(m, x):
    """(B, T, N, N) ∂s_n/∂s_{n−1} of the full state by autograd on reference_step."""
    kind = "lstm" if isinstance(m, nn.LSTM) else ("gru" if isinstance(m, nn.GRU) else "rnn")
    p = layer_params(m, 0, 0)
    nonlin = "relu" if getattr(m, "nonlinearity", "tanh") == "relu" else "tanh"
    _, _, _, states = reference_forward(m, x)
    B, T = x.shape[:2]
    H = m.hidden_size
    out = []
    for n in range(T):
        if n:
            h, c = states[0][0][n - 1]
        else:
            h, c = torch.zeros(B, H, dtype=x.dtype), torch.zeros(B, H, dtype=x.dtype)
        per_b = []
        for b in range(B):
            def f(s, b=b):
                if kind == "lstm":
                    hn, cn = reference_step(kind, p, x[b:b + 1, n], s[None, :H], s[None, H:])
                    return torch.cat([hn, cn], -1)[0]
                return reference_step(kind, p, x[b:b + 1, n], s[None], None, nonlin)[0][0]
            s0 = torch.cat([h[b], c[b]]) if kind == "lstm" else h[b]
            per_b.append(torch.autograd.functional.jacobian(f, s0.detach()))
        out.append(torch.stack(per_b))
    return torch.stack(out, 1)


def _qr_exponents(A, k, warmup):
    B, T, N, _ = A.shape
    Q = torch.eye(N, dtype=torch.float64)[:, :k].expand(B, N, k)
    acc = torch.zeros(B, k, dtype=torch.float64)
    for n in range(T):
        Q, R = torch.linalg.qr(A[:, n] @ Q)
        if n >= warmup:
            acc += torch.diagonal(R, dim1=-2, dim2=-1).abs().log()
    return (acc / (T - warmup)).sort(-1, descending=True).values


@pytest.mark.parametrize("kind, k, warmup", [("lstm", None, 0), ("gru", 2, 3), ("rnn", 3, 1),
                                             ("lstm", 1, 0), ("gru", 1, 2), ("rnn", 1, 0)])
def test_lyapunov_exponents_equal_a_qr_reference(kind, k, warmup):
    m = _model(kind, seed=12, H=3, scale=1.2)
    x = torch.randn(2, 9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    A = _oracle_step_jacobians(m, x)
    N = A.shape[-1]
    want = _qr_exponents(A, N if k is None else k, warmup)
    got = rnnscope.lyapunov_spectrum(m, x, k=k, warmup=warmup).exponents
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # unbatched inputs give (k,)
    got1 = rnnscope.lyapunov_spectrum(m, x[0], k=k, warmup=warmup).exponents
    torch.testing.assert_close(got1, want[0], rtol=1e-9, atol=1e-12)
    if want.shape[-1] > 1:
        assert want.std() > 0.05  # distinct exponents: an index slip shows


# ----------------------------------------------------------------------------------------------
# GradientProfile: by_distance with lengths, decay ratio, rate, half-life, effective memory


def _loop_by_distance(per_sample, lengths):
    S, T = per_sample.shape
    out = []
    for k in range(T):
        vals = [float(per_sample[s, int(lengths[s]) - 1 - k]) for s in range(S)
                if k < int(lengths[s])]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def _loop_fit(norms):
    pts = [(k, math.log(v)) for k, v in enumerate(norms.tolist()) if v > 0]
    n = len(pts)
    mk = sum(k for k, _ in pts) / n
    my = sum(y for _, y in pts) / n
    slope = sum((k - mk) * (y - my) for k, y in pts) / sum((k - mk) ** 2 for k, _ in pts)
    return -slope


def _loop_effective_memory(norms, threshold):
    top = max(norms)
    return sum(1 for v in norms if v / top > threshold)


def test_gradient_profile_summaries_with_lengths_equal_plain_loops():
    g = torch.Generator().manual_seed(14)
    S, T = 4, 9
    lengths = torch.tensor([9, 5, 7, 2])
    # norms decaying with distance, with noise, zero past each end
    per_sample = torch.zeros(S, T, dtype=torch.float64)
    for s in range(S):
        n = int(lengths[s])
        k = torch.arange(n - 1, -1, -1, dtype=torch.float64)
        per_sample[s, :n] = 3.0 * torch.exp(-0.4 * k) * (1 + 0.3 * torch.rand(n, generator=g,
                                                                               dtype=torch.float64))
    prof = GradientProfile(per_sample, lengths=lengths)
    bd = _loop_by_distance(per_sample, lengths)
    torch.testing.assert_close(prof.by_distance(), bd)
    # per-timestep mean over the sequences that have step t
    want_norms = torch.tensor([per_sample[lengths > t, t].mean().item() for t in range(T)],
                              dtype=torch.float64)
    torch.testing.assert_close(prof.norms, want_norms)
    want_std = torch.tensor([per_sample[lengths > t, t].std().item() if (lengths > t).sum() > 1
                             else 0.0 for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(prof.std, want_std)
    want_std_d = []
    for k in range(T):
        vals = torch.tensor([float(per_sample[s, int(lengths[s]) - 1 - k]) for s in range(S)
                             if k < int(lengths[s])], dtype=torch.float64)
        want_std_d.append(vals.std().item() if len(vals) > 1 else 0.0)
    torch.testing.assert_close(prof.std_by_distance(), torch.tensor(want_std_d,
                                                                    dtype=torch.float64))
    assert prof.decay_ratio() == pytest.approx(float(bd[-1] / bd[0]), rel=1e-12)
    rate = _loop_fit(bd)
    assert prof.decay_rate() == pytest.approx(rate, rel=1e-10)
    assert 0.2 < rate < 0.6
    assert prof.half_life() == pytest.approx(math.log(2) / rate, rel=1e-10)
    for th in (0.01, 0.1, 0.5):
        assert prof.effective_memory(th) == _loop_effective_memory(bd.tolist(), th)
    s = prof.summary(0.1)
    assert s["effective_memory"] == _loop_effective_memory(bd.tolist(), 0.1)
    assert s["decay_rate"] == pytest.approx(rate, rel=1e-10)
    # without lengths: distance is T−1−t for everyone
    full = GradientProfile(per_sample[:, :5].flip(1).contiguous())
    torch.testing.assert_close(full.by_distance(), per_sample[:, :5].mean(0))
    assert full.decay_ratio() == pytest.approx(float(per_sample[:, 4].mean() /
                                                     per_sample[:, 0].mean()), rel=1e-12)


def test_gradient_profile_of_a_real_model_with_lengths_equals_per_sample_runs():
    """Padded inputs + lengths through a PackedSequence: each sequence's profile is what a run
    of that sample alone over its own steps gives, and by_distance aligns at each one's end."""
    from torch.nn.utils.rnn import pack_padded_sequence

    m = _model("lstm", seed=15, H=4, I=3, scale=1.0)
    g = torch.Generator().manual_seed(16)
    x = torch.randn(3, 8, 3, dtype=torch.float64, generator=g)
    lengths = torch.tensor([8, 3, 6])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    prof = rnnscope.gradient_profile(m, packed)
    want = torch.zeros(3, 8, dtype=torch.float64)
    for s in range(3):
        n = int(lengths[s])
        xs = x[s:s + 1, :n].clone().requires_grad_(True)
        out, _, _, _ = reference_forward(m, xs)
        (gx,) = torch.autograd.grad(out[0, -1].sum(), xs)
        want[s, :n] = gx[0].norm(dim=-1)
    torch.testing.assert_close(prof.per_sample, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(prof.by_distance(), _loop_by_distance(want, lengths),
                               rtol=1e-9, atol=1e-12)


def test_summary_helpers_on_edge_cases():
    # fit: zeros left out, never the whole fit
    n = torch.tensor([4.0, 0.0, 1.0, 0.5, 0.0, 0.125], dtype=torch.float64)
    assert fit_decay_rate(n) == pytest.approx(_loop_fit(n), rel=1e-12)
    assert math.isnan(fit_decay_rate(torch.tensor([1.0, 0.0, 0.0])))
    assert math.isnan(fit_decay_rate(torch.tensor([1.0, math.nan, 0.5])))
    # a growing gradient has a negative rate and no half-life
    assert fit_decay_rate(torch.tensor([1.0, 2.0, 4.0])) == pytest.approx(-math.log(2))
    assert half_life_from_rate(-0.1) == math.inf and half_life_from_rate(0.0) == math.inf
    assert half_life_from_rate(0.25) == pytest.approx(math.log(2) / 0.25)
    # effective memory: strictly above threshold × max
    assert effective_memory(torch.tensor([2.0, 1.0, 0.021, 0.02]), 0.01) == 3
    assert effective_memory(torch.tensor([1.0, 0.5, 0.5]), 0.5) == 1
    assert effective_memory(torch.tensor([1.0, 0.5, 0.51]), 0.5) == 2
    assert effective_memory(torch.tensor([1.0, 1.0]), 1.0) == 0
    assert effective_memory(torch.zeros(3)) == 0
    # decay ratio ends
    p = GradientProfile(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    assert math.isnan(p.decay_ratio())
    p = GradientProfile(torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64))
    assert p.decay_ratio() == math.inf
    p = GradientProfile(torch.tensor([[2.0, 1.0, 8.0], [1.0, 1.0, 2.0]], dtype=torch.float64))
    assert p.decay_ratio() == pytest.approx(1.5 / 5.0)
    assert p.effective_memory(0.25) == 2 and p.effective_memory(0.5) == 1


# ----------------------------------------------------------------------------------------------
# LagProfile: per-lag means


def _loop_by_lag(per_sample, positions, lengths):
    S, P, T = per_sample.shape
    K = int(max(positions)) + 1
    out = []
    for k in range(K):
        vals = []
        for s in range(S):
            for p, t in enumerate(positions):
                if t - k < 0 or (lengths is not None and t >= int(lengths[s])):
                    continue
                vals.append(float(per_sample[s, p, t - k]))
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def test_lag_profile_by_lag_equals_a_plain_loop_over_autograd_gradients():
    m = _model("gru", seed=17, H=4, I=3, scale=1.2)
    x = torch.randn(3, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    positions = [2, 5, 8]
    lp = rnnscope.lag_profile(m, x, positions=positions)
    # oracle: per-step loss ℓ_t = sum of output features at t, one autograd.grad per (s, t)
    want = torch.zeros(3, 3, 9, dtype=torch.float64)
    for s in range(3):
        for p, t in enumerate(positions):
            xs = x[s:s + 1].clone().requires_grad_(True)
            out, _, _, _ = reference_forward(m, xs)
            (gx,) = torch.autograd.grad(out[0, t].sum(), xs)
            want[s, p] = gx[0].norm(dim=-1)
    torch.testing.assert_close(lp.per_sample, want, rtol=1e-9, atol=1e-12)
    bl = _loop_by_lag(want, positions, None)
    torch.testing.assert_close(lp.by_lag(), bl, rtol=1e-9, atol=1e-12)
    assert lp.decay_rate() == pytest.approx(_loop_fit(bl), rel=1e-8)
    assert lp.half_life() == pytest.approx(math.log(2) / _loop_fit(bl), rel=1e-8)
    assert lp.effective_memory(0.05) == _loop_effective_memory(bl.tolist(), 0.05)


def test_lag_profile_by_lag_with_lengths_equals_a_plain_loop():
    g = torch.Generator().manual_seed(19)
    S, T = 3, 8
    positions = [1, 4, 6, 7]
    lengths = torch.tensor([8, 5, 7])
    per_sample = torch.rand(S, len(positions), T, generator=g, dtype=torch.float64) + 0.1
    lp = LagProfile(per_sample, torch.tensor(positions), lengths=lengths)
    torch.testing.assert_close(lp.by_lag(), _loop_by_lag(per_sample, positions, lengths))
    v, exists = lp.lag_table()
    assert v.shape == (S, len(positions), 8)
    assert not exists[1, 2:].any() and exists[1, 1, :5].all() and not exists[1, 1, 5:].any()
    s = lp.summary(0.2)
    assert s["max_lag"] == 7 and s["n_positions"] == 4
    bl = _loop_by_lag(per_sample, positions, lengths)
    assert s["effective_memory"] == _loop_effective_memory(bl.tolist(), 0.2)


# ----------------------------------------------------------------------------------------------
# gates: saturation fractions, quantiles, histogram, memory times 1/(1−f)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gate_stats_equal_reference_gates(kind):
    m = _model(kind, seed=20, H=5, I=3, scale=3.0)  # wide spread: every saturation bin is hit
    x = torch.randn(6, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    gate = _gates(m, x)["f" if kind == "lstm" else "z"]
    st = rnnscope.gate_stats(m, x, bins=8)
    s = st.layers[0]
    flat = gate.flatten()
    for key, frac in (("<0.01", (flat < 0.01)), ("<0.1", (flat < 0.1)),
                      (">0.9", (flat > 0.9)), (">0.99", (flat > 0.99))):
        assert s.saturation[key] == pytest.approx(frac.double().mean().item(), abs=1e-15), key
    for key in ("<0.1", ">0.9"):
        assert 0.02 < s.saturation[key] < 0.98, key  # not a trivial 0 or 1
    assert s.mean == pytest.approx(flat.mean().item(), rel=1e-12)
    for q, v in s.quantiles.items():
        assert v == pytest.approx(flat.quantile(q).item(), rel=1e-12), q
    want_hist = torch.tensor([((flat >= lo) & ((flat < lo + 0.125) if lo < 0.875 else
                                                (flat <= 1.0))).double().mean().item()
                              for lo in [i / 8 for i in range(8)]], dtype=torch.float64)
    torch.testing.assert_close(s.hist, want_hist)
    torch.testing.assert_close(s.edges, torch.linspace(0, 1, 9, dtype=torch.float64))
    unit = gate.mean((0, 1))
    torch.testing.assert_close(s.unit_mean, unit)
    torch.testing.assert_close(s.memory_time, torch.tensor([1 / (1 - u) for u in unit.tolist()],
                                                           dtype=torch.float64))
    assert unit.std() > 0.05


def test_gate_stats_with_lengths_use_valid_steps_only():
    from torch.nn.utils.rnn import pack_padded_sequence

    m = _model("lstm", seed=22, H=4, I=2, scale=2.0)
    x = torch.randn(3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    lengths = [7, 3, 5]
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    st = rnnscope.gate_stats(m, packed).layers[0]
    f = torch.cat([_gates(m, x[b:b + 1, :n])["f"][0] for b, n in enumerate(lengths)])  # (N, H)
    assert st.mean == pytest.approx(f.mean().item(), rel=1e-12)
    assert st.saturation[">0.9"] == pytest.approx((f > 0.9).double().mean().item())
    torch.testing.assert_close(st.unit_mean, f.mean(0))


def test_memory_time_and_decay_table_closed_forms():
    for f in (0.0, 0.5, 0.9, 0.99):
        assert rnnscope.memory_time(f) == pytest.approx(1 / (1 - f), rel=1e-15)
    assert rnnscope.memory_time(1.0) == math.inf
    t = rnnscope.decay_table((0.5, 0.9), (3, 10))
    rows = {(r["forget"], r["length"]): r for r in t.rows}
    assert rows[(0.5, 3)]["factor"] == 0.125
    assert rows[(0.9, 10)]["factor"] == pytest.approx(0.9 ** 10, rel=1e-15)
    assert rows[(0.9, 3)]["memory_time"] == pytest.approx(10.0)
    assert len(t.rows) == 4


# ----------------------------------------------------------------------------------------------
# cases the mutation check (benchmarks/mutation_check.py) showed untested


@pytest.mark.parametrize("cell_cls", [nn.GRUCell, nn.RNNCell, nn.LSTMCell])
def test_lyapunov_exponents_of_cells_by_autograd_equal_a_qr_reference(cell_cls):
    """The torch.func path (method="autograd"), single-tensor and tuple states."""
    torch.manual_seed(24)
    cell = cell_cls(2, 3).double()
    fused = {nn.GRUCell: nn.GRU, nn.RNNCell: nn.RNN, nn.LSTMCell: nn.LSTM}[cell_cls](
        2, 3, batch_first=True).double()
    with torch.no_grad():
        for (_, a), (_, b) in zip(cell.named_parameters(), fused.named_parameters()):
            a.mul_(1.3)
            b.copy_(a)
    x = torch.randn(2, 8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(25))
    A = _oracle_step_jacobians(fused, x)
    want = _qr_exponents(A, A.shape[-1], 2)
    got = rnnscope.lyapunov_spectrum(cell, x, warmup=2, method="autograd").exponents
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_a_custom_cell_returning_a_different_state_structure_is_refused():
    class Bad(nn.Module):
        hidden_size = 3

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x, h):  # state in: a tensor; state out: a 1-tuple
            return (torch.tanh(self.lin(torch.cat([x, h[..., :2]], -1))),)

    with pytest.raises(TypeError, match="same structure"):
        rnnscope.cell_jacobians(Bad(), torch.randn(2, 4, 3))


def test_gate_stats_of_the_reverse_direction_with_lengths_use_each_sequence_alone():
    """The reverse direction of a packed batch starts at each sequence's own last step (the
    per-step validity masks run backwards with it)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    m = _model("lstm", seed=26, H=3, I=2, scale=2.0, bidirectional=True)
    x = torch.randn(3, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(27))
    lengths = [6, 2, 4]
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    st = rnnscope.gate_stats(m, packed)
    for d in (0, 1):
        s = [s for s in st.layers if (s.layer, s.direction) == (0, d)][0]
        f = torch.cat([_gates(m, x[b:b + 1, :n], 0, d)["f"][0] for b, n in enumerate(lengths)])
        assert s.mean == pytest.approx(f.mean().item(), rel=1e-12), d
        torch.testing.assert_close(s.unit_mean, f.mean(0))


def test_a_custom_cell_refuses_integer_inputs():
    cell = nn.GRUCell(3, 4)
    with pytest.raises(TypeError, match="floating-point"):
        rnnscope.cell_jacobians(cell, torch.ones(2, 4, 3, dtype=torch.int64), method="autograd")
    with pytest.raises(TypeError, match="floating-point"):
        rnnscope.lyapunov_spectrum(_Tanh(), torch.ones(2, 4, 3, dtype=torch.int64))


class _Tanh(nn.Module):
    """A user-written cell: h' = tanh(W x + U h)."""
    hidden_size = 3

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(3, 3)
        self.u = nn.Linear(3, 3, bias=False)

    def forward(self, x, h):
        return torch.tanh(self.w(x) + self.u(h))


def _packed_state_gradient_case():
    from torch.nn.utils.rnn import pack_padded_sequence

    m = _model("lstm", seed=28, H=3, I=2, scale=1.5)
    x = torch.randn(3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(29))
    lengths = [7, 3, 5]
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                  enforce_sorted=False)
    got = rnnscope.state_gradients(m, packed).layers[0][0]
    want = []
    for b, n in enumerate(lengths):
        out, _, _, states = reference_forward(m, x[b:b + 1, :n])
        steps = states[0][0]
        gs = torch.autograd.grad(out[0, -1].sum(), [h for h, _ in steps] + [c for _, c in steps])
        want.append((torch.stack([g[0].norm() for g in gs[:n]]),
                     torch.stack([g[0].norm() for g in gs[n:]])))
    return got, lengths, want


def test_state_gradients_h_of_a_packed_batch_equal_each_sequence_alone():
    """loss="last" on packed inputs: each sequence's own last valid step."""
    got, lengths, want = _packed_state_gradient_case()
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got.h[b, :n], want[b][0], rtol=1e-9, atol=1e-13)
        assert want[b][0][:-1].abs().min() > 0  # gradient flows back: a misplaced step shows
        assert got.h[b, n:].eq(0).all()


def test_state_gradients_c_of_a_packed_batch_equal_each_sequence_alone():
    got, lengths, want = _packed_state_gradient_case()
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got.c[b, :n], want[b][1], rtol=1e-9, atol=1e-13)


def test_trace_state_gradients_without_outputs_are_zero():
    from rnnscope.jacobians import trace_state_gradients

    m = _model("gru", seed=30)
    tr = rnnscope.replay(m, torch.randn(2, 4, 2, dtype=torch.float64))
    sg = trace_state_gradients(tr, [])
    assert sg.layers[0][0].h.shape == (2, 4) and sg.layers[0][0].h.eq(0).all()


@pytest.mark.parametrize("per_step", [False, True])
def test_state_gradients_with_a_loss_callable_equal_the_reference(per_step):
    """A callable giving per-sample (B,) or per-step (B, T) losses of the output sequence."""
    m = _model("gru", seed=31, H=3, I=2)
    x = torch.randn(2, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(32))

    def loss(out):  # (B, T, F) -> (B, T) or (B,)
        per_t = (out[:, 1:] ** 2).sum(-1)
        per_t = torch.cat([per_t.new_zeros(out.shape[0], 1), per_t], 1)
        return per_t if per_step else per_t.sum(1)

    got = rnnscope.state_gradients(m, x, loss=loss).layers[0][0]
    out, _, _, states = reference_forward(m, x)
    hs = [h for h, _ in states[0][0]]
    gs = torch.autograd.grad(loss(out).sum(), hs)
    torch.testing.assert_close(got.h, torch.stack([g.norm(dim=-1) for g in gs], 1),
                               rtol=1e-9, atol=1e-13)
    assert rnnscope.state_gradients(m, x, loss=loss).loss == "custom"


def test_state_gradients_with_loss_all_equal_the_reference():
    m = _model("rnn", seed=33, H=3, I=2)
    x = torch.randn(2, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(34))
    got = rnnscope.state_gradients(m, x, loss="all").layers[0][0]
    out, _, _, states = reference_forward(m, x)
    hs = [h for h, _ in states[0][0]]
    gs = torch.autograd.grad(out.sum(), hs)
    torch.testing.assert_close(got.h, torch.stack([g.norm(dim=-1) for g in gs], 1),
                               rtol=1e-9, atol=1e-13)
