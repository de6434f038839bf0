"""Every result class round-trips exactly through to_dict/JSON/from_dict (NaN and ±inf too),
the codec refuses what it did not write, and reprs stay short."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import rnnscope
from rnnscope import codec
from rnnscope.codec import SchemaError
from rnnscope.results import same_value


def _lstm_results():
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 3)
    tr = rnnscope.replay(m, x)
    cj = rnnscope.cell_jacobians(tr, keep="full")
    return {
        "GradientProfile": rnnscope.gradient_profile(m, x),
        "LagProfile": rnnscope.lag_profile(m, x, loss=None, positions=3),
        "Comparison": rnnscope.compare({"RNN": nn.RNN(3, 4, batch_first=True), "LSTM": m},
                                       seq_len=5, samples=2),
        "GateStats": rnnscope.gate_stats(tr),
        "GateLayerStats": rnnscope.gate_stats(tr).layers[1],
        "DecayTable": rnnscope.decay_table((0.9, 1.0), (0, 10)),
        "StateGradients": rnnscope.state_gradients(m, x, keep="full"),
        "StateGradientLayer": rnnscope.state_gradients(m, x).layers[0][0],
        "StepJacobians(full)": rnnscope.step_jacobians(tr, keep="full"),
        "StepJacobians(norms)": rnnscope.step_jacobians(tr, keep="norms"),
        "CellJacobians(full)": cj,
        "CellJacobians(norms)": rnnscope.cell_jacobians(tr, keep="norms", layer=1),
        "JacobianNorms": cj.norms(),
        "LyapunovSpectrum": rnnscope.lyapunov_spectrum(tr, k=2),
        "LyapunovSpectrum(unbatched)": rnnscope.lyapunov_spectrum(m, x[0], k=3),
    }


def _packed_nonfinite_results():
    """Results holding NaN, ±inf, valid masks and non-finite samples."""
    torch.manual_seed(1)
    m = nn.GRU(2, 3, batch_first=True)
    x = torch.randn(3, 5, 2)
    x[1, 2, 0] = math.nan
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3, 4], batch_first=True,
                                               enforce_sorted=False)
    with pytest.warns(RuntimeWarning):
        cj = rnnscope.cell_jacobians(m, packed, keep="norms")
    with pytest.warns(RuntimeWarning):
        sj = rnnscope.step_jacobians(m, packed, keep="norms")
    prof = rnnscope.gradient_profile(m, x)
    inf_prof = dataclasses.replace(prof, per_sample=prof.per_sample.clone().index_put_(
        (torch.tensor([0]), torch.tensor([1])), torch.tensor(math.inf, dtype=torch.float64)))
    neg = rnnscope.LyapunovSpectrum(torch.tensor([[0.5, -math.inf], [math.nan, math.nan]],
                                                 dtype=torch.float64), state_size=3)
    return {"CellJacobians(packed, nan)": cj, "StepJacobians(packed, nan)": sj,
            "GradientProfile(nan)": prof, "GradientProfile(inf)": inf_prof,
            "LyapunovSpectrum(-inf)": neg, "JacobianNorms(packed)": cj.norms()}


def _all():
    out = _lstm_results()
    out.update(_packed_nonfinite_results())
    return out


RESULTS = _all()


@pytest.mark.parametrize("name", list(RESULTS))
def test_every_result_round_trips_exactly_through_strict_json(name):
    r = RESULTS[name]
    text = json.dumps(r.to_dict(), allow_nan=False)
    back = type(r).from_dict(json.loads(text))
    assert back == r
    for f in dataclasses.fields(r):  # tensor for tensor: dtype, shape, NaN placement
        assert same_value(getattr(back, f.name), getattr(r, f.name)), f.name
    assert json.dumps(back.to_dict(), allow_nan=False) == text


def test_the_cases_hold_what_they_claim():
    """The round trips above are not vacuous: NaN, ±inf, float32 and masks are in them."""
    assert RESULTS["CellJacobians(full)"].total.dtype == torch.float32
    assert RESULTS["StepJacobians(full)"].indirect.dtype == torch.float32
    assert RESULTS["CellJacobians(packed, nan)"].valid is not None
    assert bool(RESULTS["CellJacobians(packed, nan)"].nonfinite.any())
    assert RESULTS["GradientProfile(nan)"].per_sample.isnan().any()
    assert RESULTS["GradientProfile(inf)"].per_sample.isinf().any()
    assert (RESULTS["LyapunovSpectrum(-inf)"].exponents == -math.inf).any()
    assert math.isinf(RESULTS["DecayTable"].rows[1]["memory_time"])
    # and equality notices a change of one value, of NaN placement and of dtype
    p = RESULTS["GradientProfile"]
    bumped = p.per_sample.clone()
    bumped[0, 0] = torch.nextafter(bumped[0, 0], torch.tensor(math.inf, dtype=torch.float64))
    assert dataclasses.replace(p, per_sample=bumped) != p
    assert dataclasses.replace(p, per_sample=p.per_sample.float()) != p
    assert not same_value(torch.tensor([math.nan, 1.0]), torch.tensor([1.0, math.nan]))


def test_lyapunov_spectrum_returns_a_result_with_its_configuration():
    torch.manual_seed(0)
    m = nn.RNN(2, 5, batch_first=True)
    x = torch.randn(2, 30, 2)
    ly = rnnscope.lyapunov_spectrum(m, x, k=3, warmup=4)
    assert isinstance(ly, rnnscope.LyapunovSpectrum)
    assert ly.exponents.shape == (2, 3) and ly.k == 3 and ly.warmup == 4 and ly.state_size == 5
    assert ly.mean_largest() == pytest.approx(float(ly.exponents[:, 0].mean()))
    assert ly.finite_samples() == 2


def test_reprs_are_short_and_never_print_tensors():
    torch.manual_seed(0)
    m = nn.LSTM(3, 64, batch_first=True)
    x = torch.randn(8, 200, 3)
    for r in [rnnscope.replay(m, x), rnnscope.gradient_profile(m, x), *RESULTS.values()]:
        text = repr(r)
        assert len(text.splitlines()) <= 3 and len(text) < 400, (type(r).__name__, text)
        assert "tensor(" not in text, text
    text = repr(rnnscope.gradient_profile(m, x))
    assert text.startswith("GradientProfile(per_sample=float64[8, 200]") and "half_life=" in text


def test_repr_html_is_a_small_escaped_table():
    p = RESULTS["GradientProfile"]
    crafted = dataclasses.replace(p, site="<script>alert(1)</script>")
    page = crafted._repr_html_()
    assert "<table>" in page and "<script>" not in page and "&lt;script&gt;" in page
    for r in RESULTS.values():
        assert "<table>" in r._repr_html_()


def test_repr_html_embeds_a_figure_only_with_matplotlib():
    pytest.importorskip("matplotlib")
    assert "data:image/png;base64," in RESULTS["GradientProfile"]._repr_html_()


# ---- the codec refuses what it did not write ---------------------------------------------


@pytest.mark.parametrize("value, dtype, dim, message", [
    ([1.0, "big"], torch.float64, 1, r"x must be a number; got the string 'big'"),
    ([1.0, True], torch.float64, 1, r"x must be a number; got a boolean"),
    ([[1.0], [1.0, 2.0]], torch.float64, 2, r"rows of different lengths"),
    ([1.0, 2.0], torch.float64, 2, r"2-dimensional list .* found a number at depth 1"),
    ("nan", torch.float64, 1, r"1-dimensional list .* found the string 'nan' at depth 0"),
    ([1, 2.5], torch.int64, 1, r"must hold integers; found a number"),
    ([True, 1], torch.bool, 1, r"must hold booleans; found an integer"),
    ({"dtype": "complex64", "data": []}, torch.float64, 1, r"dtype"),
])
def test_decode_tensor_refuses_with_one_line_naming_the_field(value, dtype, dim, message):
    with pytest.raises(SchemaError, match=message) as e:
        codec.decode_tensor(value, "x", dtype=dtype, dim=dim)
    assert "\n" not in str(e.value)


def test_from_dict_names_missing_fields_and_wrong_types():
    d = RESULTS["GateStats"].to_dict()
    del d["layers"][0]["memory_time"]
    with pytest.raises(SchemaError, match=r"GateStats\['layers'\]\[0\]\['memory_time'\] is "
                                          r"missing"):
        rnnscope.GateStats.from_dict(d)
    d = RESULTS["GradientProfile"].to_dict()
    d["loss"] = 3
    with pytest.raises(SchemaError, match=r"\['loss'\] must be a string; got an integer"):
        rnnscope.GradientProfile.from_dict(d)
    d = RESULTS["CellJacobians(full)"].to_dict()
    d["frobenius"] = d["frobenius"][:-1]
    with pytest.raises(SchemaError, match=r"\['frobenius'\] must be \(B=3, T=6"):
        rnnscope.CellJacobians.from_dict(d)


def test_non_finite_floats_only_as_codec_tokens():
    assert [codec.encode_float(v) for v in (1.5, math.nan, math.inf, -math.inf)] == \
        [1.5, "nan", "inf", "-inf"]
    assert math.isnan(codec.decode_float("nan", "x")) and codec.decode_float("-inf", "x") < 0
    with pytest.raises(SchemaError, match="x must be a number; got the string 'NaN'"):
        codec.decode_float("NaN", "x")
    with pytest.raises(SchemaError, match="bare literal NaN"):
        codec.loads('{"a": NaN}')
    with pytest.raises(ValueError):
        codec.dumps({"a": math.nan})


# ---- hypothesis-drawn results --------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def _profiles(draw):
    S, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    vals = draw(st.lists(_floats, min_size=S * T, max_size=S * T))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(1, T), min_size=S, max_size=S)))
    return rnnscope.GradientProfile(
        torch.tensor(vals, dtype=torch.float64).reshape(S, T),
        draw(st.sampled_from(["last", "all", "custom"])), draw(st.integers(0, 9)),
        draw(st.integers(0, 9)), {"seed": draw(st.integers(0, 5)), "note": draw(st.text())},
        None if lengths is None else torch.tensor(lengths), draw(st.text()))


@st.composite
def _lyapunov(draw):
    B, k = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    vals = draw(st.lists(_floats, min_size=B * k, max_size=B * k))
    return rnnscope.LyapunovSpectrum(torch.tensor(vals, dtype=torch.float64).reshape(B, k),
                                     draw(st.integers(0, 2)), draw(st.integers(0, 1)),
                                     draw(st.integers(0, 4)), draw(st.integers(k, 9)))


@settings(max_examples=60, deadline=None)
@given(r=st.one_of(_profiles(), _lyapunov()))
def test_drawn_results_round_trip_exactly(r):
    text = json.dumps(r.to_dict(), allow_nan=False)
    assert type(r).from_dict(json.loads(text)) == r


@settings(max_examples=60, deadline=None)
@given(vals=st.lists(_floats, min_size=1, max_size=12),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_drawn_tensors_round_trip_bit_for_bit(vals, dtype):
    t = torch.tensor(vals, dtype=torch.float64).to(dtype)
    back = codec.decode_tensor(json.loads(json.dumps(codec.encode_tensor(t), allow_nan=False)),
                               "x", dtype=torch.float64, dim=1)
    assert back.dtype == dtype and same_value(back, t)
    finite = torch.isfinite(t)
    assert torch.equal(back[finite].view(torch.int64 if dtype == torch.float64 else torch.int32),
                       t[finite].view(torch.int64 if dtype == torch.float64 else torch.int32))


def test_profile_summaries_skip_distances_no_sequence_has():
    # every sequence shorter than T: the distances past the longest one hold no measurement,
    # so the summaries are those of the measured distances (found by the drawn round trip)
    p = rnnscope.GradientProfile(torch.tensor([[1.0, 2.0, 1.0, 0.0], [3.0, 4.0, 2.0, 0.0]],
                                              dtype=torch.float64),
                                 lengths=torch.tensor([3, 3]))
    assert p.by_distance()[3].isnan()
    assert p.effective_memory() == 3 and p.decay_ratio() == 2.0 / 1.5
    json.dumps(p.to_dict(), allow_nan=False)


def test_dumps_lays_out_objects_and_keeps_numeric_arrays_on_one_line():
    """codec.dumps(indent=1) is JSON equal to json.dumps, with arrays that hold no object on
    one line (the C encoder), objects one entry per line, and NaN refused."""
    doc = {"a": [1, 2.5, [3, -0.0]], "b": {"c": [{"d": 1e-300}, {"e": []}], "f": 'x"y'},
           "g": {}, "h": None, "i": [[1, 2], [3]], "j": (1, 2), "k": {1: 2}, "l": [1, {"m": 2}]}
    text = codec.dumps(doc)
    assert json.loads(text) == json.loads(json.dumps(doc))
    lines = text.splitlines()
    assert ' "a": [1, 2.5, [3, -0.0]],' in lines and ' "i": [[1, 2], [3]],' in lines
    assert '  "f": "x\\"y"' in lines and ' "k": {"1": 2},' in lines
    assert codec.dumps(doc, indent=None) == json.dumps(doc, allow_nan=False)
    for bad in ({"a": [math.nan]}, {"a": [{"b": math.inf}]}):
        with pytest.raises(ValueError):
            codec.dumps(bad)
