"""End-to-end analyses behind the command line: each returns one typed `StudyResult`.

Everything a report shows is computed here, through the same public functions a user calls
(gradient_profile/compare, cell_jacobians, step_jacobians, lyapunov_spectrum, gate_stats,
state_gradients, decay_table), and kept as their result objects; figures and HTML are drawn
from the `StudyResult` alone, and `StudyResult.from_dict` reads a saved results.json back into
the same objects, so it re-plots to the same figures.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from . import __version__, stream
from .budget import check_memory, compare_bytes, model_bytes
from .checks import check_model_call, check_number, narrow_state
from .gates import gate_stats
from .jacobians import (_trace_state_gradients_from_loss, cell_jacobians, lyapunov_spectrum,
                        state_gradients, step_jacobians, streamed_state_gradients)
from .models import DISPLAY, build_model
from .lag import lag_profile
from .profile import (compare, gradient_profile, profile_drawn, profile_of_gradient,
                      random_inputs)
from .site import (Capture, ModelCall, _as_leaf, capturing, model_call, recurrent_axes,
                   unwrap_model)
from .modern.protocol import describe_decay, is_decay_recurrence
from .recurrent import RETAIN_GATE, describe, is_recurrent
from .replay import replay
from .results import Comparison
from .study_results import LayerAnalysis, RecurrentAnalysis, Skipped, StepPaths, StudyResult
from .theory import decay_table

Progress = Callable[[str], None]

DECAY_FORGET = (0.9, 0.95, 0.99, 0.999)
DECAY_LENGTHS = (100, 500, 1000)
# Past this many steps `compare` says that the Transformer's profile costs O(T²) time.
LONG_ATTENTION = 2000


def versions() -> dict:
    return {"rnnscope": __version__, "torch": str(torch.__version__),
            "python": platform.python_version()}


# Jacobian samples "auto": at most this many (sample, step) pairs of Jacobians per module, at
# least 1 sample and at most 4. Every span and one-step Jacobian costs an exact float64
# spectral norm (Gram + eigvalsh, ~1 ms for H=128): at T=1000 four samples are 24 000 of them
# for the default models, about half of `compare`'s time. A user who wants the batch mean over
# more samples asks for it (--jacobian-samples N); the number used is in every result.
JACOBIAN_STEPS = 1000
AUTO_JACOBIAN_SAMPLES = 4


def jacobian_samples_for(jac_samples: int | str, seq_len: int, samples: int) -> int:
    """The number of samples the Jacobian analyses use: `jac_samples` if an int, else ("auto")
    min(4, 1000 // seq_len) but at least 1; never more than the batch has."""
    if jac_samples == "auto":
        jac_samples = max(1, min(AUTO_JACOBIAN_SAMPLES, JACOBIAN_STEPS // max(seq_len, 1)))
    return min(jac_samples, samples)


def _check_jacobian_samples(fn: str, jac_samples) -> None:
    if isinstance(jac_samples, str) and jac_samples != "auto":
        raise ValueError(f"{fn}: jac_samples must be 'auto' or a positive int; got "
                         f"{jac_samples!r}")
    if jac_samples != "auto":
        check_number(fn, "jac_samples", jac_samples, low=1, integer=True,
                     hint="or 'auto' (fewer samples for longer sequences)")


def _noop(stage: str) -> None:
    pass


def recurrent_analysis(module: nn.Module, x: torch.Tensor, hx=None, *,
                       jac_samples: int | str = "auto",
                       progress: Progress = _noop, name: str = "",
                       calls: int | None = None) -> RecurrentAnalysis:
    """Per layer and direction: highway vs total Jacobians, one-step paths, largest Lyapunov
    exponent, gate statistics, total state gradients. x and hx in the module's own layout;
    `calls` (inspect) is how many forward calls x was joined from. `jac_samples`: an int, or
    "auto" (`jacobian_samples_for`: 4 samples up to T=250, fewer beyond, at least 1)."""
    return _recurrent_analysis(module, x, hx, jac_samples=jac_samples, progress=progress,
                               name=name, calls=calls)[0]


def _recurrent_analysis(module: nn.Module, x: torch.Tensor, hx=None, *,
                        jac_samples: int | str = "auto", progress: Progress = _noop,
                        name: str = "", calls: int | None = None,
                        profile_seed: int | None = None):
    """(`recurrent_analysis`, the gradient profile of loss "last" at the module's input or
    None). The profile is asked for by `profile_seed` (the seed x was drawn with, for its
    config) for a batch-first module: it then comes from the state gradients' own backward
    (one more GEMM per layer), not from a forward and backward of its own."""
    spec = describe(module)
    batch_dim = 0 if (spec.batch_first or spec.is_cell) else 1
    time_dim = 1 - batch_dim if x.dim() == 3 else 0
    n = jacobian_samples_for(jac_samples, x.shape[time_dim], x.shape[batch_dim])
    xj = x.narrow(batch_dim, 0, n)  # Jacobians on the first n samples, same layout
    hj = narrow_state(hx, n)
    state = "c" if spec.kind == "lstm" else "h"
    layers = []
    # One replay per purpose, shared by the analyses: a graph-free one of the Jacobian samples,
    # one with a graph of the whole batch (gates and state gradients).
    with torch.no_grad():
        tr_j = replay(module, xj, hj)
    for layer in range(spec.num_layers):
        for d in range(spec.num_directions):
            progress(f"{name} layer {layer} dir {d}: Jacobians")
            cj = cell_jacobians(tr_j, layer=layer, direction=d, state=state, keep="norms")
            sj = step_jacobians(tr_j, layer=layer, direction=d, state=state, keep="norms")
            # a non-finite sample's exponent is reported, not averaged (mean_largest)
            lyap = lyapunov_spectrum(tr_j, layer=layer, direction=d, k=1)
            layers.append(LayerAnalysis(layer, d, cj.norms(), StepPaths.of(sj), lyap))
    want_profile = profile_seed is not None
    if want_profile and not (spec.batch_first and x.dim() == 3 and hx is None):
        raise ValueError("the shared gradient profile needs a batch-first module, a (B, T, I) "
                         "batch and no initial state")
    leaf = _as_leaf(x)
    if _streams(spec, x, batch_dim):
        # one graph over the whole batch would take GBs: the module forms stream over time
        tr = module
        args = (x, hx)
    else:
        with torch.enable_grad():
            tr = replay(module, leaf, hx)  # a graph even if no parameter needs one
        args = ()
    gates = None
    if spec.kind in RETAIN_GATE:
        progress(f"{name}: gate statistics")
        gates = gate_stats(tr, *args)
    prof = None
    if want_profile:
        progress(f"{name}: state gradients and gradient profile")
        if args:
            sg, dx = streamed_state_gradients(module, x, input_grad=True)
        else:
            sg, (dx,) = _trace_state_gradients_from_loss(tr, loss="last", keep="norms",
                                                         retain_graph=False, also=(leaf,))
        prof = profile_of_gradient(dx, [x], loss_name="last", seed=profile_seed)
    else:
        progress(f"{name}: state gradients")
        sg = state_gradients(tr, *args)
    return RecurrentAnalysis(spec.kind, spec.nonlinearity, spec.input_size, spec.hidden_size,
                             spec.proj_size, spec.num_layers, spec.num_directions, state, n,
                             tuple(layers), gates, sg,
                             hx_given=None if calls is None else hx is not None,
                             calls=calls), prof


def _streams(spec, x, batch_dim: int) -> bool:
    """gate_stats and state_gradients stream over time on this batch (`stream.large`)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not stream.streamable(spec):
        return False
    return stream.large(spec, x.shape[batch_dim], x.shape[1 - batch_dim])


def decay_analysis(module: nn.Module, x: torch.Tensor, *, jac_samples: int | str = "auto",
                   progress: Progress = _noop, name: str = "") -> RecurrentAnalysis:
    """`recurrent_analysis` for a decay recurrence (modern/protocol.py: minGRU, LRU, ...): one
    layer, closed forms; `linear_in_state` says whether the highway is the whole Jacobian."""
    spec = describe_decay(module)
    batch_dim = 0 if spec.batch_first else 1
    n = jacobian_samples_for(jac_samples, x.shape[1 - batch_dim], x.shape[batch_dim])
    xj = x.narrow(batch_dim, 0, n)
    progress(f"{name}: Jacobians")
    cj = cell_jacobians(module, xj, keep="norms")
    # one-step paths: free for a linear recurrence (diag(a), indirect 0); for sLSTM they are
    # (4H)² spectral norms per step that no report figure uses (those are the LSTM's)
    sj = step_jacobians(module, xj, keep="norms") if spec.linear else None
    lyap = lyapunov_spectrum(module, xj, k=1)
    layer = LayerAnalysis(0, 0, cj.norms(), None if sj is None else StepPaths.of(sj), lyap)
    progress(f"{name}: gate statistics")
    gates = gate_stats(module, x)
    progress(f"{name}: state gradients")
    sg = state_gradients(module, x)
    hidden = getattr(module, "hidden_size", None)
    return RecurrentAnalysis(spec.kind, None, getattr(module, "input_size", x.shape[-1]),
                             hidden if isinstance(hidden, int) else int(lyap.state_size),
                             0, 1, 1, spec.state, n, (layer,), gates, sg,
                             linear_in_state=spec.linear)


def check_compare_options(*, models, seq_len, hidden_size, input_size, samples, num_layers,
                          forget_init, seed, jac_samples) -> None:
    """Every option of `compare_study` in range and its memory estimate within what the
    machine has: checked before a model is built."""
    from .models import FORGET_INITS, MODEL_KINDS

    fn = "compare"
    if isinstance(models, str) or not models:
        raise ValueError(f"{fn}: models must be a non-empty tuple of kinds from "
                         f"{', '.join(MODEL_KINDS)}; got {models!r}")
    bad = [m for m in models if m not in MODEL_KINDS]
    if bad:
        raise ValueError(f"{fn}: unknown model kind(s) {bad}; choose from "
                         f"{', '.join(MODEL_KINDS)}")
    if forget_init not in FORGET_INITS:
        raise ValueError(f"{fn}: forget_init must be one of {', '.join(FORGET_INITS)}; got "
                         f"{forget_init!r}")
    for name, v in (("seq_len", seq_len), ("hidden_size", hidden_size),
                    ("input_size", input_size), ("samples", samples),
                    ("num_layers", num_layers)):
        check_number(fn, name, v, low=1, integer=True)
    _check_jacobian_samples(fn, jac_samples)
    check_number(fn, "seed", seed, low=0, integer=True)
    estimate = compare_bytes(models, seq_len=seq_len, hidden_size=hidden_size,
                             input_size=input_size, samples=samples, num_layers=num_layers,
                             jac_samples=jacobian_samples_for(jac_samples, seq_len, samples))
    check_memory(fn, estimate, f"{', '.join(models)} with T={seq_len}, H={hidden_size}, "
                 f"I={input_size}, {samples} samples, {num_layers} layer(s)",
                 "lower --seq-len, --samples, --hidden-size, --layers or --jacobian-samples, "
                 "or drop models (--models)")


def compare_study(*, models=("rnn", "lstm", "gru", "transformer"), seq_len: int = 100,
                  hidden_size: int = 128, input_size: int = 64, samples: int = 50,
                  num_layers: int = 1, forget_init: str = "default", seed: int = 0,
                  device: str = "cpu", jac_samples: int | str = "auto",
                  progress: Progress = _noop) -> StudyResult:
    """RNN vs LSTM vs GRU vs Transformer (and any of models.KINDS) on the same seeded inputs.

    `jac_samples`: how many of the samples the Jacobian analyses use; "auto" (default) is
    `jacobian_samples_for`: 4 up to T=250, then 1000 // T, at least 1. The number used is
    `config["jacobian_samples"]`."""
    t0 = time.perf_counter()
    check_compare_options(models=models, seq_len=seq_len, hidden_size=hidden_size,
                          input_size=input_size, samples=samples, num_layers=num_layers,
                          forget_init=forget_init, seed=seed, jac_samples=jac_samples)
    jac_samples = jacobian_samples_for(jac_samples, seq_len, samples)
    config = {"models": list(models), "seq_len": seq_len, "hidden_size": hidden_size,
              "input_size": input_size, "samples": samples, "num_layers": num_layers,
              "forget_init": forget_init, "seed": seed, "device": str(device),
              "jacobian_samples": jac_samples, "loss": "last"}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    built = {}
    for kind in models:
        m = build_model(kind, input_size, hidden_size, num_layers=num_layers,
                        forget_init=forget_init, t_max=seq_len, generator=gen)
        built[DISPLAY[kind]] = m.to(device).eval()
    # A fused recurrent module's profile comes from the backward its state gradients take
    # anyway (same inputs, same loss); the others are profiled by `compare`.
    shared = {name for name, m in built.items()
              if is_recurrent(m) and not describe(m).is_cell and describe(m).batch_first}
    others = {name: m for name, m in built.items() if name not in shared}
    profiles = {}
    if others:
        if "transformer" in models and seq_len > LONG_ATTENTION:
            # attention is the one O(T²) part of compare (in time; its memory is linear):
            # said, not silently dropped or shortened
            progress(f"gradient profiles (the Transformer's causal attention takes O(T²) "
                     f"time: at T={seq_len} it sets the time of this stage)")
        else:
            progress("gradient profiles")
        profiles.update(compare(others, seq_len=seq_len, samples=samples, seed=seed).profiles)
    x = random_inputs(next(iter(built.values())), seq_len=seq_len, samples=samples, seed=seed)
    recurrent = {}
    for name, m in built.items():
        if is_recurrent(m):
            recurrent[name], prof = _recurrent_analysis(
                m, x, jac_samples=jac_samples, progress=progress, name=name,
                profile_seed=seed if name in shared else None)
            if prof is not None:
                profiles[name] = prof
        elif is_decay_recurrence(m):
            recurrent[name] = decay_analysis(m, x, jac_samples=jac_samples, progress=progress,
                                             name=name)
    cmp = Comparison({name: profiles[name] for name in built})
    table = decay_table(DECAY_FORGET, DECAY_LENGTHS)
    return StudyResult("compare", config, versions(), cmp, recurrent, table,
                       round(time.perf_counter() - t0, 3))


def capture_recurrent_calls(call: ModelCall) -> dict:
    """Run the model once (no graph) and return name -> (module, [RecurrentCall]) for every
    recurrent submodule the forward calls, in call order. Hooks are removed on exit."""
    cap = Capture()
    with capturing(call.model, None, cap, grad_at_site=False), torch.no_grad():
        call()
    return {name: (cap.modules[name], calls) for name, calls in cap.recurrent.items()}


def _detached(hx):
    if isinstance(hx, tuple):
        return tuple(h.detach() for h in hx)
    return None if hx is None else hx.detach()


def recurrent_sequence(name: str, module: nn.Module, calls: list):
    """The whole input sequence and initial state a recurrent submodule received in one
    forward, in its own layout: one call as it was; calls that chain their state (a decoder
    stepping one token at a time, a cell in a loop) joined along time, from the first call's
    state. Returns (x, hx) or raises ValueError saying why it cannot be analysed."""
    axes = recurrent_axes(name, module, calls)  # refuses unchained repeated calls
    first = calls[0]
    if axes.layout != "steps":
        return first.x, _detached(first.hx)
    if isinstance(module, nn.RNNCellBase):
        xs = [c.x if c.x.dim() == 2 else c.x.unsqueeze(0) for c in calls]
        return torch.stack(xs, dim=1), _detached(first.hx)  # (B, T, I)
    dim = 0 if (first.x.dim() == 2 or not module.batch_first) else 1
    return torch.cat([c.x for c in calls], dim=dim), _detached(first.hx)


def _check_inspect(model, *, inputs, at, seq_len, samples, seed, jac_samples, input_size,
                   lag_positions) -> None:
    """`inspect_study`'s options, the model and its forward arguments, and (for drawn inputs)
    the memory estimate: all before any work."""
    fn = "inspect"
    for name, v in (("seq_len", seq_len), ("samples", samples)):
        check_number(fn, name, v, low=1, integer=True)
    _check_jacobian_samples(fn, jac_samples)
    check_number(fn, "seed", seed, low=0, integer=True)
    check_number(fn, "input_size", input_size, low=1, integer=True, allow_none=True)
    if not isinstance(lag_positions, (list, tuple)):
        check_number(fn, "lag_positions", lag_positions, low=1, integer=True)
    if inputs is None:
        check_model_call(fn, model, None, (), None, at)
        from .profile import model_input_size

        size = input_size if input_size is not None else model_input_size(model)
        if size is not None:
            check_memory(fn, model_bytes(model, samples=samples, seq_len=seq_len,
                                         input_size=size,
                                         jac_samples=jacobian_samples_for(
                                             jac_samples, seq_len, samples)),
                         f"{samples} drawn sequences of {seq_len} steps × {size} features "
                         f"for the {type(model).__name__}",
                         "lower --samples, --seq-len or --jacobian-samples")
        return
    fi = inputs if hasattr(inputs, "inputs") else None
    check_model_call(fn, model, fi.inputs if fi else inputs, fi.args if fi else (),
                     fi.kwargs if fi else None, at)


def inspect_study(model: nn.Module, *, inputs=None, at=None, loss="last",
                  time_dim: int | None = None, seq_len: int = 100, samples: int = 16,
                  seed: int = 0, jac_samples: int | str = "auto", label: str = "model",
                  source: str = "",
                  input_size: int | None = None, lag_positions: int = 16,
                  progress: Progress = _noop) -> StudyResult:
    """The same analysis for a user's model: its gradient profile (lag-resolved too when the
    loss is per step) and, for every recurrent submodule, per layer and direction, Jacobians,
    gates and state gradients on the inputs that submodule actually receives inside the model.

    `inputs` is a `loader.ForwardInputs` (the model's forward arguments), the model's first
    argument alone, or None, which draws
    seeded standard normal features of `input_size` (default: the model's own input size).
    `jac_samples` as in `compare_study`, resolved per recurrent submodule from the sequence
    length it receives (each analysis records the number it used).
    """
    t0 = time.perf_counter()
    _check_inspect(model, inputs=inputs, at=at, seq_len=seq_len, samples=samples, seed=seed,
                   jac_samples=jac_samples, input_size=input_size, lag_positions=lag_positions)
    progress("gradient profile")
    if inputs is None:
        x = random_inputs(model, seq_len=seq_len, samples=samples, seed=seed,
                          input_size=input_size)
        prof, call = profile_drawn(model_call(model, x), at=at, time_dim=time_dim, loss=loss,
                                   seed=seed, sized_by_model=input_size is None)
        given = False
    else:
        if not hasattr(inputs, "inputs"):  # a bare first argument (tensor, PackedSequence)
            from .loader import ForwardInputs
            inputs = ForwardInputs(inputs)
        call = model_call(model, inputs.inputs, inputs.args, inputs.kwargs)
        prof = gradient_profile(model, inputs.inputs, forward_args=inputs.args,
                                forward_kwargs=inputs.kwargs, at=at, time_dim=time_dim, loss=loss)
        given = True
    lag = None
    if loss != "last":
        progress("lag profile")
        try:
            lag = lag_profile(model, call.inputs, forward_args=call.args,
                              forward_kwargs=call.kwargs, at=at, time_dim=time_dim,
                              loss=None if loss == "all" else loss, positions=lag_positions,
                              seed=seed)
        except ValueError as e:  # e.g. a custom loss that returns per-sample losses only
            lag = Skipped(str(e))
    captured = capture_recurrent_calls(call)
    modules = {}
    for name, m in unwrap_model(model).named_modules():
        if not isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            continue
        key = name or type(m).__name__
        if key not in captured:
            modules[key] = Skipped("not called by the model's forward")
            continue
        try:
            x_m, hx = recurrent_sequence(key, *captured[key])
            modules[key] = recurrent_analysis(m, x_m, hx, jac_samples=jac_samples,
                                              progress=progress, name=key,
                                              calls=len(captured[key][1]))
        except (ValueError, TypeError) as e:
            modules[key] = Skipped(str(e))
    if not modules:
        modules["(none)"] = Skipped(f"{type(model).__name__} has no nn.RNN/LSTM/GRU "
                                    "submodule (a TorchScript model hides them): only the "
                                    "input-gradient profile was measured")
    config = {"model": label, "source": source, "seq_len": int(prof.per_sample.shape[1]),
              "samples": int(prof.per_sample.shape[0]), "seed": None if given else seed,
              "inputs": "given" if given else "seeded standard normal",
              "measured_at": prof.site, "jacobian_samples": jac_samples,
              "loss": loss if isinstance(loss, str) else "custom"}
    return StudyResult("inspect", config, versions(), Comparison({label: prof}), modules,
                       decay_table(DECAY_FORGET, DECAY_LENGTHS),
                       round(time.perf_counter() - t0, 3),
                       lag={} if lag is None else {label: lag})

