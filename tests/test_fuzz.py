"""Fuzz suite (hardening issue, item 8): hypothesis draws dtypes, shapes, devices (meta
included), option values and wrappers for every public measurement and every CLI command, and
checks the promises:

1. a clear error (ValueError/TypeError/RuntimeError, one line naming the rnnscope function; on
   the CLI exit 1 or 2 and a one-line message on stderr, never a traceback) or a correct result
   (documented type and shapes; non-finite numbers only where the result reports them);
2. the model untouched (parameters, .grad, training flags, requires_grad, hooks);
3. no file written outside --out;
4. no hang (every case runs under a wall-clock alarm).

Profiles: the default keeps the file at about a minute on 2 cores; RNNSCOPE_FUZZ=deep draws
many more cases. The counts of every run (cases tried, clear errors, correct results and the
failures: unclear errors, tracebacks, silent-wrong results, hangs) are printed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import os
import signal
import sys
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rnnscope
from rnnscope.cli import main as cli_main
from conftest import snapshot

DEEP = os.environ.get("RNNSCOPE_FUZZ", "").lower() == "deep"
settings.register_profile("fuzz", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz-deep", max_examples=int(os.environ.get("RNNSCOPE_FUZZ_EXAMPLES", 600)), deadline=None,
                          suppress_health_check=list(HealthCheck))
FUZZ = settings.get_profile("fuzz-deep" if DEEP else "fuzz")
CLI_FUZZ = settings(FUZZ, max_examples=max(8, FUZZ.max_examples // 3))
HANG_SECONDS = 60

COUNTS: Counter = Counter()
FINDINGS: list[str] = []
PER_FUNCTION: Counter = Counter()


def _report_counts():
    if not COUNTS:
        return
    keys = ["tried", "clear_error", "correct", "unclear_error", "traceback", "silent_wrong",
            "touched_model", "outside_out", "hang", "oracle_checked"]
    line = ", ".join(f"{k}={COUNTS.get(k, 0)}" for k in keys)
    sys.__stdout__.write(f"\nrnnscope fuzz ({'deep' if DEEP else 'default'}): {line}\n")
    sys.__stdout__.write("  per function: " + ", ".join(
        f"{k}={v}" for k, v in sorted(PER_FUNCTION.items())) + "\n")
    for f in FINDINGS[:20]:
        sys.__stdout__.write(f"  finding: {f}\n")
    sys.__stdout__.flush()


atexit.register(_report_counts)


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code swallows it."""


@contextlib.contextmanager
def alarm(seconds: int = HANG_SECONDS):
    def fire(signum, frame):
        raise Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fail(kind: str, what: str):
    # hypothesis replays and shrinks a failing case: count each distinct finding once
    finding = f"{kind}: {what}"
    if finding not in FINDINGS:
        COUNTS[kind] += 1
        FINDINGS.append(finding)
    pytest.fail(finding)


# ---------------------------------------------------------------------------------------------
# Models

class First(nn.Module):
    """Keeps the output sequence of a recurrent module (so it composes in nn.Sequential)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class Wrapper(nn.Module):
    """A user's model: recurrent module and a linear head."""

    def __init__(self, rnn, H_out):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(H_out, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


KINDS = {"LSTM": (nn.LSTM, nn.LSTMCell), "GRU": (nn.GRU, nn.GRUCell), "RNN": (nn.RNN, nn.RNNCell)}
VOCAB = 7


@st.composite
def models(draw, wrappers=("bare", "cell", "sequential", "wrapper", "dataparallel")):
    """(model, info): info holds what the valid inputs look like."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    I, H = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    wrap = draw(st.sampled_from(wrappers))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    device = draw(st.sampled_from(["cpu"] * 9 + ["meta"]))
    train = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 3)))
    if wrap == "cell":
        rnn = KINDS[kind][1](I, H)
        bf, info = True, {"cell": True}
    else:
        bf = draw(st.booleans())
        layers = draw(st.integers(1, 2))
        bidir = draw(st.booleans())
        rnn = KINDS[kind][0](I, H, num_layers=layers, batch_first=bf, bidirectional=bidir)
        info = {"cell": False}
    H_out = H * (2 if getattr(rnn, "bidirectional", False) else 1)
    model = {"bare": lambda: rnn, "cell": lambda: rnn,
             "sequential": lambda: nn.Sequential(nn.Embedding(VOCAB, I), First(rnn)),
             "wrapper": lambda: Wrapper(rnn, H_out),
             "dataparallel": lambda: nn.DataParallel(First(rnn))}[wrap]()
    model = model.to(dtype).train(train)
    if device == "meta":
        model = model.to("meta")
    # a .grad present before the call must survive it
    if draw(st.booleans()) and device != "meta":
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
    if draw(st.booleans()):
        next(model.parameters()).requires_grad_(False)
    info.update(kind=kind, I=I, H=H, wrap=wrap, dtype=dtype, batch_first=bf or wrap == "sequential",
                device=device, tokens=wrap == "sequential", recurrent=rnn, model=model)
    return model, info


INPUT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool,
                torch.complex64]


@st.composite
def inputs_for(draw, info):
    """Mostly inputs in the model's own layout (so results get checked), sometimes anything."""
    valid = draw(st.booleans()) or draw(st.booleans())
    B, T = draw(st.integers(1, 3)), draw(st.sampled_from([1, 1, 2, 3, 5]))
    if valid:
        if info["tokens"]:
            shape, dtype = (B, T), torch.int64
        else:
            shape = (B, T, info["I"]) if info["batch_first"] or info["cell"] else (T, B, info["I"])
            if draw(st.integers(0, 5)) == 0:  # unbatched
                shape = (T, info["I"])
            dtype = info["dtype"]
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
        dtype = draw(st.sampled_from(INPUT_DTYPES))
    device = draw(st.sampled_from(["cpu"] * 8 + ["meta"]))
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    if dtype in (torch.int64,):
        x = torch.randint(0, VOCAB, shape, generator=g)
    elif dtype == torch.bool:
        x = torch.rand(shape, generator=g) > 0.5
    elif dtype == torch.complex64:
        x = torch.randn(shape, generator=g, dtype=torch.complex64)
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if x.numel() and draw(st.integers(0, 4)) == 0:
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(
                st.sampled_from([math.nan, math.inf, -math.inf]))
    return x


GARBAGE = st.one_of(
    st.integers(-3, 5), st.sampled_from([0, -1, 10**9, 2**62, True, False]),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, -2.5, 1e300]),
    st.sampled_from(["", "last", "all", "full", "norms", "h", "c", "auto", "jvp", "vjp", "x"]),
    st.none())


# ---------------------------------------------------------------------------------------------
# The properties

def is_clear(fn: str, e: BaseException) -> bool:
    msg = str(e)
    # MemoryError is the budget's refusal (an estimate above what the machine has)
    return (isinstance(e, (ValueError, TypeError, RuntimeError, MemoryError)) and "\n" not in msg.strip()
            and "Traceback" not in msg and (msg.startswith(fn) or f"{fn}" in msg))


def nonfinite_reported(result, caught) -> bool:
    if any("non-finite" in str(w.message) or "NaN" in str(w.message) for w in caught):
        return True
    d = json.dumps(_to_dict(result), default=str)
    return any(k in d for k in ('"nonfinite', '"nonfinite_samples": ', '"nonfinite_inputs'))


def _to_dict(result):
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, torch.Tensor):
        return result.tolist()
    return repr(result)


def _numbers(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)


def _has_nonfinite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return bool((~torch.isfinite(obj.double())).any()) if obj.is_floating_point() else False
    return any(not math.isfinite(v) for v in _numbers(obj))


def touched(model, before) -> str | None:
    """What changed in the model ('' if nothing). Meta parameters have no values to compare."""
    after = snapshot(model)
    for n, b in before["params"].items():
        a = after["params"][n]
        if b.is_meta or a.is_meta:
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"parameter {n} changed shape/dtype"
        elif not torch.equal(b, a) and not (torch.isnan(b).any() and torch.equal(b.isnan(), a.isnan())):
            return f"parameter {n} changed"
        gb, ga = before["grads"][n], after["grads"][n]
        if (gb is None) != (ga is None) or (gb is not None and not gb.is_meta
                                            and not torch.equal(gb, ga)):
            return f".grad of {n} changed"
    for key in ("requires_grad", "training", "hooks"):
        if before[key] != after[key]:
            return f"{key} changed"
    return None


def run_case(fn: str, model, call, check_result, *, model_untouched=True):
    """Run one drawn call and classify it; fail the test on any broken promise."""
    COUNTS["tried"] += 1
    before = snapshot(model)
    try:
        with warnings.catch_warnings(record=True) as caught, alarm():
            warnings.simplefilter("always")
            result = call()
    except Hang as e:
        fail("hang", f"{fn}: {e}")
    except (ValueError, TypeError, RuntimeError, MemoryError) as e:
        if model_untouched and (what := touched(model, before)):
            fail("touched_model", f"{fn} raised and {what}")
        if not is_clear(fn, e):
            fail("unclear_error", f"{fn}: {type(e).__name__}: {str(e)[:400]!r}")
        COUNTS["clear_error"] += 1
        PER_FUNCTION[f"{fn} error"] += 1
        if os.environ.get("RNNSCOPE_FUZZ_VERBOSE"):
            sys.__stdout__.write(f"  {fn}: {str(e)[:160]}\n")
        return None
    except Exception as e:  # noqa: BLE001 - any other type is a raw internal error
        fail("traceback", f"{fn}: {type(e).__name__}: {str(e)[:300]!r}")
    if model_untouched and (what := touched(model, before)):
        fail("touched_model", f"{fn}: {what}")
    problem = check_result(result)
    payload = _to_dict(result)
    if fn == "lyapunov_spectrum" and isinstance(result, rnnscope.LyapunovSpectrum):
        # -inf is a true exponent: a saturated gate (σ' = 0 exactly, from a huge or infinite
        # input alike) makes the one-step Jacobian exactly singular, log 0 = -inf
        exps = result.exponents
        payload = exps[exps != -math.inf].tolist()
    if problem is None and _has_nonfinite(payload) and not nonfinite_reported(result, caught):
        problem = "non-finite numbers in the result that the result does not report"
    if problem:
        fail("silent_wrong", f"{fn}: {problem}")
    COUNTS["correct"] += 1
    PER_FUNCTION[f"{fn} correct"] += 1
    return result


# ---------------------------------------------------------------------------------------------
# API functions taking (model, inputs)

def _batch_time(x, info):
    """(B, T) of valid inputs as the documented results lay them out (batch-major)."""
    if info["tokens"]:
        return (x.shape[0], x.shape[1]) if x.dim() == 2 else (1, x.shape[0])
    if x.dim() == 2:
        return 1, x.shape[0]
    return (x.shape[0], x.shape[1]) if info["batch_first"] or info["cell"] else (x.shape[1], x.shape[0])


def _profile_check(x, info, loss="last"):
    def check(r):
        if not isinstance(r, rnnscope.GradientProfile):
            return f"returned {type(r).__name__}"
        if r.per_sample.dim() != 2 or (r.per_sample < 0).any():
            return f"per_sample of shape {tuple(r.per_sample.shape)} with negative norms"
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and r.site == "input" and \
                tuple(r.per_sample.shape) != _batch_time(x, info):
            return f"per_sample {tuple(r.per_sample.shape)} for inputs {tuple(x.shape)}"
        if oracle is not None and x.dim() == 3 and torch.isfinite(x).all():
            want = oracle(x)
            COUNTS["oracle_checked"] += 1
            if not torch.allclose(r.per_sample, want, rtol=1e-5, atol=1e-10):
                return (f"per_sample differs from plain autograd by "
                        f"{(r.per_sample - want).abs().max().item():.3g}")
        return None
    oracle = None
    if info["wrap"] == "bare" and not info["cell"] and info["dtype"] == torch.float64 and \
            loss in ("last", None) and isinstance(x, torch.Tensor) and x.is_floating_point() \
            and not x.is_meta and info["device"] == "cpu":
        def autograd_profile(x):
            """‖∂ sum(out[b, T-1]) / ∂x[b, t]‖ by autograd on a copy of the module, (B, T)."""
            import copy
            m = copy.deepcopy(info["model"]).eval()
            for p in m.parameters():
                p.requires_grad_(True)
            xb = x.detach().clone().requires_grad_(True)
            out = m(xb)[0]
            if not info["batch_first"]:
                out = out.transpose(0, 1)
            (g,) = torch.autograd.grad(out[:, -1].sum(), xb)
            if not info["batch_first"]:
                g = g.transpose(0, 1)
            return g.norm(dim=-1)
        oracle = autograd_profile
    return check


MODEL_OPTIONS = {
    "gradient_profile": ["loss", "seq_len", "samples", "seed", "time_dim", "input_size"],
    "lag_profile": ["positions", "seed", "time_dim"],
}
MODULE_OPTIONS = {
    "state_gradients": ["loss", "keep"],
    "cell_jacobians": ["layer", "direction", "state", "keep", "method", "chunk_size"],
    "step_jacobians": ["layer", "direction", "state", "keep", "method", "chunk_size"],
    "lyapunov_spectrum": ["layer", "direction", "k", "warmup", "method", "chunk_size"],
    "gate_stats": ["bins"],
    "replay": [],
}


# documented values of each option (drawn most of the time, so results get checked)
VALID = {"loss": st.sampled_from(["last", "all"]), "seq_len": st.integers(1, 5),
         "samples": st.integers(1, 3), "seed": st.integers(0, 5), "time_dim": st.none(),
         "input_size": st.none(), "positions": st.integers(1, 4), "keep": st.sampled_from(
             ["norms", "full"]), "layer": st.just(0), "direction": st.just(0),
         "state": st.none(), "method": st.just("auto"), "k": st.sampled_from([None, 1]),
         "warmup": st.integers(0, 2), "bins": st.integers(1, 8),
         "chunk_size": st.sampled_from([None, 1, 3])}


@st.composite
def options(draw, names):
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))) if names else []
    return {n: draw(GARBAGE if draw(st.integers(0, 2)) == 0 else VALID[n]) for n in chosen}


@FUZZ
@given(data=st.data(), fn=st.sampled_from(["gradient_profile", "lag_profile"]))
def test_model_functions(data, fn):
    model, info = data.draw(models())
    x = data.draw(st.one_of(inputs_for(info), st.none()) if fn == "gradient_profile"
                  else inputs_for(info))
    opts = data.draw(options(MODEL_OPTIONS[fn]))
    if x is None:  # drawn inputs: keep them small unless the size is garbage (budget refuses)
        opts.setdefault("seq_len", 4)
        opts.setdefault("samples", 2)
    f = getattr(rnnscope, fn)
    check = _profile_check(x, info, opts.get("loss", "last")) if fn == "gradient_profile" else _lag_check(x, info)
    run_case(fn, model, lambda: f(model, x, **opts), check)


def _lag_check(x, info):
    def check(r):
        if not isinstance(r, rnnscope.LagProfile):
            return f"returned {type(r).__name__}"
        if (r.per_sample[torch.isfinite(r.per_sample)] < 0).any():
            return "negative norms"
        return None
    return check


@FUZZ
@given(data=st.data())
def test_compare(data):
    n = data.draw(st.integers(1, 2))
    drawn = [data.draw(models(wrappers=("bare", "wrapper"))) for _ in range(n)]
    info = drawn[0][1]
    x = data.draw(st.one_of(inputs_for(info), st.none()))
    opts = data.draw(options(["seq_len", "samples", "loss", "seed", "time_dim"]))
    if x is None:
        opts.setdefault("seq_len", 4)
        opts.setdefault("samples", 2)
    ms = {f"m{i}": m for i, (m, _) in enumerate(drawn)}
    holder = nn.ModuleList([m for m, _ in drawn])  # one snapshot covers all models

    def check(r):
        if not isinstance(r, rnnscope.Comparison) or set(r.profiles) != set(ms):
            return f"returned {type(r).__name__} without a profile per model"
        return None
    run_case("compare", holder, lambda: rnnscope.compare(ms, x, **opts), check)


def _module_check(fn, x, info):
    def check(r):
        expected = {"state_gradients": rnnscope.StateGradients,
                    "cell_jacobians": rnnscope.CellJacobians,
                    "step_jacobians": rnnscope.StepJacobians,
                    "lyapunov_spectrum": rnnscope.LyapunovSpectrum,
                    "gate_stats": rnnscope.GateStats,
                    "replay": rnnscope.Trace}[fn]
        if not isinstance(r, expected):
            return f"returned {type(r).__name__}, not {expected.__name__}"
        if fn == "lyapunov_spectrum" and r.exponents.dim() != (1 if x.dim() == 2 else 2):
            return f"spectrum of shape {tuple(r.exponents.shape)}"
        if fn == "step_jacobians":
            r.summary()  # the summary must not crash either (eigh on NaN once did)
        return None
    return check


@FUZZ
@given(data=st.data(), fn=st.sampled_from(sorted(MODULE_OPTIONS)))
def test_module_functions(data, fn):
    # these take the recurrent module itself (or a cell); wrappers are tried too (refused)
    model, info = data.draw(models(wrappers=("bare", "bare", "bare", "cell", "wrapper")))
    x = data.draw(inputs_for(info))
    opts = data.draw(options(MODULE_OPTIONS[fn]))
    f = getattr(rnnscope, fn)
    run_case(fn, model, lambda: f(model, x, **opts), _module_check(fn, x, info))


@FUZZ
@given(data=st.data(), fn=st.sampled_from(["init_forget_bias", "chrono_init"]))
def test_initialisations(data, fn):
    model, info = data.draw(models(wrappers=("bare", "bare", "cell", "wrapper", "sequential")))
    value = data.draw(GARBAGE if data.draw(st.integers(0, 3)) == 0 else st.floats(-5, 200))
    f = getattr(rnnscope, fn)
    before = snapshot(model)

    def check(r):
        if r is not model:
            return "did not return the module"
        after = snapshot(model)
        for n, p in after["params"].items():
            if p.is_meta:
                continue
            if not torch.isfinite(p).all():
                return f"wrote non-finite values into {n}"
            if "bias" not in n and not torch.equal(p, before["params"][n]):
                return f"changed a non-bias parameter {n}"
        for key in ("requires_grad", "training", "hooks"):
            if before[key] != after[key]:
                return f"{key} changed"
        return None
    run_case(fn, model, lambda: f(model, value), check, model_untouched=False)


# ---------------------------------------------------------------------------------------------
# The command line

def _files(root):
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def run_cli(argv, root, out_dir):
    """Run the CLI in `root` (cwd) and check exit code, stderr and where files went."""
    COUNTS["tried"] += 1
    before = {f: os.path.getmtime(os.path.join(root, f)) for f in _files(root)
              if os.path.exists(os.path.join(root, f))}
    err, outbuf = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with alarm(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(outbuf), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = cli_main(argv)
            except SystemExit as e:
                code = e.code
    except Hang as e:
        fail("hang", f"rnnscope {' '.join(argv)}: {e}")
    except BaseException as e:  # noqa: BLE001
        fail("traceback", f"rnnscope {' '.join(argv)}: {type(e).__name__}: {e}")
    finally:
        os.chdir(cwd)
    stderr = err.getvalue()
    if "Traceback" in stderr or "RNNSCOPE_DEBUG=1 for the traceback" in stderr:
        fail("traceback", f"rnnscope {' '.join(argv)}: {stderr.strip()[-400:]!r}")
    after = _files(root)
    out_rel = os.path.relpath(out_dir, root)
    outside = sorted(f for f in after if not (f + os.sep).startswith(out_rel + os.sep)
                     and (f not in before or os.path.getmtime(os.path.join(root, f)) != before[f]))
    if outside:
        fail("outside_out", f"rnnscope {' '.join(argv)} wrote {outside}")
    if code in (1, 2):
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        if not last.startswith("rnnscope") and "error" not in last:
            fail("unclear_error", f"rnnscope {' '.join(argv)} exit {code}: {stderr!r}")
        if code == 1 and len(lines) != 1:
            fail("unclear_error", f"rnnscope {' '.join(argv)} exit 1 with {len(lines)} lines: "
                                  f"{stderr[-400:]!r}")
        COUNTS["clear_error"] += 1
        PER_FUNCTION[f"cli {argv[0]} error"] += 1
        if os.environ.get("RNNSCOPE_FUZZ_VERBOSE"):
            sys.__stdout__.write(f"  cli {argv[0]}: {last[:160]}\n")
    elif code == 0:
        COUNTS["correct"] += 1
        PER_FUNCTION[f"cli {argv[0]} correct"] += 1
    else:
        fail("unclear_error", f"rnnscope {' '.join(argv)} exited {code!r}: {stderr[-300:]!r}")
    return code, outbuf.getvalue(), stderr


OPT_VALUE = st.one_of(st.integers(-2, 6).map(str), st.sampled_from(
    ["0", "-1", "1e9", "1000000000", "nan", "inf", "-inf", "0.5", "abc", "", "1,2", "True"]))


@st.composite
def cli_option(draw, name, small):
    """An option with, mostly, a small valid value; sometimes garbage."""
    if draw(st.integers(0, 7)) == 0:
        return [name, draw(OPT_VALUE)]
    return [name, str(draw(small))]


@CLI_FUZZ
@given(data=st.data())
def test_cli_compare(data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cmp"))
    out = os.path.join(root, "out")
    argv = ["compare", "--quiet", "--out", out, "--device", "cpu"]
    argv += data.draw(cli_option("--models", st.sampled_from(["rnn", "lstm", "gru", "rnn,gru",
                                                              "lstm,transformer", "rnn,,x"])))
    for name, small in [("--seq-len", st.integers(1, 6)), ("--hidden-size", st.integers(1, 5)),
                        ("--input-size", st.integers(1, 4)), ("--samples", st.integers(1, 3)),
                        ("--layers", st.integers(1, 2)), ("--jacobian-samples", st.integers(1, 2)),
                        ("--seed", st.integers(0, 3))]:
        argv += data.draw(cli_option(name, small))
    argv += data.draw(st.lists(st.sampled_from(["--json", "--no-report", "--overwrite",
                                                "--forget-bias=chrono", "--forget-bias=1.0"]),
                               unique=True))
    if "--no-report" not in argv and not (DEEP and data.draw(st.integers(0, 4)) == 0):
        argv.append("--no-report")  # figures take seconds; the deep profile draws a few
    run_cli(argv, root, out)


@CLI_FUZZ
@given(data=st.data())
def test_cli_decay(data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("decay"))
    argv = ["decay"]
    if data.draw(st.booleans()):
        argv += ["--forget", data.draw(st.sampled_from(
            ["0.9", "0.9,0.99", "1", "0", "1.5", "-0.1", "nan", "inf", "a", "", ",", "1e-320"]))]
    if data.draw(st.booleans()):
        argv += ["--lengths", data.draw(st.sampled_from(
            ["1", "10,100", "0", "-5", "1e9", "10**9", "x", "", "2.5", "99999999999999999999"]))]
    if data.draw(st.booleans()):
        argv.append("--json")
    run_cli(argv, root, os.path.join(root, "none"))


@CLI_FUZZ
@given(data=st.data())
def test_cli_experiment(data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("exp"))
    out = os.path.join(root, "out")
    argv = ["experiment", data.draw(st.sampled_from(["copy", "adding"])), "--quiet", "--out", out,
            "--device", "cpu", "--no-report"]
    for name, small in [("--T", st.integers(1, 6)), ("--steps", st.integers(1, 3)),
                        ("--batch-size", st.integers(1, 4)), ("--hidden-size", st.integers(1, 4)),
                        ("--lr", st.sampled_from([1e-3, 0.1, 3])), ("--clip", st.sampled_from([0.5, 1.0])),
                        ("--variants", st.sampled_from(["rnn", "lstm-fb1", "gru", "lstm-chrono"]))]:
        argv += data.draw(cli_option(name, small))
    if not any(a == "--steps" for a in argv):
        argv += ["--steps", "2"]
    if not any(a == "--T" for a in argv):
        argv += ["--T", "5"]
    if not any(a == "--variants" for a in argv):
        argv += ["--variants", "rnn"]
    if not any(a == "--hidden-size" for a in argv):
        argv += ["--hidden-size", "4"]
    if not any(a == "--batch-size" for a in argv):
        argv += ["--batch-size", "4"]
    run_cli(argv, root, out)


FACTORY = """
import torch
from torch import nn

def lstm():
    torch.manual_seed(0)
    return nn.LSTM(3, 4, batch_first=True)

def gru_seq_first():
    return nn.GRU(3, 4, num_layers=2)

class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.rnn = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(self.emb(x))[0]

def tokens():
    return Tokens()
"""


@CLI_FUZZ
@given(data=st.data())
def test_cli_inspect(data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("insp"))
    out = os.path.join(root, "out")
    src = os.path.join(root, "factory.py")
    with open(src, "w") as fh:
        fh.write(FACTORY)
    factory = data.draw(st.sampled_from(["lstm", "gru_seq_first", "tokens"]))
    argv = ["inspect", f"{src}:{factory}", "--quiet", "--out", out, "--device", "cpu",
            "--no-report"]
    for name, small in [("--seq-len", st.integers(1, 5)), ("--samples", st.integers(1, 3)),
                        ("--jacobian-samples", st.integers(1, 2)), ("--seed", st.integers(0, 2)),
                        ("--time-dim", st.integers(0, 1)), ("--input-size", st.integers(3, 3)),
                        ("--loss", st.sampled_from(["last", "all"]))]:
        if data.draw(st.booleans()):
            argv += data.draw(cli_option(name, small))
    for name, small in [("--seq-len", 4), ("--samples", 2), ("--jacobian-samples", 1)]:
        if name not in argv:
            argv += [name, str(small)]
    what = data.draw(st.sampled_from(["none", "tensor", "garbage"]))
    if what != "none":
        path = os.path.join(root, "inputs.pt")
        if what == "garbage":
            with open(path, "wb") as fh:
                fh.write(data.draw(st.binary(max_size=200)))
        else:
            info = {"tokens": factory == "tokens", "I": 3, "batch_first": factory != "gru_seq_first",
                    "cell": False, "dtype": torch.float32}
            x = data.draw(inputs_for(info))
            if x.is_meta:
                x = torch.zeros(x.shape, dtype=x.dtype)
            torch.save(x, path)
        argv += ["--inputs", path]
    run_cli(argv, root, out)


RESULT_KEYS = ["schema", "version", "command", "profiles", "models", "config", "per_sample",
               "table", "layers", "gates", "step", "lag", "alerts", "kind", "records"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=False,
                                                                    allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(RESULT_KEYS) | st.text(max_size=5), children, max_size=5),
    max_leaves=20)


_SEEDS: dict = {}


def seed_file(kind: str, tmp_path_factory) -> str:
    """A real results.json (from `compare`) or monitor JSONL log, made once per session, that
    the drawn files mutate (so the readers get past their first check)."""
    if kind not in _SEEDS:
        d = tmp_path_factory.mktemp(f"seed-{kind}")
        if kind == "json":
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                code = cli_main(["compare", "--quiet", "--models", "rnn,lstm", "--seq-len", "4",
                                 "--hidden-size", "3", "--input-size", "2", "--samples", "2",
                                 "--jacobian-samples", "1", "--device", "cpu",
                                 "--out", str(d / "out")])
            assert code == 0
            _SEEDS[kind] = (d / "out" / "results.json").read_text()
        else:
            from rnnscope.monitor import GradientMonitor, JSONLLogger
            torch.manual_seed(0)
            model = First(nn.LSTM(3, 4, batch_first=True))
            with GradientMonitor(model, loggers=[JSONLLogger(d / "run.jsonl")]) as mon:
                for _ in range(3):
                    model.zero_grad()
                    model(torch.randn(2, 5, 3)).pow(2).mean().backward()
                    mon.step()
            _SEEDS[kind] = (d / "run.jsonl").read_text()
    return _SEEDS[kind]


@st.composite
def mutated(draw, value):
    """`value` (parsed JSON) with 1-3 entries deleted or replaced by drawn JSON."""
    value = json.loads(json.dumps(value))
    for _ in range(draw(st.integers(1, 3))):
        slots = []

        def walk(obj):
            if isinstance(obj, dict):
                for k in list(obj):
                    slots.append((obj, k))
                    walk(obj[k])
            elif isinstance(obj, list):
                for i in range(len(obj)):
                    slots.append((obj, i))
                    walk(obj[i])
        walk(value)
        if not slots:
            break
        obj, key = slots[draw(st.integers(0, len(slots) - 1))]
        if draw(st.booleans()):
            del obj[key]
        else:
            obj[key] = draw(JSON_VALUES | st.sampled_from(["nan", "Infinity", -1, 0, 10**12]))
    return value


@CLI_FUZZ
@given(data=st.data(), command=st.sampled_from(["replot", "plot-log"]))
def test_cli_replot_and_plot_log(data, command, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("files"))
    out = os.path.join(root, "out")
    name = "results.json" if command == "replot" else "run.jsonl"
    path = os.path.join(root, name)
    kind = data.draw(st.sampled_from(["mutated"] * 3 + ["json", "lines", "bytes", "missing"]))
    if kind == "mutated" and command == "replot":
        seed = json.loads(seed_file("json", tmp_path_factory))
        with open(path, "w") as fh:
            json.dump(seed if data.draw(st.integers(0, 4)) == 0 else data.draw(mutated(seed)), fh)
    elif kind == "mutated":
        records = [json.loads(ln) for ln in seed_file("jsonl", tmp_path_factory).splitlines()
                   if ln.strip()]
        if data.draw(st.integers(0, 4)):
            i = data.draw(st.integers(0, len(records) - 1))
            records[i] = data.draw(mutated(records[i]))
        text = "\n".join(json.dumps(r) for r in records) + "\n"
        if data.draw(st.integers(0, 3)) == 0:
            text = text[: data.draw(st.integers(0, len(text)))]  # cut short, as a killed writer
        with open(path, "w") as fh:
            fh.write(text)
    elif kind == "json":
        with open(path, "w") as fh:
            json.dump(data.draw(JSON_VALUES), fh)
    elif kind == "lines":
        lines = data.draw(st.lists(JSON_VALUES, max_size=5))
        text = "\n".join(json.dumps(v) for v in lines)
        if data.draw(st.booleans()):
            text = text[: data.draw(st.integers(0, max(0, len(text))))]  # truncated
        with open(path, "w") as fh:
            fh.write(text)
    elif kind == "bytes":
        with open(path, "wb") as fh:
            fh.write(data.draw(st.binary(max_size=300)))
    argv = [command, path, "--quiet", "--out", out]
    argv += data.draw(st.lists(st.sampled_from(["--json", "--overwrite"]), unique=True))
    run_cli(argv, root, out)


def test_saturated_cell_has_minus_infinite_exponents_not_nan():
    # the case the deep fuzz flagged: an LSTMCell driven by -inf (or -1e6) saturates its gates,
    # its one-step Jacobian is exactly singular, and the exponents are -inf, the same for the
    # finite and the infinite input (no NaN, no warning needed)
    torch.manual_seed(0)
    cell = nn.LSTMCell(1, 4)
    for x in (torch.tensor([[-math.inf]]), torch.tensor([[-1e6]])):
        exps = rnnscope.lyapunov_spectrum(cell, x).exponents
        assert exps.shape == (8,) and not exps.isnan().any() and (exps < math.inf).all()
        assert (exps == -math.inf).sum() >= 1
