"""Loading a user's model, weights and inputs for `rnnscope inspect`.

A model is code the user points at: `package.module:factory` or `path/to/file.py:factory`
(imported from the current directory), or a TorchScript archive. Weights and input tensors are
data: they are read with torch.load(weights_only=True), which refuses pickled objects that would
need arbitrary code to rebuild — such a file is rejected with a clear message, never executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
from pathlib import Path

import torch
from torch import nn


class LoadError(ValueError):
    """A model, weights or inputs file that cannot be used, with the reason."""


def load_model(spec: str, *, device: str = "cpu") -> nn.Module:
    """Build the user's model from `module:factory`, `file.py:factory` or a TorchScript file."""
    path = Path(spec)
    if path.is_file() and path.suffix != ".py":
        try:
            return torch.jit.load(str(path), map_location=device)
        except Exception as e:  # noqa: BLE001 - any failure means "not TorchScript"
            raise LoadError(f"{spec} is not a TorchScript archive ({type(e).__name__}: {e}). "
                            "A pickled nn.Module is not loaded (unpickling would execute code): "
                            "pass a factory as package.module:factory and its weights with "
                            "--weights") from None
    if ":" not in spec:
        raise LoadError(f"MODEL must be package.module:factory, path/to/file.py:factory or a "
                        f"TorchScript file; got {spec!r}")
    target, _, attr = spec.rpartition(":")
    if not attr.isidentifier():
        raise LoadError(f"factory name after ':' must be a Python identifier; got {attr!r}")
    module = _import(target)
    factory = getattr(module, attr, None)
    if factory is None:
        raise LoadError(f"{target} has no attribute {attr!r}")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec} must be (or return) a torch.nn.Module; got "
                        f"{type(model).__name__}")
    return model.to(device)


def _import(target: str):
    if target.endswith(".py"):
        p = Path(target)
        if not p.is_file():
            raise LoadError(f"model file {target} does not exist")
        name = f"_rnnscope_user_{p.stem}"
        spec = importlib.util.spec_from_file_location(name, p)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(p.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(p.parent.resolve()))
        return module
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        raise LoadError(f"cannot import {target!r} from the current directory: {e}") from None
    finally:
        sys.path.remove(str(Path.cwd()))


def _safe_load(path: str, what: str):
    if not Path(path).is_file():
        raise LoadError(f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise LoadError(f"{path} needs unpickling of arbitrary Python objects, which rnnscope "
                        f"refuses (it could execute code); save plain tensors instead, e.g. "
                        f"torch.save(model.state_dict(), ...). ({first})") from None
    except Exception as e:  # noqa: BLE001
        raise LoadError(f"cannot read {what} file {path}: {type(e).__name__}: {e}") from None


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict saved with torch.save(model.state_dict(), path); strict keys."""
    state = _safe_load(path, "weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path} must hold a state dict (name -> tensor); got "
                        f"{type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoadError(f"{path} does not fit the model: {str(e).splitlines()[0]} "
                        f"{' '.join(str(e).splitlines()[1:])[:300]}") from None


def load_inputs(path: str) -> torch.Tensor:
    """A tensor of inputs saved with torch.save(x, path), in the model's own layout."""
    x = _safe_load(path, "inputs")
    if not isinstance(x, torch.Tensor):
        raise LoadError(f"{path} must hold one tensor of inputs; got {type(x).__name__}")
    return x
