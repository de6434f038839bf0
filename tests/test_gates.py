import math

import pytest
import torch
from torch import nn

import rnnscope
from reference import reference_forward


@pytest.mark.parametrize("make", [lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True),
                                  lambda: nn.GRU(3, 4), lambda: nn.LSTMCell(3, 4),
                                  lambda: nn.GRUCell(3, 4, bias=True)])
def test_init_forget_bias_sets_the_effective_bias(make):
    torch.manual_seed(0)
    m = make()
    rnnscope.init_forget_bias(m, 1.0)
    kind = "lstm" if isinstance(m, (nn.LSTM, nn.LSTMCell)) else "gru"
    H = m.hidden_size
    blk = slice(H, 2 * H)  # f is block 1 of (i, f, g, o); z is block 1 of (r, z, n)
    names = [n for n, _ in m.named_parameters() if n.startswith("bias_ih")]
    for n in names:
        eff = getattr(m, n) + getattr(m, n.replace("bias_ih", "bias_hh"))
        assert torch.equal(eff[blk], torch.ones(H)), n
    # and the gate actually opens: with zero input and zero state, f = σ(1)
    if kind == "lstm" and isinstance(m, nn.LSTM):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.startswith("weight"):
                    p.zero_()
        st = rnnscope.gate_stats(m, torch.zeros(2, 1, 3))
        assert st.layers[0].mean == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-6)


def test_init_forget_bias_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="bias=False"):
        rnnscope.init_forget_bias(nn.LSTM(3, 4, bias=False))
    with pytest.raises(ValueError, match="no forget/retain gate"):
        rnnscope.init_forget_bias(nn.RNN(3, 4))
    with pytest.raises(ValueError, match="finite number"):
        rnnscope.init_forget_bias(nn.LSTM(3, 4), float("nan"))


def test_chrono_init_gives_uniform_memory_times():
    m = nn.LSTM(3, 2000)
    rnnscope.chrono_init(m, 50, generator=torch.Generator().manual_seed(0))
    H = 2000
    b = (m.bias_ih_l0 + m.bias_hh_l0).detach().double()
    f = torch.sigmoid(b[H:2 * H])
    tau = 1 / (1 - f)
    assert tau.min() >= 2 - 1e-4 and tau.max() <= 50 + 1e-3
    # uniform on [2, 50]: mean 26, std 48/sqrt(12)
    assert tau.mean().item() == pytest.approx(26, abs=1.0)
    assert tau.std().item() == pytest.approx(48 / math.sqrt(12), abs=0.7)
    torch.testing.assert_close(b[:H], -b[H:2 * H], atol=1e-6, rtol=0)
    g = nn.GRU(3, 10)
    rnnscope.chrono_init(g, 10, generator=torch.Generator().manual_seed(0))
    z_tau = 1 / (1 - torch.sigmoid((g.bias_ih_l0 + g.bias_hh_l0)[10:20].detach()))
    assert ((z_tau >= 2 - 1e-4) & (z_tau <= 10 + 1e-4)).all()
    with pytest.raises(ValueError, match="t_max must be a finite number > 2"):
        rnnscope.chrono_init(m, 1)


def test_gate_stats_against_reference_gates():
    torch.manual_seed(0)
    m = nn.LSTM(3, 5, num_layers=2, bidirectional=True).double()
    x = torch.randn(7, 4, 3, dtype=torch.float64)  # (T, B, I)
    st = rnnscope.gate_stats(m, x, bins=10)
    assert len(st.layers) == 4
    # reference forget gate of layer 0, direction 0, recomputed by hand
    xb = x.transpose(0, 1)
    _, _, _, states = reference_forward(m, xb)
    H = 5
    h_prev = torch.zeros(4, H, dtype=torch.float64)
    fs = []
    for t in range(7):
        pre = xb[:, t] @ m.weight_ih_l0[H:2 * H].t() + m.bias_ih_l0[H:2 * H] + \
            h_prev @ m.weight_hh_l0[H:2 * H].t() + m.bias_hh_l0[H:2 * H]
        fs.append(torch.sigmoid(pre))
        h_prev = states[0][0][t][0]
    f = torch.stack(fs, 1).detach()
    s = st.layers[0]
    assert s.gate == "f" and (s.layer, s.direction) == (0, 0)
    assert s.mean == pytest.approx(f.mean().item(), rel=1e-12)
    assert s.quantiles[0.5] == pytest.approx(f.flatten().quantile(0.5).item(), rel=1e-12)
    assert s.saturation[">0.9"] == pytest.approx((f > 0.9).double().mean().item())
    torch.testing.assert_close(s.unit_mean, f.mean((0, 1)))
    torch.testing.assert_close(s.memory_time, 1 / (1 - f.mean((0, 1))))
    assert s.hist.sum().item() == pytest.approx(1.0)
    assert len(s.edges) == 11


def test_gate_stats_saturation_and_refusals():
    m = nn.GRU(2, 3)
    with torch.no_grad():
        m.bias_ih_l0[3:6] = 10.0  # z = σ(10 + ...) > 0.99: a frozen state
        m.weight_ih_l0.zero_()
        m.weight_hh_l0.zero_()
    st = rnnscope.gate_stats(m, torch.randn(5, 2))
    assert st.layers[0].gate == "z" and st.layers[0].saturation[">0.99"] == 1.0
    assert "median memory time" in str(st)
    with pytest.raises(ValueError, match="has no gates"):
        rnnscope.gate_stats(nn.RNN(2, 3), torch.randn(5, 2))
    for bins in (True, 0, 2.5):  # a bool or a float is a TypeError, 0 a ValueError
        with pytest.raises((TypeError, ValueError), match="bins must be a positive int"):
            rnnscope.gate_stats(m, torch.randn(5, 2), bins=bins)


def test_exact_quantiles_equal_torch_quantile():
    from rnnscope.gates import QUANTILES, exact_quantiles

    g = torch.Generator().manual_seed(0)
    qs = torch.tensor(QUANTILES, dtype=torch.float64)
    for n in (1, 2, 3, 7, 100, 1001):
        v = torch.rand(n, generator=g, dtype=torch.float64)
        assert torch.equal(exact_quantiles(v, QUANTILES), torch.quantile(v, qs)), n
        ties = (v * 4).floor() / 4  # many equal values
        assert torch.equal(exact_quantiles(ties, QUANTILES), torch.quantile(ties, qs)), n
    odd = (0.0, 0.1, 1 / 3, 0.999, 1.0)
    v = torch.rand(37, generator=g, dtype=torch.float64)
    assert torch.equal(exact_quantiles(v, odd), torch.quantile(v, torch.tensor(odd,
                                                                              dtype=torch.float64)))
    assert exact_quantiles(torch.empty(0, dtype=torch.float64), QUANTILES).isnan().all()


@pytest.mark.parametrize("shape", ["uniform", "ties", "saturated", "outlier", "constant",
                                   "float64"])
def test_exact_quantiles_past_one_sort_equal_torch_quantile(shape, monkeypatch):
    """The binned path (n > SMALL) against torch.quantile, on distributions that put many
    values in one bin or on bin edges, binned in one chunk and in many."""
    from rnnscope import gates
    from rnnscope.gates import QUANTILES, exact_quantiles

    g = torch.Generator().manual_seed(1)
    n = 3 * gates.SMALL + 7
    v = torch.rand(n, generator=g)
    if shape == "ties":
        v = (v * 8).floor() / 8  # 8 distinct values: every rank sits in a run of ties
    elif shape == "saturated":  # gates: most exactly 1.0 in float32, the rest spread below
        v = torch.sigmoid(torch.randn(n, generator=g) * 30)
    elif shape == "outlier":  # one huge value: all others fall in the histogram's first bin
        v[123] = 1e30
    elif shape == "constant":
        v = torch.full((n,), 0.25)
    elif shape == "float64":
        v = torch.randn(n, generator=g, dtype=torch.float64).exp()
    odd = QUANTILES + (0.0, 1 / 3, 0.999, 1.0)
    want = torch.quantile(v.double(), torch.tensor(odd, dtype=torch.float64))
    assert torch.equal(exact_quantiles(v, odd), want)
    # chunks that end inside runs of ties and inside bins: counts and picks add up exactly
    monkeypatch.setattr(gates, "CHUNK", 4099)
    assert torch.equal(exact_quantiles(v, odd), want)


def test_gate_stats_beyond_torch_quantile_limit(monkeypatch):
    """More than 2^24 gate values (torch.quantile refuses them): the replay is replaced by a
    trace holding that many real gate values, so gate_stats' own path runs on all of them;
    the quantiles are checked against numpy's exact linear-interpolation quantiles."""
    from types import SimpleNamespace

    import numpy as np

    import rnnscope.gates as gates

    n = 2 ** 24 + 1001
    z = torch.rand(1, n, 1, generator=torch.Generator().manual_seed(1))  # (B, T, H) float32
    z[0, :5, 0] = torch.tensor([0.0, 1.0, 0.5, 0.995, 0.005])
    lt = SimpleNamespace(gates={"z": z}, lengths=None, valid=None)
    monkeypatch.setattr(gates, "replay", lambda *a, **k: SimpleNamespace(layers=((lt,),)))
    flat = z.double().reshape(-1)
    with pytest.raises(RuntimeError):  # the limit this path exists for
        torch.quantile(flat, 0.5)
    st = rnnscope.gate_stats(nn.GRU(1, 1), torch.zeros(1, 1, 1), bins=20)
    s = st.layers[0]
    want = np.quantile(flat.numpy(), gates.QUANTILES, method="linear")
    for q, w in zip(gates.QUANTILES, want):
        assert s.quantiles[q] == pytest.approx(float(w), rel=1e-15, abs=0)
    assert s.mean == pytest.approx(float(flat.mean()), rel=1e-12)
    assert s.saturation[">0.99"] == int((flat > 0.99).sum()) / n
    assert s.hist.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("fn", ["init_forget_bias", "chrono_init"])
@pytest.mark.parametrize("module", [nn.RNN(2, 3), nn.RNNCell(2, 3), nn.LSTM(2, 3, bias=False),
                                    nn.Linear(2, 3)])
def test_initialisation_errors_name_the_function(fn, module):
    # found by the fuzz: these errors came without the function's name
    with pytest.raises((ValueError, TypeError), match=f"^{fn}: "):
        getattr(rnnscope, fn)(module, 10.0)


@pytest.mark.parametrize("case", ["float32 denormals", "float32 range 1e-37", "float64 range 1e-307",
                                  "float64 range overflows", "half"])
def test_exact_quantiles_of_extreme_ranges_equal_torch_quantile(case):
    """Past one sort (n > SMALL), ranges whose bin scale BINS/(hi − lo) does not fit the
    values' dtype (saturated gates: float32 denormals) or whose width overflows float64: the
    binning moves to float64, or to a kthvalue per rank where float64 cannot hold the scale
    either. A fuzz found these crashing in bincount."""
    from rnnscope import gates
    from rnnscope.gates import QUANTILES, exact_quantiles

    g = torch.Generator().manual_seed(2)
    n = gates.SMALL + 4463
    if case == "float32 denormals":  # sigmoid of −87 … −107: zeros and values below 1.2e-38
        v = torch.sigmoid(-87 - 20 * torch.rand(n, generator=g))
    elif case == "float32 range 1e-37":
        v = torch.tensor([0.0, 1e-37, 3e-38]).repeat(n // 3 + 1)
    elif case == "float64 range 1e-307":
        v = torch.rand(n, generator=g, dtype=torch.float64) * 1e-307
    elif case == "float64 range overflows":
        v = torch.randn(n, generator=g, dtype=torch.float64) * 1e307
        v[:2] = torch.tensor([-1.7e308, 1.7e308], dtype=torch.float64)
    else:
        v = (torch.rand(n, generator=g) * 1e-3).half()
    odd = QUANTILES + (0.0, 1 / 3, 1.0)
    want = torch.quantile(v.double(), torch.tensor(odd, dtype=torch.float64))
    assert torch.equal(exact_quantiles(v, odd), want)


@pytest.mark.parametrize("n", [100, 70_000])
def test_exact_quantiles_with_a_nan_are_nan_as_torch_quantile(n):
    from rnnscope.gates import QUANTILES, exact_quantiles

    v = torch.rand(n, generator=torch.Generator().manual_seed(3))
    v[n // 2] = math.nan
    assert exact_quantiles(v, QUANTILES).isnan().all()
    assert torch.quantile(v, torch.tensor(QUANTILES)).isnan().all()


def test_gate_stats_of_a_saturated_forget_gate():
    """A forget bias of −95: every f is 0 or a float32 denormal; more values than one sort."""
    torch.manual_seed(4)
    lstm = nn.LSTM(2, 128, batch_first=True)
    rnnscope.init_forget_bias(lstm, -95.0)
    x = torch.randn(4, 160, 2)
    st = rnnscope.gate_stats(lstm, x)
    f = rnnscope.replay(lstm, x).layers[0][0].gates["f"].detach().double().reshape(-1)
    assert f.numel() > 65536 and float(f.max()) < 1e-38
    from rnnscope.gates import QUANTILES

    want = torch.quantile(f, torch.tensor(QUANTILES, dtype=torch.float64))
    got = torch.tensor([st.layers[0].quantiles[q] for q in QUANTILES], dtype=torch.float64)
    assert torch.equal(got, want)
