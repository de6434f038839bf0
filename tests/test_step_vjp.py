"""The cells' one-step VJP contract (cells.CELLS[kind].step_vjp) against float64 autograd.

The oracle is torch.autograd.functional.vjp of one step written here from PyTorch's documented
equations (tests/reference.py's `reference_step`), with W_ih = I so that the step's input is its
input projection gx_n itself and the gradient with respect to it is the contract's d_in.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from rnnscope.cells import CELLS
from rnnscope.recurrent import LayerParams
from reference import reference_step

B, H = 3, 5
G = {"rnn": 1, "gru": 3, "lstm": 4}
CASES = [("rnn", "tanh", 0), ("rnn", "relu", 0), ("gru", "tanh", 0), ("lstm", "tanh", 0),
         ("lstm", "tanh", 3)]  # the last: proj_size P = 3


def _params(kind: str, proj: int, gen) -> LayerParams:
    P = proj or H
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return LayerParams(w_ih=torch.eye(G[kind] * H, dtype=torch.float64),
                       w_hh=rnd(G[kind] * H, P) * 0.6, b_ih=rnd(G[kind] * H) * 0.3,
                       b_hh=rnd(G[kind] * H) * 0.3, w_hr=rnd(P, H) * 0.6 if proj else None)


def _as_dict(p: LayerParams) -> dict:
    return {"w_ih": p.w_ih, "w_hh": p.w_hh, "b_ih": p.b_ih, "b_hh": p.b_hh, "w_hr": p.w_hr}


def _saved(kind: str, nl: str, p: LayerParams, gx, h_prev, c_prev):
    """The cell's VJPSaved from gate values computed here from the documented equations."""
    cell = CELLS[kind]
    pre_h = h_prev @ p.w_hh.t() + p.b_hh
    pre = gx + p.b_ih + pre_h  # W_ih = I
    if kind == "rnn":
        h = torch.tanh(pre) if nl == "tanh" else torch.relu(pre)
        return cell.vjp_saved(h, nl)
    if kind == "lstm":
        i, f, g, o = pre.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        return cell.vjp_saved(i, f, g, o, c_prev, f * c_prev + i * g)
    gi_r, gi_z, gi_n = (gx + p.b_ih).chunk(3, dim=-1)
    gh_r, gh_z, gh_n = pre_h.chunk(3, dim=-1)
    r, z = torch.sigmoid(gi_r + gh_r), torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    return cell.vjp_saved(r, z, n, h_prev, gh_n)


def _oracle(kind: str, nl: str, p: LayerParams, gx, h_prev, c_prev, d_state):
    """((dh_prev, dc_prev), d_gx) for one (B, ·) cotangent by float64 autograd."""
    pd = _as_dict(p)  # with W_ih = I the step's input x is gx_n − b_ih: ∂/∂x = ∂/∂gx_n
    if kind == "lstm":
        fn = lambda h, c, x: reference_step("lstm", pd, x, h, c)  # noqa: E731
        _, vjps = torch.autograd.functional.vjp(fn, (h_prev, c_prev, gx), v=d_state)
        return vjps[:2], vjps[2]
    fn = lambda h, x: reference_step(kind, pd, x, h, nonlinearity=nl)[0]  # noqa: E731
    _, vjps = torch.autograd.functional.vjp(fn, (h_prev, gx), v=d_state[0])
    return vjps[:1], vjps[1]


def _inputs(kind: str, proj: int, gen):
    P = proj or H
    gx = torch.randn(B, G[kind] * H, generator=gen, dtype=torch.float64)
    h_prev = torch.randn(B, P, generator=gen, dtype=torch.float64) * 0.7
    c_prev = torch.randn(B, H, generator=gen, dtype=torch.float64) if kind == "lstm" else None
    return gx, h_prev, c_prev


def _cotangent(kind: str, proj: int, lead: tuple, gen) -> tuple:
    P = proj or H
    dh = torch.randn(*lead, P, generator=gen, dtype=torch.float64)
    if kind != "lstm":
        return (dh,)
    return dh, torch.randn(*lead, H, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("kind,nl,proj", CASES)
def test_step_vjp_on_stacked_rows_equals_autograd(kind, nl, proj):
    """Cotangents (R, B, ·) against saved fields (B, ·): each of the R rows is one VJP."""
    gen = torch.Generator().manual_seed(10 + len(kind) + proj)
    p = _params(kind, proj, gen)
    gx, h_prev, c_prev = _inputs(kind, proj, gen)
    cell = CELLS[kind]
    s = _saved(kind, nl, p, gx, h_prev, c_prev)
    R = 4
    d = _cotangent(kind, proj, (R, B), gen)
    d_prev, d_in = cell.step_vjp(cell.vjp_weights(p), s, d)
    assert isinstance(d_prev, tuple) and len(d_prev) == len(d)
    for r in range(R):
        want_prev, want_in = _oracle(kind, nl, p, gx, h_prev, c_prev, tuple(t[r] for t in d))
        for got, want in zip(d_prev, want_prev):
            torch.testing.assert_close(got[r], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d_in[r], want_in, rtol=1e-12, atol=1e-12)
        assert want_in.abs().max() > 1e-3 and want_prev[0].abs().max() > 1e-3  # not trivial


@pytest.mark.parametrize("kind,nl,proj", CASES)
def test_step_vjp_folded_per_sample_rows_equals_autograd(kind, nl, proj):
    """fold=True: cotangents (B, N, ·) against saved fields (B, 1, ·), N rows per sample."""
    gen = torch.Generator().manual_seed(20 + len(kind) + proj)
    p = _params(kind, proj, gen)
    gx, h_prev, c_prev = _inputs(kind, proj, gen)
    cell = CELLS[kind]
    s = _saved(kind, nl, p, gx, h_prev, c_prev)
    s1 = type(s)(*(t.unsqueeze(1) for t in s))
    N = 6
    d = _cotangent(kind, proj, (B, N), gen)
    d_prev, _ = cell.step_vjp(cell.vjp_weights(p), s1, d, fold=True)
    for j in range(N):
        want_prev, _ = _oracle(kind, nl, p, gx, h_prev, c_prev, tuple(t[:, j] for t in d))
        for got, want in zip(d_prev, want_prev):
            torch.testing.assert_close(got[:, j], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proj", [0, 3])
def test_lstm_dc_total_is_the_total_cell_state_cotangent(proj):
    """dc_total = ∂(dh·h_n + dc·c_n)/∂c_n with h_n = [W_hr](o_n tanh c_n) moving with c_n."""
    gen = torch.Generator().manual_seed(30 + proj)
    p = _params("lstm", proj, gen)
    gx, h_prev, c_prev = _inputs("lstm", proj, gen)
    s = _saved("lstm", "tanh", p, gx, h_prev, c_prev)
    d = _cotangent("lstm", proj, (B,), gen)
    out = torch.empty(B, H, dtype=torch.float64)
    CELLS["lstm"].step_vjp(CELLS["lstm"].vjp_weights(p), s, d, dc_total=out)
    pre_i, pre_f, pre_g, pre_o = (gx + p.b_ih + h_prev @ p.w_hh.t() + p.b_hh).chunk(4, dim=-1)
    o = torch.sigmoid(pre_o)
    c_n = (torch.sigmoid(pre_f) * c_prev + torch.sigmoid(pre_i) * torch.tanh(pre_g))
    c_n.requires_grad_()
    h_n = o * torch.tanh(c_n)
    if proj:
        h_n = h_n @ p.w_hr.t()
    (want,) = torch.autograd.grad((d[0] * h_n).sum() + (d[1] * c_n).sum(), c_n)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_every_cell_has_the_same_contract():
    names = {k: (list(inspect.signature(m.step_vjp).parameters),
                 hasattr(m, "vjp_weights"), hasattr(m, "vjp_saved")) for k, m in CELLS.items()}
    assert len({str(v) for v in names.values()}) == 1, names


@pytest.mark.parametrize("kind,nl,proj", CASES)
def test_step_vjp_into_accumulates_hidden_and_input_gradients(kind, nl, proj):
    """into=: (∂/∂h_{n−1} | ∂/∂x_n) added to what the buffer held (W_ih = I here, so
    ∂/∂x_n = d_in); an LSTM's dc buffer becomes dc_{n−1} in place."""
    gen = torch.Generator().manual_seed(40 + len(kind) + proj)
    p = _params(kind, proj, gen)
    gx, h_prev, c_prev = _inputs(kind, proj, gen)
    cell = CELLS[kind]
    s = _saved(kind, nl, p, gx, h_prev, c_prev)
    R, P, I = 2, proj or H, G[kind] * H
    d = _cotangent(kind, proj, (R, B), gen)
    held = torch.randn(R, B, P + I, generator=gen, dtype=torch.float64)
    into = held.clone()
    d_run = tuple(t.clone() for t in d)
    d_prev, _ = cell.step_vjp(cell.vjp_weights(p, inputs=True), s, d_run, into=into)
    for r in range(R):
        want_prev, want_in = _oracle(kind, nl, p, gx, h_prev, c_prev, tuple(t[r] for t in d))
        torch.testing.assert_close(into[r, :, :P], held[r, :, :P] + want_prev[0], rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(into[r, :, P:], held[r, :, P:] + want_in, rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(d_prev[0][r], into[r, :, :P])
        if kind == "lstm":
            torch.testing.assert_close(d_run[1][r], want_prev[1], rtol=1e-12, atol=1e-12)
