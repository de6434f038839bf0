"""The adjoint span sweep against a float64 autograd oracle on the reference loop, against the
dense sweep of cell_jacobians; its norms against matrix_norm (the spectral-norm routine itself
is tested in test_spectral.py)."""

import copy
import math
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnscope
from rnnscope import jacobians, span_sweep
from rnnscope.recurrent import describe
from rnnscope.span_sweep import span_jacobians
from reference import KINDS, oracle_cell_jacobians

# (kind, module options, state, layer, direction, with hx)
CONFIGS = [
    ("lstm", {}, "c", 0, 0, False),
    ("lstm", {}, "h", 0, 0, True),
    ("lstm", {}, "full", 0, 0, False),
    ("lstm", {"proj_size": 2}, "c", 0, 0, True),
    ("lstm", {"proj_size": 2}, "h", 0, 0, False),
    ("lstm", {"proj_size": 3}, "full", 0, 0, True),
    ("lstm", {"num_layers": 2}, "c", 0, 0, True),
    ("lstm", {"num_layers": 2}, "c", 1, 0, True),
    ("lstm", {"num_layers": 2, "proj_size": 2}, "full", 1, 0, False),
    ("lstm", {"bidirectional": True}, "c", 0, 1, True),
    ("lstm", {"bidirectional": True, "num_layers": 2}, "h", 1, 1, True),
    ("lstm", {"bidirectional": True, "proj_size": 3}, "full", 0, 1, False),
    ("lstm", {"bias": False}, "c", 0, 0, False),
    ("gru", {}, "h", 0, 0, False),
    ("gru", {"num_layers": 2}, "h", 1, 0, True),
    ("gru", {"bidirectional": True}, "h", 0, 1, True),
    ("gru", {"bias": False}, "h", 0, 0, True),
    ("rnn_tanh", {}, "h", 0, 0, True),
    ("rnn_tanh", {"bidirectional": True, "num_layers": 2}, "h", 1, 1, False),
    ("rnn_relu", {}, "h", 0, 0, False),
    ("rnn_relu", {"num_layers": 2}, "h", 1, 0, True),
]


def _build(kind, opts, B, T, seed, with_hx, dtype=torch.float64, scale=2.0):
    torch.manual_seed(seed)
    cfg = dict(input_size=3, hidden_size=5, batch_first=True, **opts)
    m = KINDS[kind](**cfg).to(dtype)
    with torch.no_grad():  # larger weights than the default: make the indirect paths matter
        for p in m.parameters():
            p.mul_(scale)
    x = torch.randn(B, T, 3, dtype=dtype)
    hx = None
    if with_hx:
        LD = cfg.get("num_layers", 1) * (2 if cfg.get("bidirectional") else 1)
        P = cfg.get("proj_size", 0) or cfg["hidden_size"]
        hx = torch.randn(LD, B, P, dtype=dtype)
        if kind == "lstm":
            hx = (hx, torch.randn(LD, B, cfg["hidden_size"], dtype=dtype))
    return m, x, hx


def _dense(m, x, hx, layer=0, direction=0, state=None):
    """cell_jacobians through its dense sweep of one-step Jacobians (not the adjoint sweep)."""
    real = jacobians._recurrence

    def no_adjoint(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), closed=None)

    jacobians._recurrence = no_adjoint
    try:
        return rnnscope.cell_jacobians(m, x, hx, layer=layer, direction=direction, state=state,
                                       keep="full")
    finally:
        jacobians._recurrence = real


CHUNK = 16  # chunk_size of the tests that cross chunk boundaries (the default is up to 64)


def _sweep(m, x, hx, layer, direction, state, keep="full", chunk_size=None):
    spec = describe(m)
    with torch.no_grad():
        lt = rnnscope.replay(m, x, hx).layers[layer][direction]
    return span_jacobians(lt, spec.params(layer, direction), kind=spec.kind, state=state,
                          nonlinearity=spec.nonlinearity, keep=keep, chunk_size=chunk_size)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[2]}-{c[1]}-l{c[3]}d{c[4]}"
                         f"{'-hx' if c[5] else ''}")
def test_span_jacobians_equal_the_float64_autograd_oracle(config):
    kind, opts, state, layer, direction, with_hx = config
    m, x, hx = _build(kind, opts, 2, 6, 7, with_hx)
    want = oracle_cell_jacobians(m, x, hx, layer, direction, state)
    got = _sweep(m, x, hx, layer, direction, state)
    assert want[:, 0].abs().max() > 1e-3  # the longest span does not vanish trivially
    torch.testing.assert_close(got.total, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got.spectral, torch.linalg.matrix_norm(want, ord=2), rtol=1e-8,
                               atol=1e-12)
    torch.testing.assert_close(got.frobenius, torch.linalg.matrix_norm(want), rtol=1e-10,
                               atol=1e-14)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[2]}-{c[1]}-l{c[3]}d{c[4]}"
                         f"{'-hx' if c[5] else ''}")
def test_span_jacobians_equal_the_dense_sweep_of_cell_jacobians(config):
    kind, opts, state, layer, direction, with_hx = config
    T = CHUNK * 2 + 3  # crosses chunk boundaries, a short last chunk
    m, x, hx = _build(kind, opts, 3, T, 11, with_hx, scale=1.0)
    dense = _dense(m, x, hx, layer, direction, state)
    got = _sweep(m, x, hx, layer, direction, state, chunk_size=CHUNK)
    torch.testing.assert_close(got.total, dense.total, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(got.spectral, dense.spectral, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(got.frobenius, dense.frobenius, rtol=1e-10, atol=1e-14)
    assert (got.direct is None) == (dense.direct is None)
    assert (got.share is None) == (dense.share is None)
    if got.direct is not None:
        torch.testing.assert_close(got.direct, dense.direct, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.share, dense.share, rtol=1e-9, atol=1e-12,
                                   equal_nan=True)
    norms = _sweep(m, x, hx, layer, direction, state, keep="norms")
    assert norms.total is None
    torch.testing.assert_close(norms.spectral, got.spectral, rtol=1e-14, atol=0)
    torch.testing.assert_close(norms.frobenius, got.frobenius, rtol=1e-14, atol=0)
    if got.share is not None:
        torch.testing.assert_close(norms.share, got.share, rtol=1e-14, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind,state", [("lstm", "c"), ("lstm", "h"), ("lstm", "full"),
                                        ("lstm-proj", "c"), ("gru", "h"), ("rnn_tanh", "h")])
def test_float32_agrees_with_the_dense_sweep(kind, state):
    opts = {"proj_size": 3} if kind == "lstm-proj" else {}
    m, x, hx = _build(kind.replace("-proj", ""), opts, 4, 40, 3, True, dtype=torch.float32,
                      scale=1.0)
    dense = _dense(m, x, hx, state=state)
    got = _sweep(m, x, hx, 0, 0, state)
    assert got.total.dtype == torch.float32
    fro = lambda t: torch.linalg.matrix_norm(t.double())  # noqa: E731  (B, T)
    # float32 roundings of two different orders of operations: 1e−6 of the largest entry, and
    # 1e−5 of each J_n's own size even where J_n has decayed by 1e−10
    assert (got.total - dense.total).abs().max() < 1e-6 * dense.total.abs().max()
    assert (fro(got.total - dense.total) / fro(dense.total)).max() < 1e-5
    assert ((got.spectral - dense.spectral).abs() / dense.spectral).max() < 1e-5
    # and no further from the float64 truth than the dense float32 sweep is
    hx64 = None if hx is None else tuple(h.double() for h in hx) if isinstance(hx, tuple) \
        else hx.double()
    truth = _sweep(m.double(), x.double(), hx64, 0, 0, state).total
    err_sweep = (fro(got.total.double() - truth) / fro(truth)).max()
    err_dense = (fro(dense.total.double() - truth) / fro(truth)).max()
    assert err_sweep <= 2 * err_dense + 1e-7


@pytest.mark.parametrize("T", [1, 2, CHUNK, CHUNK + 1])
def test_short_and_boundary_lengths(T):
    m, x, hx = _build("lstm", {}, 2, T, 5, True)
    got = _sweep(m, x, hx, 0, 0, "c", chunk_size=CHUNK)
    dense = _dense(m, x, hx)
    torch.testing.assert_close(got.total, dense.total, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got.total[:, -1], torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    torch.testing.assert_close(got.direct[:, -1], torch.ones(2, 5, dtype=torch.float64))


def test_zero_recurrent_weights_give_the_forget_gate_product():
    torch.manual_seed(0)
    m = nn.LSTM(3, 5, batch_first=True).double()
    with torch.no_grad():
        m.weight_hh_l0.zero_()
    x = torch.randn(3, 11, 3, dtype=torch.float64)
    got = _sweep(m, x, None, 0, 0, "c")
    f = rnnscope.replay(m, x).layers[0][0].gates["f"].detach()
    for t in range(11):
        torch.testing.assert_close(got.total[:, t], torch.diag_embed(f[:, t + 1:].prod(1)),
                                   rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.share, torch.ones(3, 11, dtype=torch.float64))


def test_packed_trace_and_bad_options_are_refused():
    m = nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    p = describe(m).params(0, 0)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=True)
    with torch.no_grad():
        lt_packed = rnnscope.replay(m, packed).layers[0][0]
        lt = rnnscope.replay(m, x).layers[0][0]
    with pytest.raises(ValueError, match="packed"):
        span_jacobians(lt_packed, p, kind="lstm", state="c")
    with pytest.raises(ValueError, match="state must be one of"):
        span_jacobians(lt, p, kind="lstm", state="z")
    with pytest.raises(ValueError, match="keep must be"):
        span_jacobians(lt, p, kind="lstm", state="c", keep="some")
    with pytest.raises(ValueError, match="kind must be"):
        span_jacobians(lt, p, kind="transformer", state="h")


def test_the_trace_and_the_model_are_left_as_found():
    m = nn.LSTM(3, 4, batch_first=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 5, 3)
    lt = rnnscope.replay(m, x).layers[0][0]  # with a graph: the sweep must not extend it
    h = lt.h.clone()
    span_jacobians(lt, describe(m).params(0, 0), kind="lstm", state="full")
    assert torch.equal(lt.h, h)
    assert lt.gates["f"].requires_grad and lt.c.requires_grad  # cached with the graph, as fresh
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_cell_jacobians_dispatches_to_the_adjoint_sweep():
    m, x, hx = _build("lstm", {"proj_size": 2}, 2, 9, 4, True)
    cj = rnnscope.cell_jacobians(m, x, hx, state="full", keep="full")
    sw = _sweep(m, x, hx, 0, 0, "full")
    assert torch.equal(cj.total, sw.total) and torch.equal(cj.spectral, sw.spectral)
    dense = _dense(m, x, hx, state="full")
    torch.testing.assert_close(cj.total, dense.total, rtol=1e-10, atol=1e-14)
    assert cj.positions.tolist() == list(range(9)) and cj.state == "full" and cj.kind == "lstm"


def _contracting(kind):
    torch.manual_seed(0)
    if kind == "lstm":
        m = nn.LSTM(4, 8, batch_first=True)
        with torch.no_grad():
            m.bias_ih_l0[8:16] -= 3.0  # forget gates ~0.05: a fast-forgetting cell
    elif kind == "gru":
        m = nn.GRU(4, 8, batch_first=True)
        with torch.no_grad():
            m.bias_ih_l0[8:16] -= 4.0  # retain gates ~0.02
    else:
        m = nn.RNN(4, 8, batch_first=True)
        with torch.no_grad():
            m.weight_hh_l0.mul_(0.1)
    return m


@pytest.mark.parametrize("kind, state", [("lstm", "c"), ("lstm", "h"), ("lstm", "full"),
                                         ("gru", "h"), ("rnn", "h")])
def test_float32_span_norms_are_exact_beyond_float32_range(kind, state):
    """A float32 model whose span Jacobians leave float32's range (below 1e-45) after tens of
    steps: the sweep's power-of-two rescaling keeps the norms and shares exact, equal to the
    float64 copy of the model (to the float32 forward's rounding) down to 1e-300, where
    unscaled float32 arithmetic gives 0 (and a highway share of 0.5)."""
    m = _contracting(kind)
    x = torch.randn(2, 300, 4, generator=torch.Generator().manual_seed(1))
    got = rnnscope.cell_jacobians(m, x, state=state, keep="norms")
    want = rnnscope.cell_jacobians(copy.deepcopy(m).double(), x.double(), state=state,
                                   keep="norms")
    far = got.spectral[:, 0]
    assert (far < 1e-60).all()
    ok = want.spectral > 1e-300  # past float64's own range both are 0
    torch.testing.assert_close(got.spectral[ok], want.spectral[ok], rtol=1e-4, atol=0)
    torch.testing.assert_close(got.frobenius[ok], want.frobenius[ok], rtol=1e-4, atol=0)
    if want.share is not None:
        torch.testing.assert_close(got.share[ok], want.share[ok], rtol=1e-3, atol=1e-300)
        assert not (got.share == 0.5).any()
    if state in ("h", "full") and not (kind == "lstm" and state == "h"):  # a Markov state
        # an oracle that shares no rescaling: the plain float64 product of the float64
        # model's one-step Jacobians, J_{T−1} = I, J_n = J_{n+1} A_{n+1}
        A = rnnscope.step_jacobians(copy.deepcopy(m).double(), x.double(), state=state,
                                    keep="full").total  # (B, T, N, N)
        R = torch.eye(A.shape[-1], dtype=torch.float64).expand_as(A[:, 0])
        plain = torch.empty(A.shape[:2], dtype=torch.float64)
        for n in range(A.shape[1] - 1, -1, -1):
            plain[:, n] = torch.linalg.matrix_norm(R, ord=2)
            R = R @ A[:, n]
        normal = plain > 1e-290  # well inside float64's normal range
        assert bool((plain[normal] < 1e-60).any())  # and far beyond float32's
        torch.testing.assert_close(want.spectral[normal], plain[normal], rtol=1e-9, atol=0)
        torch.testing.assert_close(got.spectral[normal], plain[normal], rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rescale_moves_rows_into_range_by_exact_powers_of_two(dtype):
    """span_sweep.Rescale: a sample whose rows left [2^(minexp/2), 2^(maxexp/2)] is
    multiplied by an exact power of two (E records it, 2^E · rows unchanged); samples in range,
    zero, inf and nan rows are left as they are."""
    fi = torch.finfo(dtype)
    big, small = fi.max / 8, fi.tiny * 8
    a = torch.tensor([[[big, 1.0]], [[small, -small]], [[0.5, 0.25]], [[0.0, 0.0]],
                      [[math.inf, 1.0]], [[math.nan, 1.0]]], dtype=dtype)  # (B=6, 1, 2)
    b = a.clone() * 0.5  # a second part, smaller than the first
    before = [t.to(torch.float64, copy=True) for t in (a, b)]
    r = span_sweep.Rescale(dtype, 6, a.device)
    r((a, b))
    assert r.E[0] > 0 and r.E[1] < 0 and (r.E[2:] == 0).all()
    for t, t0 in zip((a, b), before):
        back = torch.ldexp(t.to(torch.float64), r.E.view(-1, 1, 1).to(torch.float64))
        assert torch.equal(back[:4], t0[:4])
        assert torch.equal(t[4:].isnan(), t0[4:].isnan()) and t[4, 0, 0] == math.inf
    assert a[0].abs().max() < 2.0 ** (math.log2(fi.max) // 2) and a[1].abs().max() >= 0.5


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float32_packed_span_norms_are_exact_beyond_float32_range(kind):
    """The dense sweep (packed inputs, custom cells) rescales its running product the same
    way: a packed float32 model's span norms and shares equal the float64 copy's far below
    float32's range."""
    m = _contracting(kind)
    x = torch.randn(2, 300, 4, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([300, 260])

    def packed(t):
        return pack_padded_sequence(t, lengths, batch_first=True)

    state = "c" if kind == "lstm" else "h"
    got = rnnscope.cell_jacobians(m, packed(x), state=state, keep="norms")
    want = rnnscope.cell_jacobians(copy.deepcopy(m).double(), packed(x.double()), state=state,
                                   keep="norms")
    assert (got.spectral[:, 0] < 1e-60).all()
    ok = want.spectral > 1e-300  # nan (not measured) and past float64's range left out
    torch.testing.assert_close(got.spectral[ok], want.spectral[ok], rtol=1e-4, atol=0)
    torch.testing.assert_close(got.share[ok], want.share[ok], rtol=1e-3, atol=1e-300)
    assert not (got.share[ok] == 0.5).any()
