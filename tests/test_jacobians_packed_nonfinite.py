"""Jacobian analyses on packed sequences, with non-finite values, and the highway share at
long spans — each against an independent float64 autograd oracle (tests/reference.py), run on
every sequence cut to its own length."""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnscope
from reference import (KINDS, layer_params, oracle_cell_jacobians, reference_forward,
                       reference_step)


# ---------------------------------------------------------------- packed sequences

@st.composite
def packed_jac_configs(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    cfg = dict(input_size=draw(st.integers(1, 3)), hidden_size=draw(st.integers(2, 4)),
               num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
               batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    if kind == "lstm" and draw(st.booleans()):
        cfg["proj_size"] = draw(st.integers(1, cfg["hidden_size"] - 1))
    state = draw(st.sampled_from(["c", "h", "full"])) if kind == "lstm" else "h"
    B = draw(st.integers(2, 3))
    lengths = draw(st.lists(st.integers(1, 5), min_size=B, max_size=B))
    if min(lengths) == max(lengths):  # make sure some sample is shorter than T
        lengths[0] = max(1, lengths[0] - 1) if lengths[0] > 1 else 2
    return dict(kind=kind, cfg=cfg, state=state, lengths=lengths,
                layer=draw(st.integers(0, cfg["num_layers"] - 1)),
                direction=draw(st.integers(0, 1 if cfg["bidirectional"] else 0)),
                enforce_sorted=draw(st.booleans()), with_hx=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def _packed_case(c):
    torch.manual_seed(c["seed"])
    kind, cfg = c["kind"], c["cfg"]
    m = KINDS[kind](**cfg).double()
    with torch.no_grad():  # larger weights than the default: the indirect paths matter
        for p in m.parameters():
            p.mul_(2.0)
    lengths = list(c["lengths"])
    if c["enforce_sorted"]:
        lengths = sorted(lengths, reverse=True)
    B, T = len(lengths), max(lengths)
    x = torch.randn(B, T, cfg["input_size"], dtype=torch.float64)  # batch-major
    hx = None
    if c["with_hx"]:
        LD = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
        P = cfg.get("proj_size", 0) or cfg["hidden_size"]
        hx = torch.randn(LD, B, P, dtype=torch.float64)
        if kind == "lstm":
            hx = (hx, torch.randn(LD, B, cfg["hidden_size"], dtype=torch.float64))
    xin = x if cfg["batch_first"] else x.transpose(0, 1)
    packed = pack_padded_sequence(xin, torch.tensor(lengths), batch_first=cfg["batch_first"],
                                  enforce_sorted=c["enforce_sorted"])
    return m, x, packed, hx, lengths


def _sample_hx(hx, b):
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(h[:, b:b + 1] for h in hx)
    return hx[:, b:b + 1]


def _steps_of(direction, T, n):
    """Processing steps of the packed result holding a sequence of n steps (processing order
    of the cut sequence): direction 0 runs steps 0..n−1, direction 1 steps T−n..T−1."""
    return list(range(n)) if direction == 0 else list(range(T - n, T))


@given(packed_jac_configs())
def test_packed_cell_jacobians_equal_the_oracle_on_each_cut_sequence(c):
    m, x, packed, hx, lengths = _packed_case(c)
    layer, d, state = c["layer"], c["direction"], c["state"]
    B, T = x.shape[:2]
    got = rnnscope.cell_jacobians(m, packed, hx, layer=layer, direction=d, state=state,
                                  keep="full")
    norms = rnnscope.cell_jacobians(m, packed, hx, layer=layer, direction=d, state=state,
                                    keep="norms")
    assert got.valid is not None and got.valid.shape == (B, T)
    assert not got.nonfinite.any()
    wants = [oracle_cell_jacobians(m, x[b:b + 1, :n], _sample_hx(hx, b), layer, d, state)[0]
             for b, n in enumerate(lengths)]
    for b, n in enumerate(lengths):
        want = wants[b]
        steps = _steps_of(d, T, n)
        assert got.valid[b].tolist() == [t in steps for t in range(T)]
        torch.testing.assert_close(got.total[b, steps], want, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got.spectral[b, steps], torch.linalg.matrix_norm(want, ord=2),
                                   rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(norms.spectral[b, steps], got.spectral[b, steps],
                                   rtol=1e-10, atol=1e-14)
        others = [t for t in range(T) if t not in steps]  # never measured
        assert got.total[b, others].isnan().all() and got.spectral[b, others].isnan().all()
        assert norms.spectral[b, others].isnan().all()
        if got.direct is not None:
            assert got.direct[b, others].isnan().all() and got.share[b, others].isnan().all()
    # summaries by distance from each sequence's own end: the oracle's mean over the samples
    # that have each distance (never padding, which would count as no decay)
    by = got.by_distance()
    for k in range(T):
        vals = [torch.linalg.matrix_norm(wants[b][n - 1 - k], ord=2)
                for b, n in enumerate(lengths) if k < n]
        torch.testing.assert_close(by["spectral"][k], torch.stack(vals).mean(), rtol=1e-8,
                                   atol=1e-12)
    assert by["samples"] == B and by["nonfinite_samples"] == 0


@given(packed_jac_configs())
def test_packed_step_jacobians_and_lyapunov_use_each_sequence_alone(c):
    m, x, packed, hx, lengths = _packed_case(c)
    layer, d = c["layer"], c["direction"]
    kind = c["kind"]
    state = "full" if kind == "lstm" else "h"  # a Markov state: J_n = J_{n+1} A_{n+1}
    B, T = x.shape[:2]
    sj = rnnscope.step_jacobians(m, packed, hx, layer=layer, direction=d, state=state,
                                 keep="full")
    sj_norms = rnnscope.step_jacobians(m, packed, hx, layer=layer, direction=d, state=state,
                                       keep="norms")
    lyap = rnnscope.lyapunov_spectrum(m, packed, hx, layer=layer, direction=d).exponents
    summary = sj.summary()
    per = torch.full((B, T), math.nan, dtype=torch.float64)
    for b, n in enumerate(lengths):
        want = oracle_cell_jacobians(m, x[b:b + 1, :n], _sample_hx(hx, b), layer, d, state)[0]
        steps = _steps_of(d, T, n)
        A = sj.total[b, steps]  # (n, N, N)
        for j in range(n - 1):  # chain rule against the oracle's span Jacobians
            torch.testing.assert_close(want[j], want[j + 1] @ A[j + 1], rtol=1e-8, atol=1e-12)
        others = [t for t in range(T) if t not in steps]
        assert sj.indirect[b, others].isnan().all()
        per[b, steps] = torch.linalg.matrix_norm(sj.indirect[b, steps], ord=2)
        # Lyapunov exponents by QR over this sequence's own steps only
        N = A.shape[-1]
        Q = torch.eye(N, dtype=torch.float64)
        acc = torch.zeros(N, dtype=torch.float64)
        smallest = torch.full((N,), math.inf, dtype=torch.float64)  # min |R_ii| / ‖A_j‖
        for j in range(n):
            Q, R = torch.linalg.qr(A[j] @ Q)
            r = torch.diagonal(R).abs()
            acc += r.log()
            smallest = torch.minimum(smallest, r / torch.linalg.matrix_norm(A[j], ord=2))
        # A direction that some step maps to zero (relu units at 0 make A singular) has a
        # diagonal entry at rounding level (|R_ii| ~ 1e-16·‖A‖): its exponent is log of
        # rounding noise, and two correct QR codes disagree on it. Every other exponent is
        # determined and must appear in rnnscope's spectrum.
        determined = acc[smallest > 1e-10] / n
        for e in determined:
            assert torch.isclose(lyap[b], e, rtol=1e-9, atol=1e-12).any(), (b, e, lyap[b])
        if determined.numel() == N:
            torch.testing.assert_close(lyap[b], (acc / n).sort(descending=True).values,
                                       rtol=1e-9, atol=1e-12)
    if kind == "lstm":  # the reduced "c" view: at a sequence's first step E_{n−1} = 0 (its
        # h0 is an input), also for direction 1, whose first step is T − length
        c_view = rnnscope.step_jacobians(m, packed, hx, layer=layer, direction=d, state="c",
                                         keep="full")
        for b, n in enumerate(lengths):
            xb = x[b:b + 1, :n] if c["cfg"]["batch_first"] else x[b:b + 1, :n].transpose(0, 1)
            alone = rnnscope.step_jacobians(m, xb, _sample_hx(hx, b), layer=layer, direction=d,
                                            state="c", keep="full")
            torch.testing.assert_close(c_view.total[b, _steps_of(d, T, n)], alone.total[0],
                                       rtol=1e-10, atol=1e-13)
    want_mean = torch.stack([per[:, t][~per[:, t].isnan()].mean() for t in range(T)])
    torch.testing.assert_close(summary["indirect_spectral"], want_mean, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(sj_norms.summary()["indirect_spectral"], want_mean, rtol=1e-10,
                               atol=1e-14)
    assert sj_norms.indirect is None
    with pytest.raises(ValueError, match="keep='norms'"):
        sj_norms.total  # noqa: B018 (the property access itself raises)


def test_packed_lyapunov_warmup_counts_each_sequences_own_steps():
    torch.manual_seed(0)
    m = nn.GRU(2, 3, batch_first=True).double()
    x = torch.randn(2, 6, 2, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 2]), batch_first=True)
    got = rnnscope.lyapunov_spectrum(m, packed, warmup=2).exponents
    want0 = rnnscope.lyapunov_spectrum(m, x[:1], warmup=2).exponents
    torch.testing.assert_close(got[0], want0[0], rtol=1e-12, atol=0)
    assert got[1].isnan().all()  # 2 steps, both warmup: nothing counted


# ---------------------------------------------------------------- non-finite values

def _nan_case(kind):
    torch.manual_seed(1)
    m = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](3, 4, batch_first=True).double()
    x = torch.randn(3, 9, 3, dtype=torch.float64)
    return m, x


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_nan_in_one_sample_leaves_the_others_exact(kind):
    m, x = _nan_case(kind)
    bad = x.clone()
    bad[1, 4, 0] = math.nan
    state = "c" if kind == "lstm" else "h"
    with pytest.warns(RuntimeWarning, match="1 of 3 sample"):
        cj = rnnscope.cell_jacobians(m, bad, state=state, keep="full")
    clean = rnnscope.cell_jacobians(m, x[[0, 2]], state=state, keep="full")
    assert cj.nonfinite.tolist() == [False, True, False] and cj.nonfinite_samples == 1
    for name in ("total", "spectral", "frobenius", "direct", "share"):
        got, want = getattr(cj, name), getattr(clean, name)
        if want is None:
            assert got is None
            continue
        assert got[1].isnan().all(), name
        torch.testing.assert_close(got[[0, 2]], want, rtol=1e-13, atol=0, equal_nan=True)
    by, by_clean = cj.by_distance(), clean.by_distance()
    assert by["nonfinite_samples"] == 1 and by["samples"] == 3
    for key in ("spectral", "share"):
        if key in by_clean:
            torch.testing.assert_close(by[key], by_clean[key], rtol=1e-13, atol=0)
    with pytest.warns(RuntimeWarning, match="1 of 3 sample"):
        sj = rnnscope.step_jacobians(m, bad, state=state, keep="full")
    s = sj.summary()
    s_clean = rnnscope.step_jacobians(m, x[[0, 2]], state=state, keep="full").summary()
    assert s["nonfinite_samples"] == 1 and s["samples"] == 3
    torch.testing.assert_close(s["indirect_spectral"], s_clean["indirect_spectral"], rtol=1e-13,
                               atol=0)
    assert sj.indirect[1].isnan().all() and sj.nonfinite.tolist() == [False, True, False]
    with pytest.warns(RuntimeWarning, match="1 of 3 sample"):
        ly = rnnscope.lyapunov_spectrum(m, bad).exponents
    assert ly[1].isnan().all()
    # bit for bit what the clean batch gives; the batch without the sample differs only by
    # the rounding of a different batch size (the QR's smallest exponent is ill-conditioned)
    assert torch.equal(ly[[0, 2]], rnnscope.lyapunov_spectrum(m, x).exponents[[0, 2]])
    torch.testing.assert_close(ly[[0, 2]], rnnscope.lyapunov_spectrum(m, x[[0, 2]]).exponents,
                               rtol=1e-10, atol=0)
    # the same holds bit for bit for the Jacobians against the clean batch
    full = rnnscope.cell_jacobians(m, x, state=state)
    assert torch.equal(cj.spectral[[0, 2]], full.spectral[[0, 2]])
    assert torch.equal(sj.indirect[[0, 2]],
                       rnnscope.step_jacobians(m, x, state=state, keep="full").indirect[[0, 2]])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nan_in_the_weights_is_reported_not_raised(kind):
    m, x = _nan_case(kind)
    with torch.no_grad():
        m.weight_hh_l0[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cj = rnnscope.cell_jacobians(m, x, keep="norms")
        sj = rnnscope.step_jacobians(m, x)
        s = sj.summary()
        ly = rnnscope.lyapunov_spectrum(m, x).exponents
    assert cj.nonfinite.all() and cj.spectral.isnan().all()
    assert cj.by_distance()["spectral"].isnan().all()  # no sample left to average
    assert sj.nonfinite.all() and s["nonfinite_samples"] == 3
    assert s["indirect_spectral"].isnan().all() and ly.isnan().all()
    import json
    json.dumps(cj.to_dict(), allow_nan=False)


def test_spectral_norm_never_sends_a_nonfinite_matrix_to_the_solver():
    from rnnscope.spectral import spectral_norms

    torch.manual_seed(0)
    x = torch.randn(4, 5, 5, dtype=torch.float64)
    x[1, 2, 3] = math.nan
    x[2, 0, 0] = math.inf
    got = spectral_norms(x)
    assert math.isnan(got[1]) and got[2] == math.inf
    torch.testing.assert_close(got[[0, 3]], torch.linalg.matrix_norm(x[[0, 3]], ord=2),
                               rtol=1e-12, atol=0)


# ---------------------------------------------------------------- the highway share

def _oracle_share_small(m, x):
    """Highway share from the autograd oracle's tensors: J from oracle_cell_jacobians, D the
    product of the reference forget gates (computed here, step by step)."""
    J = oracle_cell_jacobians(m, x, state="c")  # (B, T, H, H)
    B, T = x.shape[:2]
    H = m.hidden_size
    p = layer_params(m, 0, 0)
    h = torch.zeros(B, H, dtype=torch.float64)
    c = torch.zeros(B, H, dtype=torch.float64)
    fs = []
    for t in range(T):
        pre_f = x[:, t] @ p["w_ih"][H:2 * H].t() + p["b_ih"][H:2 * H] + \
            h @ p["w_hh"][H:2 * H].t() + p["b_hh"][H:2 * H]
        fs.append(torch.sigmoid(pre_f))
        h, c = reference_step("lstm", p, x[:, t], h, c)
    f = torch.stack(fs, 1).detach()
    share = torch.empty(B, T, dtype=torch.float64)
    for n in range(T):
        D = f[:, n + 1:].prod(1)
        d2 = (D ** 2).sum(-1)
        r2 = ((J[:, n] - torch.diag_embed(D)) ** 2).sum((-2, -1))
        share[:, n] = d2 / (d2 + r2)
    return share


def test_highway_share_equals_the_oracle_where_indirect_paths_matter():
    torch.manual_seed(3)
    m = nn.LSTM(2, 3, batch_first=True).double()
    with torch.no_grad():
        m.weight_hh_l0.mul_(4.0)  # J ≠ D: the indirect paths carry a real part of the energy
    x = torch.randn(2, 7, 2, dtype=torch.float64)
    want = _oracle_share_small(m, x)
    got = rnnscope.cell_jacobians(m, x).highway_share()
    assert (want[:, :-2] < 0.95).any()  # the test can tell formulas apart
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_highway_share_at_a_long_span_has_no_underflow_nans():
    """A default float64 LSTM over T = 1200 steps: ‖J‖₂ falls far below 1e−162, where squaring
    underflowed. Oracle: ∂c_{T−1}/∂c_n from H backward passes through the reference loop
    (c_n's gradient includes the path through h_n = o_n·tanh(c_n), as the "c" state means),
    D = ∏ f from the reference gates, and the share taken after rescaling J and D together."""
    torch.manual_seed(0)
    H, T, B = 8, 1200, 2
    m = nn.LSTM(3, H, batch_first=True).double()
    x = torch.randn(B, T, 3, dtype=torch.float64)
    _, _, _, states = reference_forward(m, x)
    cs = [c for _, c in states[0][0]]  # c_n, in the graph
    p = layer_params(m, 0, 0)
    with torch.no_grad():
        h = torch.zeros(B, H, dtype=torch.float64)
        fs = []
        for t in range(T):
            fs.append(torch.sigmoid(x[:, t] @ p["w_ih"][H:2 * H].t() + p["b_ih"][H:2 * H]
                                    + h @ p["w_hh"][H:2 * H].t() + p["b_hh"][H:2 * H]))
            h = states[0][0][t][0]
    f = torch.stack(fs, 1)  # (B, T, H)
    J = torch.zeros(B, T, H, H, dtype=torch.float64)
    for i in range(H):  # row i of every ∂c_{T−1}/∂c_n
        gs = torch.autograd.grad(cs[-1][:, i].sum(), cs[:-1], retain_graph=True)
        J[:, :-1, i] = torch.stack(gs, 1)
    J[:, -1] = torch.eye(H, dtype=torch.float64)
    D = torch.ones(B, T, H, dtype=torch.float64)
    for n in range(T - 2, -1, -1):
        D[:, n] = D[:, n + 1] * f[:, n + 1]
    rest = J - torch.diag_embed(D)
    scale = torch.maximum(D.abs().amax(-1), rest.abs().amax((-2, -1)))[..., None]
    d2 = ((D / scale) ** 2).sum(-1)
    r2 = ((rest / scale[..., None]) ** 2).sum((-2, -1))
    want = d2 / (d2 + r2)
    tiny = torch.linalg.matrix_norm(J, ord=2) < 1e-162
    assert tiny.sum() > 100 and (J != 0).any(-1).any(-1).all()  # tiny, never exactly 0
    assert (want[~tiny] < 0.9).any()  # the indirect paths matter: J ≠ D
    got = rnnscope.cell_jacobians(m, x, keep="norms")
    assert not got.share.isnan().any()
    torch.testing.assert_close(got.share, want, rtol=1e-7, atol=0)
    torch.testing.assert_close(got.share[tiny], want[tiny], rtol=1e-7, atol=0)


@pytest.mark.parametrize("loss", ["last", "all"])
def test_packed_state_gradients_are_zero_past_each_end_and_exact_before(loss):
    """A padded position is not a step of its sequence: the carried state's gradient there
    (direction 1: ∂L/∂h0, carried through the padding) is reported as 0, and every valid
    position equals the sequence run alone, cut to its own length."""
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    lengths = torch.tensor([6, 2, 4])
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    sg = rnnscope.state_gradients(m, packed, loss=loss, keep="full")
    for b, n in enumerate(lengths.tolist()):
        alone = rnnscope.state_gradients(m, x[b:b + 1, :n], loss=loss)
        for dirs, dirs_alone in zip(sg.layers, alone.layers):
            for g, a in zip(dirs, dirs_alone):
                for f in ("h", "c"):
                    got = getattr(g, f)[b]
                    torch.testing.assert_close(got[:n], getattr(a, f)[0], rtol=1e-12, atol=0)
                    assert (got[n:] == 0).all()
                assert (g.h_full[b, n:] == 0).all() and (g.c_full[b, n:] == 0).all()


def test_nonfinite_inputs_and_results_are_reported_by_every_module_analysis():
    """An Inf input saturates the gates into finite numbers: the analyses of (module, inputs)
    say the inputs hold it; NaN gate values and NaN state gradients are warned about with their
    counts. A replay returns what it computes and says nothing."""
    m = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    x[1, 2, 0] = float("inf")
    for fn in (rnnscope.state_gradients, rnnscope.cell_jacobians, rnnscope.step_jacobians,
               rnnscope.lyapunov_spectrum, rnnscope.gate_stats):
        with pytest.warns(RuntimeWarning, match=rf"^{fn.__name__}: the inputs hold 1 non-finite"):
            fn(m, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnscope.replay(m, x)
    x[1, 2, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"gate_stats: 12 non-finite gate value\(s\)"):
        gs = rnnscope.gate_stats(m, x)
    assert gs.layers[0].nonfinite == 12  # sample 1 from step 2 on: 3 steps × 4 units
    with pytest.warns(RuntimeWarning, match=r"state_gradients: \d+ non-finite gradient value"):
        rnnscope.state_gradients(m, x, loss="all")
