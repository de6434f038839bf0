"""Loading a user's model, weights, inputs, batches and losses for `rnnscope inspect`.

A model is code the user points at: `package.module:factory` or `path/to/file.py:factory`
(imported from the current directory), or a TorchScript archive. A batch function and a loss
function are code too, named the same way (`load_batch`, `load_loss`): the user asked for them to
run, as they asked for the model factory to run.

Weights and input tensors are data: they are read with
torch.load(path, map_location="cpu", weights_only=True), which refuses pickled objects that would
need arbitrary code to rebuild — such a file is rejected with a clear message, never executed.
Nothing in this module calls pickle.load or torch.load(weights_only=False).

Every file read as data (and a TorchScript archive) is first held against a size budget,
RNNSCOPE_MAX_LOAD_BYTES (default 2 GiB; a number of bytes or e.g. "500M", "8G"): its size on
disk, and, for the zip archives torch.save writes, the size its members inflate to, read from
the zip directory before anything is inflated. A small file that would expand to gigabytes (a
zip bomb) is refused at once with the numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pickle
import re
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

# Where checkpoints usually keep the model's state dict, in the order they are tried: Lightning
# and most training loops use "state_dict" or "model_state_dict"; DeepSpeed, fairseq, timm and
# hand-written loops use "model", "module", "net" or "network".
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")

_SHOWN = 5  # at most this many keys are listed in an error message

_INPUT_FORMS = ("a tensor (the model's first argument), a tuple/list of forward arguments "
                "(the input first) or a dict of keyword arguments")


class LoadError(ValueError):
    """A model, weights, inputs, batch or loss that cannot be used, with the reason."""


MAX_LOAD_ENV = "RNNSCOPE_MAX_LOAD_BYTES"
DEFAULT_MAX_LOAD_BYTES = 2 * 1024 ** 3  # 2 GiB: far above an RNN's weights or a batch
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def max_load_bytes() -> int:
    """The load budget in bytes: RNNSCOPE_MAX_LOAD_BYTES if set, else 2 GiB.

    The variable holds bytes ("3000000000") or a number with a binary unit ("500M", "1.5G",
    "8GiB"; K, M, G, T are powers of 1024).

    Raises:
        LoadError: the variable is set to something else than a positive size.
    """
    text = os.environ.get(MAX_LOAD_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_LOAD_BYTES
    found = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?", text, flags=re.IGNORECASE)
    value = float(found.group(1)) * _UNITS[found.group(2).upper()] if found else 0
    if not found or not 1 <= value < 2 ** 63:
        raise LoadError(f"{MAX_LOAD_ENV} must be a positive size such as 8G, 500M or "
                        f"3000000000 (bytes); got {text[:40]!r}")
    return int(value)


def _size(n: int) -> str:
    """A byte count for messages, e.g. "2.90 MiB (3040870 bytes)"."""
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"


def check_load_budget(path, what: str) -> None:
    """Refuse a file whose size on disk, or whose zip members once inflated, exceed the budget.

    The zip directory (what torch.save writes) lists each member's uncompressed size; it is
    read with zipfile, which inflates nothing, so a zip bomb is refused before torch.load
    would expand it in memory.

    Args:
        path: the file.
        what: "weights", "inputs" or "model", for the messages.

    Raises:
        LoadError: over the budget (the sizes and the budget are given, and how to raise it),
            or a zip archive whose directory cannot be read.
    """
    budget = max_load_bytes()
    raise_it = (f"if the file is trusted and the memory is there, raise the budget, e.g. "
                f"{MAX_LOAD_ENV}=8G")
    on_disk = os.path.getsize(path)
    if on_disk > budget:
        raise LoadError(f"{what} file {path} is {_size(on_disk)} on disk, more than the load "
                        f"budget of {_size(budget)}; {raise_it}")
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format: what is loaded is about what is on disk
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise LoadError(f"{what} file {path} is not a readable torch.save file (its zip "
                        f"directory is damaged)") from None
    inflated = sum(m.file_size for m in members)
    if inflated > budget:
        ratio = inflated / max(on_disk, 1)
        raise LoadError(f"{what} file {path} would inflate to {_size(inflated)} once loaded "
                        f"({len(members)} zip member(s), {_size(on_disk)} on disk: {ratio:.0f}x "
                        f"larger), more than the load budget of {_size(budget)}; refused "
                        f"before inflating anything. {raise_it[0].upper()}{raise_it[1:]}")


@dataclass(frozen=True)
class WeightsInfo:
    """Where load_weights found the weights, so a caller can tell the user.

    Attributes:
        key: the checkpoint key that held the state dict, e.g. "state_dict"; None when the file
            is a plain state dict.
        prefix: the leading key prefix that was removed so the keys fit the model, e.g.
            "module." (DataParallel/DDP), "_orig_mod." (torch.compile) or "model." (a Lightning
            module's attribute); None when the keys fitted as saved.
    """

    key: str | None = None
    prefix: str | None = None


@dataclass(frozen=True)
class ForwardInputs:
    """The arguments of one forward call: ``model(inputs, *args, **kwargs)``.

    Attributes:
        inputs: the model's first argument, the one whose gradients are measured: a tensor in
            the model's own layout, or a PackedSequence.
        args: the remaining positional arguments (e.g. an LSTM's initial state (h0, c0)).
        kwargs: keyword arguments.

    Example:
        >>> fi = ForwardInputs(torch.zeros(2, 3, dtype=torch.long), (None,), {"lengths": 3})
        >>> fi.to(dtype=torch.float64).inputs.dtype  # token ids are not floating: kept
        torch.int64
    """

    inputs: torch.Tensor | PackedSequence
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def to(self, device: torch.device | str | None = None, *,
           dtype: torch.dtype | None = None) -> ForwardInputs:
        """New ForwardInputs: every tensor moved to `device`, floating tensors cast to `dtype`.

        Only floating-point tensors are cast, as nn.Module.to(dtype) does with parameters:
        token ids, lengths and masks keep their integer or boolean types.
        """
        def move(obj):
            if isinstance(obj, PackedSequence):
                # its batch_sizes must stay on the CPU (pack_padded_sequence's contract); .to
                # moves only data and the index tensors
                obj = obj.to(device) if device is not None else obj
                if dtype is not None and obj.data.is_floating_point():
                    obj = obj.to(dtype)
                return obj
            if isinstance(obj, torch.Tensor):
                cast = dtype if dtype is not None and obj.is_floating_point() else None
                return obj.to(device=device, dtype=cast)
            if isinstance(obj, tuple):
                return tuple(move(o) for o in obj)
            if isinstance(obj, list):
                return [move(o) for o in obj]
            if isinstance(obj, dict):
                return {k: move(v) for k, v in obj.items()}
            return obj

        return ForwardInputs(move(self.inputs), move(self.args), move(self.kwargs))


# ---------------------------------------------------------------------------------------------
# Code the user points at: models, batch functions, loss functions


def load_model(spec: str, *, device: str = "cpu") -> nn.Module:
    """Build the user's model from `module:factory`, `file.py:factory` or a TorchScript file."""
    path = Path(spec)
    if path.is_file() and path.suffix != ".py":
        check_load_budget(path, "model")
        try:
            return torch.jit.load(str(path), map_location=device)
        except Exception as e:  # noqa: BLE001 - any failure means "not TorchScript"
            raise LoadError(f"{spec} is not a TorchScript archive ({type(e).__name__}: {e}). "
                            "A pickled nn.Module is not loaded (unpickling would execute code): "
                            "pass a factory as package.module:factory and its weights with "
                            "--weights") from None
    if ":" not in spec:
        if path.suffix in (".pt", ".pth", ".ts", ".zip") and not path.exists():
            raise LoadError(f"{spec} does not exist (MODEL is package.module:factory, "
                            "path/to/file.py:factory or a TorchScript file)")
        raise LoadError(f"MODEL must be package.module:factory, path/to/file.py:factory or a "
                        f"TorchScript file; got {spec!r}")
    factory = _resolve(spec, "factory", "model")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec} must be (or return) a torch.nn.Module; got "
                        f"{type(model).__name__}")
    from .checks import check_model

    check_model(f"the model from {spec}", model, grad=False)  # meta: refused before .to()
    return model.to(device)


def load_batch(spec: str, model: nn.Module | None = None) -> ForwardInputs:
    """Call the user's batch function and return its result as forward arguments.

    This runs the user's code on purpose, as load_model runs the model factory: `spec` names a
    function the user wrote to build a batch (reading their own dataset, tokenising, ...).
    Exceptions raised inside it propagate unchanged, so the user sees their own traceback.

    Args:
        spec: "path/to/file.py:fn" or "package.module:fn"; fn takes no arguments and returns
            what an inputs file may hold (see load_inputs).
        model: the model the batch is for; needed only when fn returns a dict, to know which
            entry is the model's first argument (see split_kwargs).

    Returns:
        The forward arguments.

    Raises:
        LoadError: the file or module cannot be found, has no such attribute, the attribute is
            not a function taking no arguments, or it returned something else than a tensor,
            a tuple/list or a dict of forward arguments.
    """
    fn = _resolve(spec, "function", "batch")
    if not callable(fn) or isinstance(fn, type):
        raise LoadError(f"{spec} must name a function that takes no arguments and returns a "
                        f"batch; it is {_describe(fn)}")
    _check_binds(fn, spec, (), "must take no arguments (rnnscope calls it as fn())")
    return _forward_inputs(fn(), model, f"{spec}() returned")


def load_loss(spec: str) -> Callable:
    """The user's loss function, named as "path/to/file.py:fn" or "package.module:fn".

    The loss receives whatever the model returns and returns per-sample (B,) or per-step
    (B, T) losses. Like load_batch, this imports (runs) the user's module on purpose.

    Args:
        spec: where the function is.

    Returns:
        The callable itself; it is not called here.

    Raises:
        LoadError: the file or module cannot be found, has no such attribute, or the attribute
            is not callable with one argument (a class is refused too: calling it would build
            an object, not compute a loss).
    """
    fn = _resolve(spec, "function", "loss")
    if isinstance(fn, type):
        raise LoadError(f"{spec} is a class; LOSS must name a function or an instance that "
                        f"takes the model's output, e.g. define `loss = {fn.__name__}()` in "
                        f"the file and pass ...:loss")
    if not callable(fn):
        raise LoadError(f"{spec} must name a function that takes the model's output and returns "
                        f"per-sample (B,) or per-step (B, T) losses; it is {_describe(fn)}")
    # an nn.Module's own signature is __call__(*args, **kwargs): its forward tells the truth
    _check_binds(fn.forward if isinstance(fn, nn.Module) else fn, spec, (None,),
                 "must take the model's output as its only required argument")
    return fn


def _resolve(spec: str, role: str, what: str):
    """The attribute `spec` ("target:attr") names; `role` and `what` word the errors."""
    if ":" not in spec:
        raise LoadError(f"{what} must be given as path/to/file.py:{role} or "
                        f"package.module:{role}; got {spec!r}")
    target, _, attr = spec.rpartition(":")
    if not attr.isidentifier():
        raise LoadError(f"{role} name after ':' must be a Python identifier; got {attr!r}")
    module = _import(target, what)
    obj = getattr(module, attr, None)
    if obj is None:
        raise LoadError(f"{target} has no attribute {attr!r}")
    return obj


def _import(target: str, what: str = "model"):
    if target.endswith(".py"):
        p = Path(target)
        if not p.is_file():
            raise LoadError(f"{what} file {target} does not exist")
        name = f"_rnnscope_user_{p.stem}"
        spec = importlib.util.spec_from_file_location(name, p)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(p.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            # a half-executed module must not be found by a later import of the same name
            sys.modules.pop(name, None)
            raise
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


def _check_binds(fn: Callable, spec: str, args: tuple, expectation: str) -> None:
    """LoadError unless fn(*args) would bind, so a wrong signature fails before any work."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and C extensions may have no signature: let the call decide
    try:
        sig.bind(*args)
    except TypeError:
        raise LoadError(f"{spec} {expectation}; its signature is {sig}") from None


# ---------------------------------------------------------------------------------------------
# Data the user points at: weights and inputs files (never executed)


def load_weights(model: nn.Module, path: str) -> WeightsInfo:
    """Load saved weights into `model`, in place, with every key and shape checked.

    Accepted files: a plain state dict (torch.save(model.state_dict(), path)), or a checkpoint
    dict holding one under one of STATE_DICT_KEYS (the first whose value is a dict of tensors).
    When the keys do not fit the model as saved, leading prefixes shared by every key are
    removed one component at a time ("module." from DataParallel/DDP, "_orig_mod." from
    torch.compile, "model." from a Lightning module whose network is `self.model`, or any
    other single `<name>.`), until the key set equals the model's. Loading stays strict: no
    key is dropped and none is left missing.

    Args:
        model: the model to fill.
        path: the torch.save file.

    Returns:
        Which checkpoint key held the weights and which prefix was removed.

    Raises:
        LoadError: the file is missing, unreadable, holds pickled objects (e.g. a whole model
            saved with torch.save(model)), holds no state dict, or its keys or shapes do not
            fit the model.
    """
    saved = _safe_load(path, "weights",
                       "Save the weights instead: torch.save(model.state_dict(), 'weights.pt')")
    state, key = _find_state_dict(saved, path)
    source = f"checkpoint key {key!r}" if key is not None else "a plain state dict"
    expected = model.state_dict()
    fitted, prefix = _fit_keys(state, list(expected))
    if fitted is None:
        raise LoadError(_mismatch(path, source, state, list(expected)))
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
             for k, v in fitted.items() if v.shape != expected[k].shape]
    if wrong:
        removed = f", after removing prefix {prefix!r}" if prefix else ""
        raise LoadError(f"{path} does not fit the model ({source}{removed}): {len(wrong)} "
                        f"shape mismatch(es): {_listing(wrong)}")
    try:
        model.load_state_dict(fitted, strict=True)
    except RuntimeError as e:  # keys and shapes agree, so this is rare (e.g. a custom hook)
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        raise LoadError(f"{path} does not fit the model ({source}): "
                        f"{' '.join(lines)[:300]}") from None
    return WeightsInfo(key, prefix)


def load_inputs(path: str, model: nn.Module | None = None) -> ForwardInputs:
    """Read the arguments of a forward call from a torch.save file.

    The file may hold:

    - a tensor: the model's first argument;
    - a tuple or list: positional arguments, the first being the input; the others may be
      tensors, None, numbers or tuples of tensors (e.g. an LSTM's (h0, c0));
    - a dict: keyword arguments; the entry named like the first parameter of model.forward is
      the input (see split_kwargs), so a dict needs `model`.

    The input may be a PackedSequence (torch.save(pack_padded_sequence(...))): that one torch
    class is allowed by the safe loader, since rebuilding it only stores tensors.

    Args:
        path: the torch.save file.
        model: the model the inputs are for; needed only when the file holds a dict.

    Returns:
        The forward arguments.

    Raises:
        LoadError: the file is missing, unreadable, holds pickled objects, or holds something
            else than the forms above.
    """
    obj = _safe_load(path, "inputs",
                     "Save tensors instead: torch.save(x, 'inputs.pt'), or a tuple or dict of "
                     "tensors", allow=(PackedSequence,))
    return _forward_inputs(obj, model, f"{path} holds")


def split_kwargs(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Separate the model's first argument from the other keyword arguments.

    The first argument is the one named like the first parameter of `model.forward` (read with
    inspect.signature, or from the schema of a TorchScript module).

    Example:
        >>> class Tagger(nn.Module):
        ...     def forward(self, tokens, hx=None):
        ...         return tokens
        >>> first, rest = split_kwargs(Tagger(), {"hx": None, "tokens": torch.zeros(2, 3)})
        >>> first.shape, rest
        (torch.Size([2, 3]), {'hx': None})

    Args:
        model: the model whose forward is called.
        kwargs: keyword arguments for it.

    Returns:
        (the first argument's value, the other keyword arguments).

    Raises:
        LoadError: forward's first parameter is not in `kwargs`, forward has no named first
            parameter, or `kwargs` holds names forward does not accept.
    """
    forward = f"{type(model).__name__}.forward"
    names, open_kwargs = _forward_parameters(model)
    if not names:
        raise LoadError(f"{forward} has no named first parameter, so a dict cannot say which "
                        f"entry is the input; use a tuple of positional arguments instead")
    first = names[0]
    if first not in kwargs:
        raise LoadError(f"the dict has no entry for {forward}'s first argument {first!r}; its "
                        f"keys are {_keys(kwargs)}")
    unknown = [k for k in kwargs if k not in names]
    if unknown and not open_kwargs:
        raise LoadError(f"the dict has keys {forward} does not accept: {_keys(unknown)}; its "
                        f"parameters are {list(names)}")
    return kwargs[first], {k: v for k, v in kwargs.items() if k != first}


def _forward_parameters(model: nn.Module) -> tuple[list[str], bool]:
    """(names forward accepts by keyword, in order; whether it also takes **kwargs)."""
    if isinstance(model, torch.jit.ScriptModule):
        # a ScriptMethod has no Python signature; its schema lists self first
        try:
            return [a.name for a in model.forward.schema.arguments[1:]], False
        except (AttributeError, RuntimeError) as e:
            raise LoadError(f"cannot read the parameters of {type(model).__name__}.forward "
                            f"({e}); save a tuple of positional arguments instead") from None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError) as e:
        raise LoadError(f"cannot read the parameters of {type(model).__name__}.forward ({e}); "
                        f"save a tuple of positional arguments instead") from None
    kinds = inspect.Parameter
    if not params or params[0].kind in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD):
        return [], any(p.kind is kinds.VAR_KEYWORD for p in params)
    # a positional-only first parameter is still the input: it is passed positionally
    names = [p.name for i, p in enumerate(params)
             if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
             or (i == 0 and p.kind is kinds.POSITIONAL_ONLY)]
    return names, any(p.kind is kinds.VAR_KEYWORD for p in params)


def _forward_inputs(obj: Any, model: nn.Module | None, origin: str) -> ForwardInputs:
    """ForwardInputs from what a file held or a batch function returned.

    `origin` begins the error messages, e.g. "x.pt holds" or "data.py:batch() returned".
    """
    # PackedSequence is a tuple (a NamedTuple): test it before the tuple case
    if isinstance(obj, (torch.Tensor, PackedSequence)):
        return ForwardInputs(obj)
    if isinstance(obj, (tuple, list)):
        if not obj:
            raise LoadError(f"{origin} an empty {type(obj).__name__}; expected the forward "
                            f"arguments, the input first")
        _check_input(obj[0], f"{origin} a {type(obj).__name__} whose first element is")
        return ForwardInputs(obj[0], tuple(obj[1:]), {})
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise LoadError(f"{origin} a dict whose keys are not all strings ({_keys(obj)}); "
                            f"a dict must map forward's parameter names to values")
        if model is None:
            raise LoadError(f"{origin} a dict of keyword arguments; which entry is the input "
                            f"depends on the model's forward signature, so pass the model")
        try:
            first, rest = split_kwargs(model, obj)
        except LoadError as e:  # say which file or function the dict came from
            raise LoadError(f"{origin} a dict of keyword arguments, but {e}") from None
        _check_input(first, f"{origin} a dict whose entry for the first argument is")
        return ForwardInputs(first, (), rest)
    raise LoadError(f"{origin} {_describe(obj)}; expected {_INPUT_FORMS}")


def _check_input(x: Any, origin: str) -> None:
    if not isinstance(x, (torch.Tensor, PackedSequence)):
        raise LoadError(f"{origin} {_describe(x)}; the model's first argument must be a tensor "
                        f"or a PackedSequence")


def _find_state_dict(saved: Any, path: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(the state dict, the checkpoint key that held it or None for a plain state dict)."""
    if not isinstance(saved, dict):
        raise LoadError(f"{path} must hold a state dict (name -> tensor) or a checkpoint dict "
                        f"holding one; it holds {_describe(saved)}")
    if _is_state_dict(saved):
        return saved, None
    for key in STATE_DICT_KEYS:
        if key in saved and _is_state_dict(saved[key]):
            return saved[key], key
    # name the usual keys that are there but hold something else: the likeliest confusion
    there = [f"{k!r} holds {_describe(saved[k])}" for k in STATE_DICT_KEYS if k in saved]
    note = f" ({'; '.join(there)})" if there else ""
    raise LoadError(f"{path} holds a dict that is neither a state dict (name -> tensor) nor a "
                    f"checkpoint with one under a usual key: its top-level keys are "
                    f"{_keys(saved)}; looked for {list(STATE_DICT_KEYS)}{note}")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _fit_keys(state: dict[str, torch.Tensor], expected: list[str]):
    """(the state dict with keys that equal `expected`, the prefix removed) or (None, None).

    Wrappers nest (DDP around a compiled model saves "module._orig_mod.<key>"), so shared
    leading components are removed one at a time, checking after each.
    """
    want = set(expected)
    if set(state) == want:
        return state, None
    for prefix, keys in _peeled(list(state)):
        if set(keys) == want:
            return dict(zip(keys, state.values())), prefix
    return None, None


def _peeled(keys: list[str]):
    """(prefix, keys without it) for each leading component shared by all keys, outermost first.

    E.g. ["module.rnn.w", "module.fc.b"] gives ("module.", ["rnn.w", "fc.b"]) and stops there,
    since "rnn" and "fc" differ.
    """
    prefix = ""
    while keys and all("." in k for k in keys) and len({k.split(".", 1)[0] for k in keys}) == 1:
        head = keys[0].split(".", 1)[0] + "."
        prefix += head
        keys = [k[len(head):] for k in keys]
        yield prefix, keys


def _mismatch(path: str, source: str, state: dict, expected: list[str]) -> str:
    """The error for keys that do not fit, shown for the reading of the keys closest to fit."""
    # candidate readings of the saved keys: as saved, after each shared prefix, and with one
    # prefix removed only where present (a Lightning module that also holds e.g. a loss with
    # a buffer saves "model.<key>" next to "criterion.weight")
    readings = [("", list(state))]
    readings += [(f"after removing prefix {p!r}", keys) for p, keys in _peeled(list(state))]
    for head in dict.fromkeys(k.split(".", 1)[0] + "." for k in state if "." in k):
        readings.append((f"after removing prefix {head!r} where present",
                         [k[len(head):] if k.startswith(head) else k for k in state]))
    want = set(expected)

    def distance(reading):
        got = set(reading[1])
        return len(want - got) + len(got - want)

    label, keys = min(readings, key=distance)  # min keeps the first of equals: as saved
    got = set(keys)
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in keys if k not in want]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    where = f"{source}, {label}" if label else source
    return f"{path} does not fit the model ({where}): {'; '.join(parts)}"


def _safe_load(path: str, what: str, fix: str, allow: Iterable[type] = ()):
    """torch.load(weights_only=True) with every failure turned into a one-line LoadError.

    Args:
        path: the file.
        what: "weights" or "inputs", for the messages.
        fix: what to save instead when the file holds pickled objects.
        allow: torch classes safe to rebuild (only tensors inside), added to torch's allowlist
            for this one load.
    """
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{what} file {path} does not exist")
    if not p.is_file():
        raise LoadError(f"{what} file {path} is not a file")
    if p.stat().st_size == 0:
        raise LoadError(f"{what} file {path} is empty (0 bytes); expected a file written by "
                        f"torch.save")
    check_load_budget(p, what)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allow)):
            # torch warns about pickle protocols it was not written with; the result (a load,
            # or the error below) is what the user needs, not the warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LoadError(_unpickling_message(path, what, fix, str(e))) from None
    except OSError as e:
        raise LoadError(f"cannot read {what} file {path}: {e.strerror or e}") from None
    except Exception:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError, ...
        # torch's own text here is about zip internals ("central directory", "miniz") or a
        # bare KeyError; it does not help the user, so it is not quoted
        raise LoadError(f"{what} file {path} is not a readable torch.save file (truncated, "
                        f"corrupted or another format)") from None


def _unpickling_message(path: str, what: str, fix: str, text: str) -> str:
    """One line for torch's multi-paragraph weights_only refusal."""
    # torch names the class it refused: "Unsupported global: GLOBAL __main__.Net was not an
    # allowed global" or "unsupported GLOBAL posix.system whose module posix is blocked"
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        name = found.group(1)
        kind = ("a whole pickled model (torch.save(model)) or another pickled object"
                if what == "weights" else "a pickled Python object")
        return (f"{path} holds {kind} (it refers to {name}); rnnscope refuses to unpickle "
                f"objects (it could execute code). {fix}")
    # other refusals ("Unsupported operand 149" for a plain pickle or a NumPy file): keep
    # torch's reason, which follows "WeightsUnpickler error:", and drop its advice to load
    # with weights_only=False
    _, marker, after = text.partition("WeightsUnpickler error:")
    reason = next((s.strip() for s in after.splitlines() if s.strip()), "") if marker else ""
    reason = reason[:120] or "unsupported content"
    return (f"{what} file {path} cannot be read safely ({reason}); rnnscope reads only "
            f"torch.save files of tensors, numbers, strings, lists, tuples and dicts")


# ---------------------------------------------------------------------------------------------
# Describing what was found, for messages


def _describe(obj: Any) -> str:
    """A short phrase for a value, e.g. "a Tensor of shape (3, 4)" or "a list of 2 items"."""
    if isinstance(obj, torch.Tensor):
        return f"a Tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"a dict with keys {_keys(obj)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    if obj is None:
        return "None"
    if isinstance(obj, (str, int, float, bool)):
        shown = repr(obj) if len(repr(obj)) <= 40 else repr(obj)[:37] + "..."
        return f"a {type(obj).__name__} ({shown})"
    return f"a {type(obj).__name__}"


def _keys(keys: Iterable) -> str:
    """At most a few keys, in order, then how many more."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:2 * _SHOWN])
    more = f", ... ({len(keys) - 2 * _SHOWN} more)" if len(keys) > 2 * _SHOWN else ""
    return f"[{shown}{more}]"


def _listing(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more
