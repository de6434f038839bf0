"""End-to-end analyses behind the command line: each returns one JSON-safe results dict.

Everything a report shows is computed here, through the same public functions a user calls
(gradient_profile/compare, cell_jacobians, step_jacobians, lyapunov_spectrum, gate_stats,
state_gradients, decay_table), and stored as plain numbers; figures and HTML are drawn from the
dict alone, so a saved results.json re-plots to the same figures.
"""

from __future__ import annotations

import platform
import time
from typing import Callable

import torch
from torch import nn

from . import __version__
from .checks import narrow_state
from .gates import gate_stats
from .jacobians import cell_jacobians, lyapunov_spectrum, state_gradients, step_jacobians
from .models import DISPLAY, build_model
from .profile import compare, gradient_profile, is_time_major, random_inputs
from .recurrent import RETAIN_GATE, describe, is_recurrent
from .results import Comparison, json_list, json_number
from .theory import decay_table

Progress = Callable[[str], None]

DECAY_FORGET = (0.9, 0.95, 0.99, 0.999)
DECAY_LENGTHS = (100, 500, 1000)


def versions() -> dict:
    return {"rnnscope": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


def _noop(stage: str) -> None:
    pass


def _step_paths(sj) -> dict:
    s = sj.summary()
    return {"direct_mean": json_list(s["direct_mean"]) if "direct_mean" in s else None,
            "indirect_spectral": json_list(s["indirect_spectral"])}


def recurrent_analysis(module: nn.Module, x: torch.Tensor, hx=None, *, jac_samples: int,
                       progress: Progress = _noop, name: str = "") -> dict:
    """Per layer and direction: highway vs total Jacobians, one-step paths, largest Lyapunov
    exponent, gate statistics, total state gradients. x and hx in the module's own layout."""
    spec = describe(module)
    batch_dim = 0 if (spec.batch_first or spec.is_cell) else 1
    n = min(jac_samples, x.shape[batch_dim])
    xj = x.narrow(batch_dim, 0, n)  # Jacobians on the first n samples, same layout
    hj = narrow_state(hx, n)
    state = "c" if spec.kind == "lstm" else "h"
    out = {"kind": spec.kind, "nonlinearity": spec.nonlinearity, "input_size": spec.input_size,
           "hidden_size": spec.hidden_size, "proj_size": spec.proj_size,
           "num_layers": spec.num_layers, "num_directions": spec.num_directions,
           "state": state, "jacobian_samples": n,
           "layers": []}
    for layer in range(spec.num_layers):
        for d in range(spec.num_directions):
            progress(f"{name} layer {layer} dir {d}: Jacobians")
            cj = cell_jacobians(module, xj, hj, layer=layer, direction=d, state=state,
                                keep="norms")
            sj = step_jacobians(module, xj, hj, layer=layer, direction=d, state=state)
            lyap = lyapunov_spectrum(module, xj, hj, layer=layer, direction=d, k=1)
            out["layers"].append({"layer": layer, "direction": d,
                                  "cell_jacobians": cj.to_dict(), "step_paths": _step_paths(sj),
                                  "max_lyapunov": json_number(lyap.mean().item())})
    if spec.kind in RETAIN_GATE:
        progress(f"{name}: gate statistics")
        out["gates"] = gate_stats(module, x, hx).to_dict()
    progress(f"{name}: state gradients")
    sg = state_gradients(module, x, hx)
    out["state_gradients"] = sg.to_dict()
    return out


def compare_study(*, models=("rnn", "lstm", "gru", "transformer"), seq_len: int = 100,
                  hidden_size: int = 128, input_size: int = 64, samples: int = 50,
                  num_layers: int = 1, forget_init: str = "default", seed: int = 0,
                  device: str = "cpu", jac_samples: int = 4,
                  progress: Progress = _noop) -> dict:
    """RNN vs LSTM vs GRU vs Transformer on the same seeded inputs."""
    t0 = time.perf_counter()
    config = {"models": list(models), "seq_len": seq_len, "hidden_size": hidden_size,
              "input_size": input_size, "samples": samples, "num_layers": num_layers,
              "forget_init": forget_init, "seed": seed, "device": str(device),
              "jacobian_samples": jac_samples, "loss": "last"}
    if not models:
        raise ValueError("at least one model kind is needed")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    built = {}
    for kind in models:
        m = build_model(kind, input_size, hidden_size, num_layers=num_layers,
                        forget_init=forget_init, t_max=seq_len, generator=gen)
        built[DISPLAY[kind]] = m.to(device).eval()
    progress("gradient profiles")
    cmp = compare(built, seq_len=seq_len, samples=samples, seed=seed)
    x = random_inputs(next(iter(built.values())), seq_len=seq_len, samples=samples, seed=seed)
    recurrent = {}
    for name, m in built.items():
        if is_recurrent(m):
            recurrent[name] = recurrent_analysis(m, x, jac_samples=jac_samples,
                                                 progress=progress, name=name)
    table = decay_table(DECAY_FORGET, DECAY_LENGTHS)
    return {"command": "compare", "config": config, "versions": versions(),
            "comparison": cmp.to_dict(), "recurrent": recurrent,
            "decay_table": table.to_dict(),
            "seconds": round(time.perf_counter() - t0, 3)}


def _capture_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    """Run the model once and record what each recurrent submodule received.

    Forward pre-hooks are held as handles and removed in `finally`, also on error.
    """
    seen = {}
    handles = []
    for name, m in model.named_modules():
        if is_recurrent(m):
            def hook(mod, args, kwargs, name=name):
                if name not in seen:
                    hx = args[1] if len(args) > 1 else kwargs.get("hx")
                    if isinstance(hx, tuple):
                        hx = tuple(h.detach() for h in hx)
                    elif hx is not None:
                        hx = hx.detach()
                    seen[name] = (args[0].detach(), hx)
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def inspect_study(model: nn.Module, *, inputs: torch.Tensor | None = None, seq_len: int = 100,
                  samples: int = 16, seed: int = 0, jac_samples: int = 4, label: str = "model",
                  source: str = "", input_size: int | None = None,
                  progress: Progress = _noop) -> dict:
    """The same analysis for a user's model: its input-gradient profile, and for every
    recurrent submodule (found by type), per layer and direction, Jacobians, gates and state
    gradients on the inputs that submodule actually receives inside the model.

    `inputs` are in the model's own layout; None draws seeded standard normal inputs of
    `input_size` features (default: the model's own input size).
    """
    t0 = time.perf_counter()
    if inputs is None:
        x = random_inputs(model, seq_len=seq_len, samples=samples, seed=seed,
                          input_size=input_size)
        inputs = x.transpose(0, 1) if is_time_major(model) else x
        given = False
    else:
        given = True
    progress("gradient profile")
    prof = gradient_profile(model, inputs)
    captured = _capture_inputs(model, inputs)
    modules = {}
    for name, m in model.named_modules():
        if not is_recurrent(m):
            continue
        key = name or "(model)"
        if name not in captured:
            modules[key] = {"skipped": "not called by the model's forward"}
        elif describe(m).is_cell:
            modules[key] = {"skipped": "a cell called step by step inside the model; analyse "
                            "it with rnnscope.cell_jacobians on a (B, T, I) sequence"}
        else:
            x_m, hx = captured[name]  # what the submodule really received, initial state too
            modules[key] = recurrent_analysis(m, x_m, hx, jac_samples=jac_samples,
                                              progress=progress, name=key)
            modules[key]["hx_given"] = hx is not None
    if not modules:
        modules["(none)"] = {"skipped": f"{type(model).__name__} has no nn.RNN/LSTM/GRU "
                             "submodule (a TorchScript model hides them): only the input-"
                             "gradient profile was measured"}
    config = {"model": label, "source": source, "seq_len": int(prof.per_sample.shape[1]),
              "samples": int(prof.per_sample.shape[0]), "seed": None if given else seed,
              "inputs": "given" if given else "seeded standard normal",
              "jacobian_samples": jac_samples, "loss": "last"}
    return {"command": "inspect", "config": config, "versions": versions(),
            "comparison": Comparison({label: prof}).to_dict(),
            "recurrent": modules,
            "decay_table": decay_table(DECAY_FORGET, DECAY_LENGTHS).to_dict(),
            "seconds": round(time.perf_counter() - t0, 3)}
