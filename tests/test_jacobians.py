import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import rnnscope
from reference import KINDS, oracle_cell_jacobians, reference_forward

@st.composite
def jac_configs(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    cfg = dict(input_size=draw(st.integers(1, 3)), hidden_size=draw(st.integers(1, 4)),
               num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
               batch_first=True, bias=draw(st.booleans()))
    if kind == "lstm" and cfg["hidden_size"] > 1 and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, cfg["hidden_size"] - 1))
    state = draw(st.sampled_from(["c", "h", "full"])) if kind == "lstm" else "h"
    layer = draw(st.integers(0, cfg["num_layers"] - 1))
    direction = draw(st.integers(0, 1 if cfg["bidirectional"] else 0))
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    return kind, cfg, state, layer, direction, B, T, draw(st.integers(0, 2**16)), \
        draw(st.booleans())


def _build(kind, cfg, B, T, seed, with_hx):
    torch.manual_seed(seed)
    m = KINDS[kind](**cfg).double()
    with torch.no_grad():  # larger weights than the default: make the indirect paths matter
        for p in m.parameters():
            p.mul_(2.0)
    x = torch.randn(B, T, cfg["input_size"], dtype=torch.float64)
    hx = None
    if with_hx:
        LD = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
        P = cfg.get("proj_size", 0) or cfg["hidden_size"]
        hx = torch.randn(LD, B, P, dtype=torch.float64)
        if kind == "lstm":
            hx = (hx, torch.randn(LD, B, cfg["hidden_size"], dtype=torch.float64))
    return m, x, hx


@given(jac_configs())
def test_cell_jacobians_equal_autograd_on_the_reference_loop(config):
    kind, cfg, state, layer, direction, B, T, seed, with_hx = config
    m, x, hx = _build(kind, cfg, B, T, seed, with_hx)
    want = oracle_cell_jacobians(m, x, hx, layer, direction, state)
    got = rnnscope.cell_jacobians(m, x, hx, layer=layer, direction=direction, state=state,
                                  keep="full")
    torch.testing.assert_close(got.total, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got.spectral,
                               torch.linalg.matrix_norm(want, ord=2), rtol=1e-8, atol=1e-12)
    eye = torch.eye(want.shape[-1], dtype=torch.float64).expand(B, -1, -1)
    torch.testing.assert_close(got.total[:, -1], eye)
    norms = rnnscope.cell_jacobians(m, x, hx, layer=layer, direction=direction, state=state,
                                    keep="norms")
    assert norms.total is None
    torch.testing.assert_close(norms.spectral, got.spectral, rtol=1e-10, atol=1e-14)
    if got.share is not None:
        torch.testing.assert_close(norms.share, got.share, rtol=1e-7, atol=1e-9,
                                   equal_nan=True)
        assert ((got.share >= 0) & (got.share <= 1) | got.share.isnan()).all()
    expected_positions = list(range(T - 1, -1, -1)) if direction else list(range(T))
    assert got.positions.tolist() == expected_positions


@given(jac_configs())
def test_step_jacobians_split_exactly(config):
    kind, cfg, state, layer, direction, B, T, seed, with_hx = config
    m, x, hx = _build(kind, cfg, B, T, seed, with_hx)
    sj = rnnscope.step_jacobians(m, x, hx, layer=layer, direction=direction, state=state,
                                 keep="full")
    cj = rnnscope.cell_jacobians(m, x, hx, layer=layer, direction=direction, state=state,
                                 keep="full")
    if kind in ("gru",) or (kind == "lstm" and state == "c"):
        gate = "z" if kind == "gru" else "f"
        lt = rnnscope.replay(m, x, hx).layers[layer][direction]
        torch.testing.assert_close(sj.direct, lt.in_steps(lt.gates[gate]).detach())
        # the direct path of the span is the product of the one-step diagonals
        for n in range(T):
            prod = torch.ones_like(sj.direct[:, 0])
            for k in range(n + 1, T):
                prod = prod * sj.direct[:, k]
            torch.testing.assert_close(cj.direct[:, n], prod)
    else:
        assert sj.direct is None and cj.direct is None
    if state not in ("h", "c") and T > 1:  # chain rule J_n = J_{n+1} A_{n+1} (Markov states)
        for n in range(T - 1):
            torch.testing.assert_close(cj.total[:, n], cj.total[:, n + 1] @ sj.total[:, n + 1],
                                       rtol=1e-9, atol=1e-12)


def test_closed_form_a_zero_weights_constant_forget_gate():
    b = 0.7
    m = nn.LSTM(3, 4, batch_first=True).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.bias_ih_l0[4:8] = b
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    cj = rnnscope.cell_jacobians(m, x, keep="full")
    f = 1 / (1 + math.exp(-b))
    for t in range(9):
        torch.testing.assert_close(cj.total[:, t],
                                   f ** (8 - t) * torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    torch.testing.assert_close(cj.share, torch.ones(2, 9, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_closed_form_bc_no_recurrent_weights_gives_the_gate_product(kind):
    torch.manual_seed(0)
    m = (nn.LSTM if kind == "lstm" else nn.GRU)(3, 5, batch_first=True).double()
    with torch.no_grad():
        m.weight_hh_l0.zero_()
    x = torch.randn(3, 11, 3, dtype=torch.float64)
    cj = rnnscope.cell_jacobians(m, x, keep="full")
    gate = rnnscope.replay(m, x).layers[0][0].gates["f" if kind == "lstm" else "z"].detach()
    for t in range(11):
        prod = gate[:, t + 1:].prod(1)
        torch.testing.assert_close(cj.total[:, t], torch.diag_embed(prod), rtol=1e-12,
                                   atol=1e-15)
    torch.testing.assert_close(cj.share, torch.ones(3, 11, dtype=torch.float64))


def test_closed_form_d_relu_rnn_scaled_identity():
    a = 0.8
    m = nn.RNN(2, 4, nonlinearity="relu", batch_first=True).double()
    with torch.no_grad():
        m.weight_hh_l0.copy_(a * torch.eye(4))
        m.weight_ih_l0.uniform_(0.1, 1.0)
        m.bias_ih_l0.zero_()
        m.bias_hh_l0.zero_()
    x = torch.rand(2, 10, 2, dtype=torch.float64) + 0.1
    cj = rnnscope.cell_jacobians(m, x, keep="full")
    for t in range(10):
        torch.testing.assert_close(cj.total[:, t],
                                   a ** (9 - t) * torch.eye(4, dtype=torch.float64).expand(2, 4, 4))


def test_closed_form_e_contractive_tanh_rnn_bound():
    torch.manual_seed(1)
    m = nn.RNN(3, 6, batch_first=True).double()
    with torch.no_grad():
        w = torch.randn(6, 6, dtype=torch.float64)
        m.weight_hh_l0.copy_(0.9 * w / torch.linalg.matrix_norm(w, ord=2))
    x = 3 * torch.randn(4, 30, 3, dtype=torch.float64)
    cj = rnnscope.cell_jacobians(m, x, keep="norms")
    bound = 0.9 ** torch.arange(29, -1, -1, dtype=torch.float64)
    assert (cj.spectral_norm() <= bound * (1 + 1e-12)).all()
    assert cj.spectral_norm()[:, 0].max() < 0.9 ** 29


def test_closed_form_f_lyapunov_spectrum_of_a_linear_fixed_point():
    torch.manual_seed(0)
    H = 5
    q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64))
    eig = torch.tensor([1.3, -0.9, 0.6, 0.3, -0.15], dtype=torch.float64)
    W = q @ torch.diag(eig) @ q.t()  # symmetric
    m = nn.RNN(2, H, batch_first=True).double()
    with torch.no_grad():
        m.weight_hh_l0.copy_(W)
        m.bias_ih_l0.zero_()
        m.bias_hh_l0.zero_()
    x = torch.zeros(1, 2000, 2, dtype=torch.float64)  # stays at h = 0: every Jacobian is W
    lyap = rnnscope.lyapunov_spectrum(m, x).exponents
    want = eig.abs().log().sort(descending=True).values
    assert lyap.shape == (1, H)
    assert (lyap[0] - want).abs().max().item() < 1e-3
    top2 = rnnscope.lyapunov_spectrum(m, x[0], k=2, warmup=100).exponents  # unbatched -> (k,)
    assert top2.shape == (2,) and (top2 - want[:2]).abs().max().item() < 1e-3


def test_lyapunov_uses_the_full_lstm_state():
    torch.manual_seed(0)
    m = nn.LSTM(2, 3, proj_size=2, batch_first=True).double()
    x = torch.randn(2, 50, 2, dtype=torch.float64)
    lyap = rnnscope.lyapunov_spectrum(m, x).exponents
    assert lyap.shape == (2, 5)  # N = P + H
    # oracle: QR over autograd Jacobians of the full state
    sj = rnnscope.step_jacobians(m, x, state="full", keep="full").total
    Q = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    acc = torch.zeros(2, 5, dtype=torch.float64)
    for n in range(50):
        Q, R = torch.linalg.qr(sj[:, n] @ Q)
        acc += torch.diagonal(R, dim1=-2, dim2=-1).abs().log()
    torch.testing.assert_close(lyap, (acc / 50).sort(-1, descending=True).values)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=5\]"):
        rnnscope.lyapunov_spectrum(m, x, k=6)
    with pytest.raises(ValueError, match=r"warmup must be an int in \[0, T=50\)"):
        rnnscope.lyapunov_spectrum(m, x, warmup=50)


def _kinds_and_cells():
    return [(nn.LSTM, nn.LSTMCell), (nn.GRU, nn.GRUCell), (nn.RNN, nn.RNNCell)]


@pytest.mark.parametrize("fused, cell_cls", _kinds_and_cells())
def test_state_gradients_equal_retain_grad_on_the_reference_loop(fused, cell_cls):
    torch.manual_seed(0)
    m = fused(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    for loss in ("last", "all"):
        sg = rnnscope.state_gradients(m, x, loss=loss, keep="full")
        out, _, _, states = reference_forward(m, x)
        for dirs in states:
            for steps in dirs:
                for h, c in steps:
                    h.retain_grad()
                    if c is not None:
                        c.retain_grad()
        (out[:, -1].sum() if loss == "last" else out.sum()).backward()
        for layer in range(2):
            for d in range(2):
                steps = states[layer][d]
                order = range(6, -1, -1) if d else range(7)
                want_h = torch.zeros(2, 7, 4, dtype=torch.float64)
                want_c = torch.zeros(2, 7, 4, dtype=torch.float64)
                for (h, c), pos in zip(steps, order):
                    if h.grad is not None:
                        want_h[:, pos] = h.grad
                    if c is not None and c.grad is not None:
                        want_c[:, pos] = c.grad
                got = sg.layers[layer][d]
                torch.testing.assert_close(got.h_full, want_h, rtol=1e-10, atol=1e-14)
                torch.testing.assert_close(got.h, want_h.norm(dim=-1))
                if fused is nn.LSTM:
                    torch.testing.assert_close(got.c_full, want_c, rtol=1e-10, atol=1e-14)
                else:
                    assert got.c is None
        m.zero_grad()


def test_state_gradients_leave_the_model_untouched(untouched):
    snapshot, check = untouched
    m = nn.LSTM(3, 4, batch_first=True)
    for p in m.parameters():
        p.requires_grad_(False)
    before = snapshot(m)
    sg = rnnscope.state_gradients(m, torch.randn(2, 5, 3))
    check(m, before)
    assert sg.layers[0][0].h.shape == (2, 5) and sg.layers[0][0].h_full is None


class ScaledTanhCell(nn.Module):
    """A user cell with a tuple state: (h, m) with m a leaky running mean of h."""

    def __init__(self, i, h):
        super().__init__()
        self.lin = nn.Linear(i + h, h)
        self.hidden_size = h

    def forward(self, x, state):
        h, m = state
        h_new = torch.tanh(self.lin(torch.cat([x, h], -1))) + 0.5 * m
        return h_new, 0.9 * m + 0.1 * h_new


@pytest.mark.parametrize("cell_cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_autograd_path_equals_closed_form_on_builtin_cells(cell_cls):
    torch.manual_seed(0)
    cell = cell_cls(3, 4).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    state = "full" if cell_cls is nn.LSTMCell else "h"
    closed = rnnscope.step_jacobians(cell, x, state=state, keep="full")
    auto = rnnscope.step_jacobians(cell, x, method="autograd", keep="full")
    torch.testing.assert_close(auto.total, closed.total, rtol=1e-10, atol=1e-13)
    cj_closed = rnnscope.cell_jacobians(cell, x, state=state, keep="full")
    cj_auto = rnnscope.cell_jacobians(cell, x, method="autograd", keep="full")
    torch.testing.assert_close(cj_auto.total, cj_closed.total, rtol=1e-10, atol=1e-13)


def test_custom_cells_everywhere():
    torch.manual_seed(0)
    cell = ScaledTanhCell(3, 4).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    hx = (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    cj = rnnscope.cell_jacobians(cell, x, hx, keep="full")
    assert cj.total.shape == (2, 6, 8, 8) and cj.direct is None and cj.kind == "custom"
    # chain rule against torch.autograd.functional.jacobian of the unrolled cell
    def from_step(n):
        def f(flat):
            s = (flat[:, :4], flat[:, 4:])
            for t in range(n + 1, 6):
                s = cell(x[:, t], s)
            return torch.cat(s, -1)
        return f
    s = hx
    states = []
    for t in range(6):
        s = cell(x[:, t], s)
        states.append(torch.cat(s, -1).detach())
    for n in (0, 3):
        J = torch.autograd.functional.jacobian(from_step(n), states[n])
        want = torch.stack([J[b, :, b, :] for b in range(2)])
        torch.testing.assert_close(cj.total[:, n], want, rtol=1e-9, atol=1e-12)
    sg = rnnscope.state_gradients(cell, x, hx, keep="full")
    assert sg.layers[0][0].h.shape == (2, 6) and sg.layers[0][0].c.shape == (2, 6)
    assert rnnscope.lyapunov_spectrum(cell, x, hx).exponents.shape == (2, 8)
    with pytest.raises(ValueError, match="pass hx"):
        rnnscope.cell_jacobians(nn.Identity(), x)


def test_errors_are_clear():
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"state must be one of \('c', 'h', 'full'\)"):
        rnnscope.cell_jacobians(m, x, state="z")
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 1\)"):
        rnnscope.cell_jacobians(m, x, layer=1)
    with pytest.raises(ValueError, match="keep must be 'full' or 'norms'"):
        rnnscope.cell_jacobians(m, x, keep="some")
    with pytest.raises(ValueError, match="torch.func cannot"):
        rnnscope.cell_jacobians(m, x, method="autograd")
    with pytest.raises(ValueError, match=r"state must be one of \('h',\)"):
        rnnscope.step_jacobians(nn.GRU(3, 4), x, state="c")


def test_spectral_norm_helper_matches_svd_at_every_scale():
    from rnnscope.spectral import spectral_norms

    torch.manual_seed(0)
    x = torch.randn(5, 7, 4, dtype=torch.float64)
    want = torch.linalg.matrix_norm(x, ord=2)
    for scale in (1.0, 1e-200, 1e150):
        torch.testing.assert_close(spectral_norms(x * scale), want * scale, rtol=1e-12, atol=0)
    assert spectral_norms(torch.zeros(2, 3, 3)).tolist() == [0.0, 0.0]


def test_jacobian_results_plot_and_serialise():
    pytest.importorskip("matplotlib")
    import json

    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 8, 3)
    cj = rnnscope.cell_jacobians(m, x, keep="norms")
    fig = cj.plot()
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes) == 2
    d = json.loads(json.dumps(cj.to_dict(), allow_nan=False))
    assert rnnscope.CellJacobians.from_dict(d) == cj
    curves = rnnscope.JacobianNorms.from_dict(cj.norms().to_dict()).by_distance()
    for k, v in cj.by_distance().items():
        torch.testing.assert_close(curves[k], v)
    sg = rnnscope.state_gradients(m, x)
    assert sg.plot().axes[0].get_yscale() == "log"
    json.dumps(sg.to_dict(), allow_nan=False)
    plt.close("all")


def test_state_gradients_count_nonfinite_values():
    m = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    assert rnnscope.state_gradients(m, x).layers[0][0].nonfinite == 0
    x[0, 1, 0] = float("nan")  # (an Inf would saturate the gates and give finite gradients)
    sg = rnnscope.state_gradients(m, x, loss="all")
    assert sg.layers[0][0].nonfinite > 0
    h = sg.layers[0][0].h
    assert not torch.isfinite(h[0]).all() and torch.isfinite(h[1]).all()


def test_step_jacobians_stream_across_chunks():
    """T = 40 spans several chunks of CHUNK = 16 steps: the LSTM "c" Jacobian at the first step
    of a chunk needs E of the previous chunk's last step. Checked against the autograd oracle,
    and keep="norms" and the chunked summary against norms of the kept matrices; the default
    chunk (one chunk here) agrees."""
    CHUNK = 16

    torch.manual_seed(0)
    m = nn.LSTM(2, 3, batch_first=True).double()
    with torch.no_grad():
        m.weight_hh_l0.mul_(3.0)
    T = 40
    assert T > 2 * CHUNK
    x = torch.randn(2, T, 2, dtype=torch.float64)
    sj = rnnscope.step_jacobians(m, x, keep="full", chunk_size=CHUNK)
    torch.testing.assert_close(rnnscope.step_jacobians(m, x, keep="full").total, sj.total,
                               rtol=1e-12, atol=1e-15)
    for n in (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK):
        want = oracle_cell_jacobians(m, x[:, :n + 1], state="c")[:, n - 1]  # ∂c_n/∂c_{n−1}
        torch.testing.assert_close(sj.total[:, n], want, rtol=1e-9, atol=1e-12)
    per_step = torch.linalg.matrix_norm(sj.indirect, ord=2)  # (B, T)
    norms = rnnscope.step_jacobians(m, x, keep="norms", chunk_size=CHUNK)
    assert norms.indirect is None
    torch.testing.assert_close(norms.indirect_spectral, per_step, rtol=1e-12, atol=0)
    torch.testing.assert_close(norms.direct, sj.direct, rtol=0, atol=0)
    for s in (sj.summary(), norms.summary()):
        torch.testing.assert_close(s["indirect_spectral"], per_step.mean(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(s["direct_mean"], sj.direct.abs().mean((0, 2)))
        assert s["samples"] == 2 and s["nonfinite_samples"] == 0


@pytest.mark.parametrize("dtype, proj, k, chunk", [(torch.float64, 0, None, None),
                                                  (torch.float32, 2, 2, 3),
                                                  (torch.float32, 0, 1, 4)])
def test_lstm_lyapunov_from_frame_products_equals_the_dense_jacobians(dtype, proj, k, chunk,
                                                                      monkeypatch):
    """The LSTM's exponents come from F_n·Q without forming F_n (cells.lstm.step_jvp); the
    same exponents as the QR method on the formed Jacobians, on layer 1, direction 1 of a
    bidirectional module with a projection, across chunk boundaries. Float64: to rounding.
    Float32: the dense path forms each Jacobian entry in float32 before its float64 products,
    this one multiplies the float32 gate values in float64, so they differ by float32 rounding
    of the entries (~1e-8 relative measured)."""
    from rnnscope import jacobians

    torch.manual_seed(7)
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=proj,
                batch_first=True).to(dtype)
    x = torch.randn(3, 11, 3, dtype=dtype) * 2
    with torch.no_grad():
        tr = rnnscope.replay(m, x)
    got = rnnscope.lyapunov_spectrum(tr, layer=1, direction=1, k=k, warmup=2,
                                     chunk_size=chunk).exponents
    monkeypatch.setattr(jacobians, "_LSTMFullStateJVP", lambda *a: None)  # the dense path
    want = rnnscope.lyapunov_spectrum(tr, layer=1, direction=1, k=k, warmup=2,
                                      chunk_size=chunk).exponents
    assert got.shape == want.shape == (3, k or (proj or 4) + 4)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert k == 1 or (want[:, 0] - want[:, -1]).min() > 0.01  # distinct: a slip shows


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_lstm_cell_state_steps_equal_the_full_state_route(monkeypatch, chunk):
    """step_jacobians of an LSTM's cell state (no projection, unpacked) takes the split form
    diag(f_n) + K_n diag(e_{n−1}) (cells.lstm.cell_state_steps) instead of [0 I] F_n [E; I]
    from the full-state matrices: the same direct, indirect, norms and non-finite flags, across
    chunk boundaries (e_{n−1} carried), both directions, a NaN sample included."""
    import warnings

    from rnnscope import jacobians as J

    torch.manual_seed(4)
    m = nn.LSTM(5, 12, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 23, 5, dtype=torch.float64)
    x[1, 9] = float("nan")
    real = J._recurrence

    def full_state_route(*a, **k):
        rec = real(*a, **k)
        assert rec.c_steps is not None  # the split form was on offer
        rec.c_steps = None
        return rec

    for d in (0, 1):
        for keep in ("full", "norms"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                split = rnnscope.step_jacobians(m, x, layer=1, direction=d, state="c",
                                                keep=keep, chunk_size=chunk)
                monkeypatch.setattr(J, "_recurrence", full_state_route)
                full = rnnscope.step_jacobians(m, x, layer=1, direction=d, state="c",
                                               keep=keep, chunk_size=chunk)
                monkeypatch.setattr(J, "_recurrence", real)
            assert torch.equal(split.nonfinite, full.nonfinite) and bool(split.nonfinite[1])
            for name in ("direct", "indirect", "indirect_spectral"):
                a, b = getattr(split, name), getattr(full, name)
                if b is None:
                    assert a is None
                    continue
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, equal_nan=True)
