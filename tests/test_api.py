"""One public API shape, in torch.func's manner: the module first, keyword-only options with
Literal types, one `keep` default, `chunk_size=` where work is chunked, and errors that start
with the function's name."""
import inspect
import typing
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnscope

# Arguments that may be given by position: what is measured and its data. Everything else is
# an option and keyword-only.
POSITIONAL = {"module", "modules", "inputs", "hx"}
# Closed forms and initialisations take their data (not a module and inputs) first.
DATA_FIRST = {
    "decay_table": ("forget_values", "lengths"),
    "memory_time": ("f",),
    "init_forget_bias": ("module", "value"),
    "chrono_init": ("module", "t_max"),
    "linear_scan": ("a", "b", "h0"),
    "linear_recurrence_sensitivity": ("lam", "t"),
    "curse_of_memory": ("lams",),
    "effective_memory": ("norms", "threshold"),  # lives with the result objects (results.py)
}


def public_functions():
    return {n: getattr(rnnscope, n) for n in rnnscope.__all__
            if inspect.isfunction(getattr(rnnscope, n))}


def test_every_public_function_is_covered():
    names = set(public_functions())
    assert {"gradient_profile", "lag_profile", "compare", "replay", "state_gradients",
            "cell_jacobians", "step_jacobians", "lyapunov_spectrum", "gate_stats"} <= names


@pytest.mark.parametrize("name", sorted(public_functions()))
def test_module_first_then_keyword_only_options(name):
    params = list(inspect.signature(public_functions()[name]).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                      p.POSITIONAL_OR_KEYWORD)]
    if name in DATA_FIRST:
        assert tuple(positional) == DATA_FIRST[name]
        return
    assert positional[0] == ("modules" if name == "compare" else "module")
    assert set(positional) <= POSITIONAL, positional
    assert all(p.kind == p.KEYWORD_ONLY for p in params if p.name not in POSITIONAL)


def _hints(fn) -> dict:
    return typing.get_type_hints(inspect.unwrap(fn))


def _literal_values(tp) -> set:
    """The strings a (possibly Optional / Union) annotation's Literal parts allow."""
    if typing.get_origin(tp) is typing.Literal:
        return set(typing.get_args(tp))
    out = set()
    for arg in typing.get_args(tp):
        out |= _literal_values(arg)
    return out


@pytest.mark.parametrize("name", sorted(public_functions()))
def test_string_options_are_literal_types(name):
    fn = public_functions()[name]
    hints = _hints(fn)
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.KEYWORD_ONLY and isinstance(p.default, str):
            allowed = _literal_values(hints.get(p.name))
            assert p.default in allowed, f"{name}({p.name}=): {hints.get(p.name)} is no Literal"


def test_keep_has_one_default_and_one_type():
    with_keep = {n: f for n, f in public_functions().items()
                 if "keep" in inspect.signature(f).parameters}
    assert set(with_keep) == {"state_gradients", "cell_jacobians", "step_jacobians"}
    for name, fn in with_keep.items():
        assert inspect.signature(fn).parameters["keep"].default == "norms", name
        assert _literal_values(_hints(fn)["keep"]) == {"norms", "full"}, name


def test_chunk_size_is_a_keyword_with_none_default():
    for name in ("cell_jacobians", "step_jacobians", "lyapunov_spectrum",
                 "parameter_sensitivity"):
        p = inspect.signature(public_functions()[name]).parameters["chunk_size"]
        assert p.kind == p.KEYWORD_ONLY and p.default is None, name


def _lstm_case():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True).double()
    return lstm, torch.randn(3, 11, 3, dtype=torch.float64)


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 50])
def test_chunk_size_changes_memory_not_results(chunk_size):
    """T = 11 with chunks of 1, 4 (a short last chunk), T and more than T, against the default:
    the LSTM "c" step Jacobians carry an entry term across chunk boundaries, the dense sweep
    (packed input) and the closed-form sweep chunk differently, the QR method runs on."""
    lstm, x = _lstm_case()
    packed = pack_padded_sequence(x, torch.tensor([11, 8, 5]), batch_first=True)
    for fn, args, kw in [
        (rnnscope.step_jacobians, (lstm, x), {"keep": "full"}),
        (rnnscope.step_jacobians, (lstm, x), {"state": "h"}),
        (rnnscope.cell_jacobians, (lstm, x), {"keep": "full"}),
        (rnnscope.cell_jacobians, (lstm, packed), {"keep": "full", "state": "full"}),
        (rnnscope.cell_jacobians, (lstm, x), {}),
        (rnnscope.lyapunov_spectrum, (lstm, x), {"k": 3}),
    ]:
        want = fn(*args, **kw)
        got = fn(*args, chunk_size=chunk_size, **kw)
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            continue
        for field in ("direct", "indirect", "indirect_spectral", "total", "spectral", "share"):
            if field == "total" and isinstance(want, rnnscope.StepJacobians):
                continue  # a property computed from direct and indirect
            w, g = getattr(want, field, None), getattr(got, field, None)
            assert (w is None) == (g is None), field
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14, equal_nan=True,
                                           msg=f"{fn.__name__} {kw} .{field}")


def test_chunk_size_is_used(monkeypatch):
    """The equality above would also hold if chunk_size were ignored: count the chunks."""
    from rnnscope import cells, jacobians, span_sweep

    lstm, x = _lstm_case()  # T = 11
    calls = {"steps": 0, "reduce": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(jacobians, "_reported_steps",
                        counted("steps", jacobians._reported_steps))
    # an LSTM's cell state (the default) takes the split form: its chunks count the same
    monkeypatch.setattr(cells.lstm, "cell_state_steps",
                        counted("steps", cells.lstm.cell_state_steps))
    monkeypatch.setattr(span_sweep, "_reduce", counted("reduce", span_sweep._reduce))
    for chunk_size, n in ((None, 1), (4, 3), (1, 11)):
        calls.update(steps=0, reduce=0)
        rnnscope.step_jacobians(lstm, x, chunk_size=chunk_size)
        rnnscope.cell_jacobians(lstm, x, chunk_size=chunk_size)  # the closed-form sweep
        assert calls == {"steps": n, "reduce": n}, (chunk_size, calls)


def test_keep_norms_default_holds_no_matrices():
    lstm, x = _lstm_case()
    assert rnnscope.cell_jacobians(lstm, x).total is None
    sj = rnnscope.step_jacobians(lstm, x)
    assert sj.indirect is None and sj.indirect_spectral.shape == (3, 11)
    with pytest.raises(ValueError, match="keep='full'"):
        _ = sj.total
    sg = rnnscope.state_gradients(lstm, x)
    assert sg.layers[0][0].h_full is None and sg.layers[0][0].h.shape == (3, 11)


def test_positional_and_keyword_first_argument_agree():
    lstm, x = _lstm_case()
    a = rnnscope.gradient_profile(lstm, x)
    b = rnnscope.gradient_profile(module=lstm, inputs=x)
    torch.testing.assert_close(a.per_sample, b.per_sample)
    c = rnnscope.lag_profile(module=lstm, inputs=x, positions=[4, 10])
    torch.testing.assert_close(c.per_sample, rnnscope.lag_profile(lstm, x,
                                                                  positions=[4, 10]).per_sample)
    cmp = rnnscope.compare(modules={"LSTM": lstm}, inputs=x)
    torch.testing.assert_close(cmp.profiles["LSTM"].per_sample, a.per_sample)


def test_options_cannot_be_passed_by_position():
    lstm, x = _lstm_case()
    with pytest.raises(TypeError, match=r"^cell_jacobians\(\)"):
        rnnscope.cell_jacobians(lstm, x, None, 0)
    with pytest.raises(TypeError, match=r"^gradient_profile\(\)"):
        rnnscope.gradient_profile(lstm, x, "input")


def _bad_calls():
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    return {
        "replay": lambda: rnnscope.replay(lstm, torch.randn(2, 5, 7)),
        "gradient_profile": lambda: rnnscope.gradient_profile(lstm, x, loss="bogus"),
        "lag_profile": lambda: rnnscope.lag_profile(lstm, x, positions=0),
        "compare": lambda: rnnscope.compare({}),
        "state_gradients": lambda: rnnscope.state_gradients(lstm, x, keep="bogus"),
        "cell_jacobians": lambda: rnnscope.cell_jacobians(lstm, x, state="q"),
        "step_jacobians": lambda: rnnscope.step_jacobians(lstm, x, method="q"),
        "lyapunov_spectrum": lambda: rnnscope.lyapunov_spectrum(lstm, x, chunk_size=0),
        "gate_stats": lambda: rnnscope.gate_stats(nn.RNN(3, 4), x),
        "init_forget_bias": lambda: rnnscope.init_forget_bias(nn.RNN(3, 4), 1.0),
        "chrono_init": lambda: rnnscope.chrono_init(lstm, -1),
        "decay_table": lambda: rnnscope.decay_table((2.0,), (3,)),
        "memory_time": lambda: rnnscope.memory_time(2.0),
        "linear_scan": lambda: rnnscope.linear_scan(torch.ones(2, 3), torch.ones(2, 4)),
        "parameter_sensitivity": lambda: rnnscope.parameter_sensitivity(
            rnnscope.MinGRU(3, 4), x, chunk_size=0),
        "linear_recurrence_sensitivity": lambda: rnnscope.linear_recurrence_sensitivity(
            torch.tensor([0.5]), wrt="bogus"),
        "curse_of_memory": lambda: rnnscope.curse_of_memory([0.5, 1.0], t=3),
    }


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_errors_start_with_the_function_name(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((TypeError, ValueError)) as info:
            _bad_calls()[name]()
    assert str(info.value).startswith(f"{name}: "), str(info.value)


def test_every_public_function_has_an_error_case():
    # effective_memory lives in results.py with the result objects; its messages are its own
    assert set(public_functions()) - set(_bad_calls()) == {"effective_memory"}
