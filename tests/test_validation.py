"""The validation layer: every public entry point (API and CLI) checks dtype, device and meta,
sizes, option ranges, a memory estimate and grad mode before any work, and says in one line
which function refused what and how to fix it. One test per case of the hardening issue's
"compare skips input checks", "out-of-range numbers" and "raw tracebacks" lists."""

import math
import time

import pytest
import torch
from torch import nn

import rnnscope
from rnnscope.cli import main
from rnnscope.experiments import ExperimentConfig
from rnnscope.studies import compare_study

SMALL = ["--seq-len", "6", "--hidden-size", "4", "--input-size", "3", "--samples", "2",
         "--quiet"]

USER_CODE = """
import torch
from torch import nn

class Boom(BaseException):
    pass

def boom():
    raise Boom("kaboom")

def exit7():
    raise SystemExit(7)

def conv():
    return nn.Conv1d(4, 8, 3)

def transformer():
    return nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                          dim_feedforward=8)

def lstm():
    torch.manual_seed(0)
    return nn.LSTM(4, 8, batch_first=True)

def meta():
    return nn.LSTM(4, 8, batch_first=True, device="meta")

class ExitInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)

    def forward(self, x):
        raise SystemExit(3)

def exit_in_forward():
    return ExitInForward()
"""


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    (tmp_path / "usercode.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(capsys, *args):
    """rnnscope.cli.main in-process: (exit code, stderr). No traceback may ever be printed."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def lstm(seed=0):
    torch.manual_seed(seed)
    return nn.LSTM(4, 8, batch_first=True)


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# compare makes the same input checks as gradient_profile (and so does lag_profile)

MEASURES = {
    "compare": lambda m, inputs: rnnscope.compare({"LSTM": m}, inputs),
    "gradient_profile": lambda m, inputs: rnnscope.gradient_profile(m, inputs),
    "lag_profile": lambda m, inputs: rnnscope.lag_profile(m, inputs),
}


@pytest.mark.parametrize("fn", MEASURES)
@pytest.mark.parametrize("bad, exc, needle", [
    (torch.randint(0, 3, (2, 5, 4)), TypeError, "torch.int64 but a LSTM takes floating-point"),
    (torch.ones(2, 5, 4, dtype=torch.bool), TypeError, "torch.bool"),
    (torch.randn(2, 5, 4, dtype=torch.complex64), TypeError, "complex dtype"),
    (torch.randn(0, 5, 4), ValueError, r"shape \(0, 5, 4\): an empty"),
    (torch.randn(2, 0, 4), ValueError, r"shape \(2, 0, 4\): an empty"),
    (torch.randn(2, 5, 7), ValueError, r"I=4.*got \(2, 5, 7\)"),
], ids=["int", "bool", "complex", "B=0", "T=0", "wrong-I"])
def test_input_checks_before_any_work(fn, bad, exc, needle, untouched):
    snapshot, assert_untouched = untouched
    m = lstm()
    before = snapshot(m)
    with pytest.raises(exc, match=needle) as info:
        MEASURES[fn](m, bad)
    msg = str(info.value)
    assert msg.startswith(f"{fn}: ") and "\n" not in msg
    assert_untouched(m, before)


def test_complex_inputs_never_lose_their_imaginary_part():
    """A complex input is refused even where a model could cast it (a Linear in front)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 8, batch_first=True))
    with pytest.raises(TypeError, match="does not drop imaginary parts"):
        rnnscope.gradient_profile(model, torch.randn(2, 5, 4, dtype=torch.complex64))


def test_token_ids_only_where_the_model_embeds_them():
    lm = nn.Sequential(nn.Embedding(10, 4), nn.LSTM(4, 8, batch_first=True))
    prof = rnnscope.gradient_profile(lm, torch.randint(0, 10, (2, 5)))
    assert prof.per_sample.shape == (2, 5)
    with pytest.raises(TypeError, match="no nn.Embedding to take them"):
        rnnscope.gradient_profile(nn.Sequential(nn.Linear(4, 4)), torch.randint(0, 3, (2, 5, 4)))


def test_inspect_refuses_complex_inputs_file(user_code, capsys):
    torch.save(torch.randn(2, 5, 4, dtype=torch.complex64), user_code / "complex.pt")
    code, err = cli(capsys, "inspect", "usercode:lstm", "--inputs", "complex.pt", "--quiet",
                    "--out", "rep")
    assert code == 1 and "complex dtype torch.complex64" in err
    assert not (user_code / "rep" / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# Out-of-range numbers


@pytest.mark.parametrize("t_max", [math.inf, -math.inf, math.nan, True, 2, "10"])
def test_chrono_init_refuses_non_finite_and_out_of_range_t_max(t_max, untouched):
    snapshot, assert_untouched = untouched
    m = lstm()
    before = snapshot(m)
    with pytest.raises((ValueError, TypeError), match=r"chrono_init: t_max must be a finite "
                                                      r"number > 2; got"):
        rnnscope.chrono_init(m, t_max)
    assert_untouched(m, before)  # no ±inf (or anything) written into the biases


@pytest.mark.parametrize("value", [math.inf, math.nan, True, None])
def test_init_forget_bias_refuses_non_finite_values(value, untouched):
    snapshot, assert_untouched = untouched
    m = lstm()
    before = snapshot(m)
    with pytest.raises((ValueError, TypeError), match="init_forget_bias: value must be"):
        rnnscope.init_forget_bias(m, value)
    assert_untouched(m, before)


@pytest.mark.parametrize("kwargs, needle", [
    ({"explode_norm": -1}, "explode_norm must be a finite number > 0 or None; got -1"),
    ({"explode_factor": math.nan}, "explode_factor must be a finite number > 0; got nan"),
    ({"cooldown": -1}, "cooldown must be a non-negative int; got -1"),
    ({"vanish_lag": True}, "vanish_lag must be a positive int; got bool"),
    ({"explode_norm": math.inf}, "explode_norm must be a finite number"),
    ({"saturation_lo": 0.9, "saturation_hi": 0.5}, "saturation_lo must be below"),
])
def test_alert_policy_refuses_out_of_range_thresholds(kwargs, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        rnnscope.AlertPolicy(**kwargs)
    rnnscope.AlertPolicy(explode_norm=None, cooldown=0, clip_after=0)  # the "off" values


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_experiment_lr_must_be_finite_and_positive(value, tmp_path, capsys):
    out = tmp_path / "rep"
    code, err = cli(capsys, "experiment", "adding", "--lr", value, "--out", str(out))
    assert code == 2 and f"argument --lr: expected a finite number > 0, got '{value}'" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="experiment: lr must be a finite number > 0"):
        ExperimentConfig(lr=float(value)).check()


@pytest.mark.parametrize("option, value", [("--seq-len", 10 ** 9), ("--samples", 10 ** 9),
                                           ("--hidden-size", 10 ** 6), ("--layers", 10 ** 6)])
def test_compare_sizes_beyond_memory_are_refused_at_once(option, value, tmp_path, capsys):
    out = tmp_path / "rep"
    t0 = time.perf_counter()
    code, err = cli(capsys, "compare", option, str(value), "--quiet", "--out", str(out))
    assert time.perf_counter() - t0 < 10
    assert code == 1
    assert "needs an estimated" in err and "available on this machine" in err
    assert err.count("\n") == 1  # one line
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("args", [
    ["inspect", "usercode:lstm", "--seq-len", str(10 ** 9)],
    ["inspect", "usercode:lstm", "--samples", str(10 ** 9)],
    ["experiment", "adding", "--T", str(10 ** 9)],
    ["experiment", "adding", "--hidden-size", str(10 ** 6)],
    ["experiment", "copy", "--steps", str(10 ** 9)],
])
def test_other_commands_refuse_sizes_beyond_memory(args, user_code, capsys):
    t0 = time.perf_counter()
    code, err = cli(capsys, *args, "--quiet", "--out", "rep")
    assert time.perf_counter() - t0 < 10
    assert code == 1 and "needs an estimated" in err and "available" in err
    assert not (user_code / "rep" / "results.json").exists()


def test_memory_estimate_uses_the_budget_and_names_it(monkeypatch):
    """The estimate is compared with the memory available (here a 1 MB budget set through
    RNNSCOPE_MEMORY_LIMIT), and a run that fits is not refused."""
    opts = dict(models=("lstm",), seq_len=6, hidden_size=4, input_size=3, samples=2)
    monkeypatch.setenv("RNNSCOPE_MEMORY_LIMIT", "1K")
    with pytest.raises(MemoryError, match=r"estimated .* but 1\.02 KB is "
                                          r"RNNSCOPE_MEMORY_LIMIT"):
        compare_study(**opts)
    monkeypatch.setenv("RNNSCOPE_MEMORY_LIMIT", "1G")
    assert compare_study(**opts).recurrent["LSTM"].kind == "lstm"


def test_api_drawn_inputs_beyond_memory_are_refused():
    m = lstm()
    with pytest.raises(MemoryError, match="gradient_profile: 5 drawn sequences of 1000000000 "
                                          "steps"):
        rnnscope.gradient_profile(m, seq_len=10 ** 9, samples=5)


def test_memory_estimate_bounds_a_measured_run():
    """The formula is an upper bound of what a small run allocates (tracemalloc does not see
    torch's allocator, so compare with the tensors a run really holds: the one-step Jacobians
    of step_jacobians at T=64 are J·T·N² float32, which the estimate must exceed)."""
    from rnnscope.budget import recurrent_bytes

    J, T, H = 4, 64, 16
    sj = rnnscope.step_jacobians(nn.LSTM(3, H, batch_first=True), torch.randn(J, T, 3),
                                 keep="full")
    held = sj.indirect.numel() * sj.indirect.element_size()
    assert recurrent_bytes("lstm", input_size=3, hidden_size=H, samples=J, seq_len=T,
                           jac_samples=J) > 4 * held


# ---------------------------------------------------------------------------------------------
# Raw tracebacks and torch-internal errors become rnnscope's one-line errors


@pytest.mark.parametrize("call", [
    lambda m: rnnscope.gradient_profile(m, torch.randn(2, 5, 4)),
    lambda m: rnnscope.gradient_profile(m, seq_len=5, samples=2),
    lambda m: rnnscope.state_gradients(m, torch.randn(2, 5, 4)),
    lambda m: rnnscope.cell_jacobians(m, torch.randn(2, 5, 4)),
    lambda m: rnnscope.gate_stats(m, torch.randn(2, 5, 4)),
    lambda m: rnnscope.replay(m, torch.randn(2, 5, 4)),
    lambda m: rnnscope.chrono_init(m, 10),
], ids=["profile", "profile-drawn", "state_gradients", "cell_jacobians", "gate_stats", "replay",
        "chrono_init"])
def test_meta_models_are_refused(call):
    meta = nn.LSTM(4, 8, batch_first=True, device="meta")
    with pytest.raises(ValueError, match=r"parameters are on the meta device.*to_empty"):
        call(meta)


def test_meta_inputs_are_refused():
    with pytest.raises(ValueError, match="gradient_profile: inputs is a meta tensor"):
        rnnscope.gradient_profile(lstm(), torch.randn(2, 5, 4, device="meta"))


def test_inspect_refuses_a_meta_model(user_code, capsys):
    code, err = cli(capsys, "inspect", "usercode:meta", "--quiet", "--no-report")
    assert code == 1 and "meta device" in err


@pytest.mark.parametrize("call, needle", [
    (lambda m: rnnscope.gradient_profile(m, x(2, 5, 4, dtype=torch.float64)),
     r"gradient_profile: inputs has dtype torch.float64 but the LSTM's parameters are "
     r"torch.float32"),
    (lambda m: rnnscope.gradient_profile(
        m, x(2, 5, 4), forward_args=((torch.zeros(1, 2, 8, dtype=torch.float64),
                                      torch.zeros(1, 2, 8)),)),
     r"forward_args\[0\]\[0\] has dtype torch.float64"),
    (lambda m: rnnscope.state_gradients(m, x(2, 5, 4), (torch.zeros(1, 2, 8),
                                                        torch.zeros(1, 2, 8,
                                                                    dtype=torch.float64))),
     r"state_gradients: hx\[1\] has dtype torch.float64"),
    (lambda m: rnnscope.cell_jacobians(m, x(2, 5, 4, dtype=torch.float64)),
     "cell_jacobians: inputs has dtype torch.float64"),
], ids=["profile-inputs", "profile-hx", "state_gradients-c0", "cell_jacobians"])
def test_dtype_mismatches_name_both_dtypes(call, needle, untouched):
    snapshot, assert_untouched = untouched
    m = lstm()
    before = snapshot(m)
    with pytest.raises(TypeError, match=needle):
        call(m)
    assert_untouched(m, before)


def test_a_wrapper_may_cast_its_inputs_itself():
    """Only a bare recurrent module is held to its parameters' dtype: a wrapper that casts
    its inputs works, and one that does not fails with the dtype named."""
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm()

        def forward(self, x):
            return self.lstm(x.float())[0]

    x64 = x(2, 5, 4, dtype=torch.float64)
    prof = rnnscope.gradient_profile(Casting(), x64)
    assert prof.per_sample.shape == (2, 5) and torch.isfinite(prof.per_sample).all()
    with pytest.raises(RuntimeError, match=r"lag_profile: the Sequential's forward failed on "
                                           r"inputs shape \(2, 5, 4\) \(float64\)"):
        rnnscope.lag_profile(nn.Sequential(nn.Linear(4, 4), lstm()), x64)


def test_bool_where_an_int_is_expected():
    with pytest.raises(TypeError, match="gate_stats: bins must be a positive int; got bool"):
        rnnscope.gate_stats(lstm(), torch.randn(2, 5, 4), bins=True)
    with pytest.raises(TypeError, match="cell_jacobians: layer must be a non-negative int"):
        rnnscope.cell_jacobians(nn.LSTM(4, 8, num_layers=2), torch.randn(5, 2, 4), layer=True)


GRAD_FUNCTIONS = {
    "gradient_profile": lambda m, x: rnnscope.gradient_profile(m, x),
    "compare": lambda m, x: rnnscope.compare({"LSTM": m}, x),
    "lag_profile": lambda m, x: rnnscope.lag_profile(m, x, positions=[4]),
    "state_gradients": lambda m, x: rnnscope.state_gradients(m, x),
}


@pytest.mark.parametrize("fn", GRAD_FUNCTIONS)
def test_inference_mode_is_refused_and_no_grad_just_works(fn, untouched):
    snapshot, assert_untouched = untouched
    m, inputs = lstm(), torch.randn(2, 5, 4)
    before = snapshot(m)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=f"{fn}: cannot run under "
                                               r"torch.inference_mode\(\).*outside"):
            GRAD_FUNCTIONS[fn](m, inputs)
    with torch.no_grad():  # rnnscope enables grad itself
        quiet = GRAD_FUNCTIONS[fn](m, inputs)
    loud = GRAD_FUNCTIONS[fn](m, inputs)
    assert repr(quiet.to_dict()) == repr(loud.to_dict())
    assert_untouched(m, before)


def test_inference_tensors_are_refused_with_the_fix():
    with torch.inference_mode():
        inputs = torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match=r"inputs was created under torch.inference_mode"):
        rnnscope.gradient_profile(lstm(), inputs)


def test_analyses_without_autograd_still_run_in_inference_mode():
    m, inputs = lstm(), torch.randn(2, 5, 4)
    want = rnnscope.cell_jacobians(m, inputs, keep="norms").spectral
    with torch.inference_mode():
        got = rnnscope.cell_jacobians(m, inputs, keep="norms").spectral
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("factory, needle", [
    ("usercode:boom", "the model factory usercode:boom raised Boom('kaboom') instead of "
                      "returning"),
    ("usercode:exit7", "the model factory usercode:exit7 raised SystemExit (exit code 7)"),
    ("builtins:exit", "the model factory builtins:exit raised SystemExit (exit code None)"),
])
def test_factories_that_do_not_return_a_module(factory, needle, user_code, capsys):
    code, err = cli(capsys, "inspect", factory, "--quiet", "--out", "rep")
    assert code == 1 and needle in err and "must return a torch.nn.Module" in err
    assert not (user_code / "rep").exists()


def test_factory_returning_something_else_says_what(user_code, capsys):
    code, err = cli(capsys, "inspect", "builtins:dict", "--quiet", "--no-report")
    assert code == 1 and "must be (or return) a torch.nn.Module; got dict" in err


def test_system_exit_from_a_forward_is_not_passed_on(user_code, capsys):
    code, err = cli(capsys, "inspect", "usercode:exit_in_forward", "--quiet", "--no-report")
    assert code == 1 and "raised SystemExit (exit code 3)" in err


def test_factory_system_exit_in_a_subprocess_exits_1(user_code):
    import os
    import subprocess
    import sys

    src = os.path.dirname(os.path.dirname(rnnscope.__file__))  # this rnnscope, from any cwd
    env = {**os.environ, "PYTHONPATH": src, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "rnnscope", "inspect", "usercode:exit7",
                        "--quiet", "--no-report"], capture_output=True, text=True,
                       cwd=user_code, env=env)
    assert p.returncode == 1 and "SystemExit (exit code 7)" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("model, needle", [
    (nn.Conv1d(4, 8, 3), r"gradient_profile: a Conv1d reads \(B, C, L\)"),
    (nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                    dim_feedforward=8),
     r"gradient_profile: the Transformer's forward\(src, tgt, ...\) cannot be called.*no "
     r"nn.RNN/LSTM/GRU submodule"),
])
def test_unsupported_models_are_refused_by_rnnscope(model, needle):
    for inputs in (torch.randn(2, 5, 4 if isinstance(model, nn.Conv1d) else 8), None):
        kwargs = {} if inputs is not None else {"seq_len": 5, "samples": 2, "input_size": 4}
        with pytest.raises(TypeError, match=needle):
            rnnscope.gradient_profile(model, inputs, **kwargs)


@pytest.mark.parametrize("factory, needle", [
    ("usercode:conv", "a Conv1d reads (B, C, L)"),
    ("usercode:transformer", "the Transformer's forward(src, tgt, ...) cannot be called"),
])
def test_inspect_refuses_unsupported_models(factory, needle, user_code, capsys):
    code, err = cli(capsys, "inspect", factory, "--input-size", "4", "--quiet", "--no-report")
    assert code == 1 and needle in err


def test_a_model_failing_on_its_inputs_is_named_with_what_it_got():
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 8, batch_first=True))
    with pytest.raises(RuntimeError, match=r"gradient_profile: the Sequential's forward failed "
                                           r"on inputs shape \(2, 5, 7\) \(float32\) "
                                           r"\(RuntimeError: mat1 and mat2"):
        rnnscope.gradient_profile(model, torch.randn(2, 5, 7))


@pytest.mark.parametrize("fn", ["gradient_profile", "lag_profile"])
def test_bare_cell_with_2d_inputs_is_refused(fn):
    # found by the fuzz suite: a GRUCell given (B, I) was profiled with its I features
    # reported as time steps (per_sample (2, 3) for inputs (2, 3))
    cell = nn.GRUCell(3, 4)
    with pytest.raises(ValueError, match=f"^{fn}: a GRUCell given 2-D inputs"):
        getattr(rnnscope, fn)(cell, torch.randn(2, 3))
    prof = rnnscope.gradient_profile(cell, torch.randn(2, 5, 3))
    assert prof.per_sample.shape == (2, 5)
