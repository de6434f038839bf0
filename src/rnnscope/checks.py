"""Input validation shared by every public entry point: clear errors naming given vs expected.

The one validation layer (issue: hardening). Every public function is wrapped by `public`,
which, before any work:

- refuses torch.inference_mode() where gradients are taken (torch.no_grad() is fine: rnnscope
  enables grad itself) and inference tensors that cannot be differentiated;
- checks the model: an nn.Module, not on the meta device, not a layer that cannot read a
  (B, T, I) or (T, B, I) sequence (convolutions), a forward that accepts the arguments given;
- checks every tensor argument: real floating point (complex is refused, never silently
  cast), token ids only where the model embeds them, no meta tensors, one device and one
  floating dtype with the model's parameters, no empty dimension;

and names the function in front of every error it lets through (rnnscope's own errors, and a
model's failure wrapped with what rnnscope gave it). Option values are checked with
`check_number` (finite, in range, bool is not a number). Memory estimates live in `budget`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import os
import traceback
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .modern.protocol import is_decay_recurrence
from .recurrent import RecurrentSpec
from .site import unwrap_model

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The name of the outermost public function running (None outside rnnscope): nested public
# calls (compare -> gradient_profile) leave the error naming to the one the user called.
_ENTRY: contextvars.ContextVar = contextvars.ContextVar("rnnscope_entry", default=None)


def _layout(spec: RecurrentSpec) -> str:
    return "B, T, I" if spec.batch_first or spec.is_cell else "T, B, I"


def check_inputs(spec: RecurrentSpec, inputs) -> tuple[torch.Tensor, bool]:
    """Validate a module's input sequence and return it batch-major (B, T, I), plus `unbatched`.

    Accepts the module's own layout ((B, T, I) with batch_first, else (T, B, I); cells take
    (B, T, I)) or an unbatched (T, I) sequence.
    """
    name = type(spec.module).__name__
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor; got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor (float32 or float64); got "
                        f"dtype {inputs.dtype}")
    want = f"({_layout(spec)}={spec.input_size})"
    if inputs.dim() not in (2, 3) or inputs.shape[-1] != spec.input_size:
        bf = "" if spec.is_cell else f", batch_first={spec.batch_first}"
        raise ValueError(f"inputs must be {want} or unbatched (T, I={spec.input_size}) for this "
                         f"{name}{bf}; got {tuple(inputs.shape)}")
    unbatched = inputs.dim() == 2
    x = inputs.unsqueeze(0) if unbatched else (
        inputs if spec.batch_first or spec.is_cell else inputs.transpose(0, 1))
    B, T = x.shape[0], x.shape[1]
    if T == 0:
        raise ValueError(f"inputs have an empty time dimension (T=0); got {tuple(inputs.shape)}")
    if B == 0:
        raise ValueError(f"inputs have an empty batch dimension (B=0); got {tuple(inputs.shape)}")
    _check_dtype_device(spec, inputs, "inputs")
    return x, unbatched


def check_packed(spec: RecurrentSpec, packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a PackedSequence for a fused module and unpack it.

    Returns x (B, T, I) batch-major in the batch's ORIGINAL order (PyTorch's kernel sorts the
    batch internally with sorted_indices; hx and h_n stay in the original order), zero at
    padded positions, differentiable w.r.t. packed.data; lengths (B,) int64 on the CPU, in
    the original order; and rows (N,), the flat (B·T) position of each packed row (see
    `packed_layout`). T is the longest length (len(batch_sizes)).
    """
    name = type(spec.module).__name__
    if spec.is_cell:
        raise TypeError(f"a {name} takes one step per call and cannot take a PackedSequence; "
                        "pass a (B, T, I) tensor (or use nn.RNN/nn.LSTM/nn.GRU)")
    data, batch_sizes = packed.data, packed.batch_sizes
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise TypeError(f"the PackedSequence's data must be a floating-point tensor; got "
                        f"{getattr(data, 'dtype', type(data).__name__)}")
    if data.dim() != 2 or data.shape[-1] != spec.input_size:
        raise ValueError(f"the PackedSequence's data must be (N, I={spec.input_size}) for this "
                         f"{name}; got {tuple(data.shape)}")
    if (not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dim() != 1
            or batch_sizes.numel() == 0 or batch_sizes.dtype != torch.int64):
        raise ValueError("the PackedSequence's batch_sizes must be a non-empty 1-D int64 tensor "
                         "(build it with torch.nn.utils.rnn.pack_padded_sequence or pack_sequence)")
    bs = batch_sizes.cpu()
    if int(bs.sum()) != data.shape[0] or bool((bs[1:] > bs[:-1]).any()) or int(bs[-1]) < 1:
        raise ValueError(f"the PackedSequence is malformed: batch_sizes {bs.tolist()} must be "
                         f"positive, non-increasing and sum to N={data.shape[0]}")
    _check_dtype_device(spec, data, "the PackedSequence's data")
    B, T = int(bs[0]), bs.numel()
    rows, lengths = packed_layout(bs, packed.sorted_indices)
    x = data.new_zeros(B * T, data.shape[-1]).index_copy(0, rows.to(data.device), data)
    return x.view(B, T, -1), lengths, rows


def packed_layout(batch_sizes: torch.Tensor, sorted_indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of a packed `data` tensor lives in a batch-major (B, T) grid.

    Returns rows (N,) int64, the flat index b·T + t (b in the original batch order) of packed row
    n, and lengths (B,) int64 in the original order. Packed rows are time-major: for each t, the
    first batch_sizes[t] samples in sorted order (sorted_indices[j] is the original index of
    sorted sample j; None means the batch is already sorted).
    """
    bs = batch_sizes.cpu()
    B, T = int(bs[0]), bs.numel()
    order = (torch.arange(B) if sorted_indices is None
             else sorted_indices.cpu().to(torch.int64))
    if order.shape != (B,) or not torch.equal(order.sort().values, torch.arange(B)):
        raise ValueError(f"the PackedSequence's sorted_indices must be a permutation of "
                         f"range({B}); got {order.tolist()}")
    t_of = torch.repeat_interleave(torch.arange(T), bs)  # (N,) time of each packed row
    j_of = torch.arange(int(bs.sum())) - torch.repeat_interleave(bs.cumsum(0) - bs, bs)
    rows = order[j_of] * T + t_of
    sorted_lengths = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)  # (B,) sorted
    lengths = torch.empty(B, dtype=torch.int64)
    lengths[order] = sorted_lengths
    return rows, lengths


def _check_dtype_device(spec: RecurrentSpec, t: torch.Tensor, what: str) -> None:
    name = type(spec.module).__name__
    p = next(spec.module.parameters())
    if p.is_meta or t.is_meta:
        who = f"the {name}'s parameters are" if p.is_meta else f"{what} are"
        raise ValueError(f"{who} on the meta device (shapes only, no values); "
                         f"{_META_FIX if p.is_meta else 'pass real data'}")
    if t.dtype != p.dtype:
        raise TypeError(f"{what} are {t.dtype} but the {name}'s parameters are {p.dtype}; "
                        f"convert one of them (e.g. module.to({t.dtype}))")
    if t.device != p.device:
        raise ValueError(f"{what} are on {t.device} but the {name}'s parameters are on "
                         f"{p.device}")


def check_initial_state(spec: RecurrentSpec, hx, batch: int, unbatched: bool, like: torch.Tensor):
    """Return initial states as lists [l*D + d] of (B, H_out) h0 and (B, H) c0 (None for non-LSTM).

    hx follows the module's own convention: (L·D, B, H_out) — or (L·D, H_out) unbatched — and a
    tuple (h0, c0) for LSTM; cells take (B, H) or (h, c).
    """
    LD = spec.num_layers * spec.num_directions
    name = type(spec.module).__name__
    zeros_h = like.new_zeros(batch, spec.hidden_out)
    zeros_c = like.new_zeros(batch, spec.hidden_size) if spec.has_cell_state else None
    if hx is None:
        return [zeros_h] * LD, [zeros_c] * LD
    if spec.has_cell_state:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            got = (f"a {type(hx).__name__} of {len(hx)}" if isinstance(hx, (tuple, list))
                   else f"a {type(hx).__name__}")
            raise TypeError(f"hx for an {name} must be a tuple of two tensors (h0, c0); got "
                            f"{got}")
        h0, c0 = hx
    else:
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx for an {name} must be a tensor; got {type(hx).__name__}")
        h0, c0 = hx, None

    def fix(t, size, what):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} for this {name} must be a tensor; got "
                            f"{type(t).__name__} (pass hx=None for zero initial states)")
        if spec.is_cell:
            want = (size,) if unbatched else (batch, size)
            if tuple(t.shape) != want:
                raise ValueError(f"{what} must have shape {want} for this {name}; got "
                                 f"{tuple(t.shape)}")
            return [t.reshape(batch, size)]
        want = (LD, size) if unbatched else (LD, batch, size)
        if tuple(t.shape) != want:
            raise ValueError(f"{what} must have shape {want} (L·D, {'' if unbatched else 'B, '}"
                             f"{'H_out' if what == 'h0' else 'H'}) for this {name}; got "
                             f"{tuple(t.shape)}")
        if t.dtype != like.dtype:
            raise TypeError(f"{what} is {t.dtype} but inputs are {like.dtype}")
        t = t.reshape(LD, batch, size)
        return list(t.unbind(0))

    hs = fix(h0, spec.hidden_out, "h0")
    cs = fix(c0, spec.hidden_size, "c0") if spec.has_cell_state else [None] * LD
    return hs, cs


def count_nonfinite(t: torch.Tensor | None) -> int:
    """Number of NaN/Inf entries (0 for None)."""
    if t is None:
        return 0
    return int((~torch.isfinite(t)).sum().item())


def narrow_state(hx, n: int, *, dim: int = 1, clone: bool = False):
    """The first n samples of an initial state — (L·D, B, ·) tensors, batch on `dim`, or a
    tuple of them — detached (and copied with `clone`). None stays None."""
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(narrow_state(h, n, dim=dim, clone=clone) for h in hx)
    out = hx.detach()
    if out.dim() > dim:
        out = out.narrow(dim, 0, n)
    return out.clone() if clone else out


# ---------------------------------------------------------------------------------------------
# The validation layer every public entry point goes through

_META_FIX = ("materialise the model first, e.g. model.to_empty(device='cpu') and then "
             "model.load_state_dict(...)")


def current_entry(default: str = "rnnscope") -> str:
    """The public function the user called (for messages of shared helpers)."""
    return _ENTRY.get() or default


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '≥'} {low}"
    if high is not None:
        return f"{'<' if high_open else '≤'} {high}"
    return ""


def check_number(fn: str, name: str, value, *, low=None, high=None, low_open: bool = False,
                 high_open: bool = False, integer: bool = False, allow_none: bool = False,
                 hint: str = ""):
    """Return `value` if it is a finite real number (an int with `integer`) in the range;
    otherwise raise one line naming the function, the option, the range and what was given.

    bool is not accepted as a number (True would silently mean 1); NaN and ±inf are refused.
    """
    import numbers

    if value is None and allow_none:
        return None
    kind = "an int" if integer else "a finite number"
    rng = _range_text(low, high, low_open, high_open)
    if integer and high is None and not low_open and low in (0, 1):
        kind, rng = ("a positive int" if low == 1 else "a non-negative int"), ""
    want = f"{kind} {rng}".strip() + (" or None" if allow_none else "")
    tail = f"; {hint}" if hint else ""
    wanted_type = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted_type):
        raise TypeError(f"{fn}: {name} must be {want}; got {type(value).__name__} "
                        f"{value!r}{tail}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be {want}; got {value!r}{tail}")
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        raise ValueError(f"{fn}: {name} must be {want}; got {value!r}{tail}")
    return value


def check_grad_mode(fn: str) -> None:
    """Refuse torch.inference_mode() for functions that differentiate. torch.no_grad() is fine:
    they enable grad themselves around their own forward and backward."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{fn}: cannot run under torch.inference_mode(), which records no "
                           "graph to differentiate; call it outside the inference_mode block "
                           "(inside torch.no_grad() is fine)")


def _tensors(obj, what: str):
    """(description, tensor) for every tensor in nested tuples/lists/dicts/PackedSequences."""
    if isinstance(obj, PackedSequence):
        yield f"{what} (a PackedSequence's data)", obj.data
    elif isinstance(obj, torch.Tensor):
        yield what, obj
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            yield from _tensors(o, f"{what}[{i}]")
    elif isinstance(obj, dict):
        for k, o in obj.items():
            yield from _tensors(o, f"{what}[{k!r}]")


def _model_dtype_device(model: nn.Module):
    """(dtype, device) of the model's floating parameters when they share one, else None
    for whichever is mixed (a model split across devices or dtypes is not second-guessed)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in model.parameters()}
    return (dtypes.pop() if len(dtypes) == 1 else None,
            devices.pop() if len(devices) == 1 else None)


def check_model(fn: str, model, *, grad: bool, what: str = "model") -> None:
    """An nn.Module with real (not meta) parameters; with `grad`, not inference tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: {what} must be a torch.nn.Module; got {type(model).__name__}")
    name = type(model).__name__
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise ValueError(f"{fn}: the {name}'s parameters are on the meta device (shapes only, "
                         f"no values); {_META_FIX}")
    if grad and any(t.is_inference() for t in tensors):
        raise RuntimeError(f"{fn}: the {name}'s parameters were created under "
                           "torch.inference_mode() and cannot take part in a backward; build "
                           "or load the model outside inference_mode")


def _check_tensor_args(fn: str, model: nn.Module, named: list, *, grad: bool) -> None:
    """Meta, complex, inference, device and floating-dtype checks of tensor arguments against
    the model. `named` is [(description, object)]; the device of non-floating tensors is not
    checked (lengths for pack_padded_sequence live on the CPU by contract)."""
    name = type(model).__name__
    dtype, device = _model_dtype_device(model)
    bare = isinstance(model, (nn.RNNBase, nn.RNNCellBase))
    for top, obj in named:
        for what, t in _tensors(obj, top):
            if t.is_meta:
                raise ValueError(f"{fn}: {what} is a meta tensor (a shape with no values); "
                                 "pass real data")
            # a decay recurrence's state may be complex (the LRU's); it checks its own hx
            if t.is_complex() and not (top == "hx" and is_decay_recurrence(model)):
                raise TypeError(f"{fn}: {what} has complex dtype {t.dtype}; rnnscope measures "
                                "real-valued gradients and does not drop imaginary parts: pass "
                                "real features, e.g. torch.view_as_real(x).flatten(-2)")
            if grad and t.is_inference():
                raise RuntimeError(f"{fn}: {what} was created under torch.inference_mode() "
                                   "and cannot be differentiated; create it outside "
                                   "inference_mode (x.clone() outside it makes a normal copy)")
            floating = t.is_floating_point()
            if device is not None and t.device != device and (floating or top == "inputs"):
                raise ValueError(f"{fn}: {what} is on {t.device} but the {name}'s parameters "
                                 f"are on {device}; move one of them to the other's device")
            # A wrapper may cast its inputs itself (x.float(), autocast); only a bare
            # recurrent module or cell is known to need its parameters' dtype.
            if floating and dtype is not None and t.dtype != dtype and bare:
                it = top if top == "inputs" else "that tensor"
                raise TypeError(f"{fn}: {what} has dtype {t.dtype} but the {name}'s parameters "
                                f"are {dtype}; convert one of them ({it}.to({dtype}) or "
                                f"model.to({t.dtype}))")


def _check_empty(fn: str, inputs) -> None:
    x = inputs.data if isinstance(inputs, PackedSequence) else inputs
    if isinstance(x, torch.Tensor) and (x.dim() == 0 or 0 in x.shape):
        raise ValueError(f"{fn}: inputs have shape {tuple(x.shape)}: an empty (or missing) "
                         "batch or time dimension; pass at least one sample and one step")


def check_recurrent_features(fn: str, model: nn.Module, inputs) -> None:
    """A recurrent module measured directly gets its feature size checked up front, with a
    message that names its layout (torch's own error does not say which layout it expects)."""
    if not isinstance(model, (nn.RNNBase, nn.RNNCellBase)) or not isinstance(inputs, torch.Tensor):
        return
    cell = isinstance(model, nn.RNNCellBase)
    layout = "(B, T, I)" if cell or model.batch_first else "(T, B, I)"
    if cell and inputs.dim() == 2:
        # A cell reads (B, I) as one step of B samples: there is no time axis to profile, and
        # the profile would report the I features as if they were steps.
        raise ValueError(f"{fn}: a {type(model).__name__} given 2-D inputs "
                         f"{tuple(inputs.shape)} would take them as one step (B, I), with no "
                         f"time dimension; pass a (B, T, I={model.input_size}) sequence "
                         "(x.unsqueeze(0) for one unbatched (T, I) sequence)")
    if inputs.dim() not in (2, 3) or inputs.shape[-1] != model.input_size:
        bf = "" if cell else f", batch_first={model.batch_first}"
        raise ValueError(f"{fn}: inputs must be {layout} with I={model.input_size} (or "
                         f"unbatched (T, I)) for this {type(model).__name__}{bf}; got "
                         f"{tuple(inputs.shape)}")


def _has_recurrent(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in model.modules())


def _check_first_input_kind(fn: str, model: nn.Module, inputs, at) -> None:
    """Token ids only where the model takes them (an embedding); bool never as the input."""
    x = inputs.data if isinstance(inputs, PackedSequence) else inputs
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex():
        return
    name = type(model).__name__
    if isinstance(model, (nn.RNNBase, nn.RNNCellBase)):
        raise TypeError(f"{fn}: inputs are {x.dtype} but a {name} takes floating-point "
                        f"features; pass x.float() (token ids need an nn.Embedding in front)")
    if at is not None or isinstance(model, torch.jit.ScriptModule):
        return  # the user named the site; a TorchScript model hides its submodules
    embeds = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
    if x.dtype == torch.bool or not embeds:
        raise TypeError(f"{fn}: inputs are {x.dtype}, which is not differentiable, and the "
                        f"{name} has no nn.Embedding to take them as token ids; pass "
                        "floating-point features, or at='<submodule>' naming the submodule "
                        "whose floating-point input should be measured")


def _check_supported(fn: str, model: nn.Module, n_args: int, kwargs: dict) -> None:
    """Refuse, before running it, a model rnnscope cannot call with a sequence: a convolution
    (time on its last dimension) or a forward that needs more arguments than were given
    (nn.Transformer needs src and tgt)."""
    name = type(model).__name__
    if isinstance(model, nn.modules.conv._ConvNd):
        raise TypeError(f"{fn}: a {name} reads (B, C, L) with the sequence on its last "
                        "dimension; rnnscope measures models whose forward takes a sequence "
                        "with time on dimension 0 or 1 ((B, T, I) or (T, B, I)): wrap it in a "
                        "module that calls it on x.transpose(1, 2)")
    if isinstance(model, torch.jit.ScriptModule):
        return
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*([None] * n_args), **kwargs)
    except TypeError as e:
        required = [p.name for p in sig.parameters.values() if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        params = ", ".join(required + (["..."] if len(required) < len(sig.parameters) else []))
        rec = "" if _has_recurrent(model) else (f" (the {name} has no nn.RNN/LSTM/GRU "
                                                "submodule either)")
        raise TypeError(f"{fn}: the {name}'s forward({params}) cannot be called as "
                        f"model(inputs, *forward_args, **forward_kwargs) with what was given "
                        f"({e}){rec}; pass its other arguments with forward_args=/"
                        "forward_kwargs= (rnnscope inspect: --inputs holding a tuple or dict, "
                        "or --batch)") from None


def check_model_call(fn: str, model, inputs, forward_args=(), forward_kwargs=None, at=None, *,
                     grad: bool = True) -> None:
    """Everything about `model(inputs, *forward_args, **forward_kwargs)` that can be checked
    without running it. inputs None means rnnscope draws them (checked by `budget`)."""
    check_model(fn, model, grad=grad, what="module")  # the public functions' first argument
    inner = unwrap_model(model)
    check_model(fn, inner, grad=grad)
    args = forward_args if isinstance(forward_args, (tuple, list)) else ()
    kwargs = forward_kwargs if isinstance(forward_kwargs, dict) else {}
    _check_supported(fn, inner, 1 + len(args), kwargs)
    named = [("forward_args", args), ("forward_kwargs", kwargs)]
    if inputs is not None:
        if not isinstance(inputs, (torch.Tensor, PackedSequence)):
            raise TypeError(f"{fn}: inputs must be a torch.Tensor (features or token ids) or a "
                            f"PackedSequence; got {type(inputs).__name__}")
        named.insert(0, ("inputs", inputs))
    _check_tensor_args(fn, inner, named, grad=grad)
    if inputs is not None:
        _check_empty(fn, inputs)
        _check_first_input_kind(fn, inner, inputs, at)
        check_recurrent_features(fn, inner, inputs)


def check_module_call(fn: str, module, inputs, hx=None, *, grad: bool = False) -> None:
    """The same for the functions taking a recurrent module (or a custom cell), inputs and hx
    (shapes and layouts are then checked by `check_inputs` / `check_initial_state`)."""
    check_model(fn, module, grad=grad, what="module")
    if inputs is None:
        return
    if not isinstance(inputs, (torch.Tensor, PackedSequence)):
        raise TypeError(f"{fn}: inputs must be a torch.Tensor (B, T, I) or a PackedSequence; "
                        f"got {type(inputs).__name__}")
    _check_tensor_args(fn, module, [("inputs", inputs), ("hx", hx)], grad=grad)
    x = inputs.data if isinstance(inputs, PackedSequence) else inputs
    if not x.is_floating_point():
        raise TypeError(f"{fn}: inputs must be floating-point features; got {x.dtype} (token "
                        "ids: measure the model around the recurrent module with "
                        "gradient_profile, or pass the embedded features)")
    # sizes (B=0, T=0, wrong I) are checked with the module's layout by check_inputs


def _is_trace(obj) -> bool:
    from .replay import Trace  # replay imports this module
    return isinstance(obj, Trace)


def _is_decay_trace(obj) -> bool:
    from .modern.decay_trace import DecayTrace
    return isinstance(obj, DecayTrace)


def check_trace_call(fn: str, inputs, hx) -> None:
    """A `Trace` from `replay` stands for (module, inputs, hx): it was checked when replayed,
    and the inputs it ran on cannot be given again."""
    if inputs is not None or hx is not None:
        raise TypeError(f"{fn}: given a Trace from replay(), do not pass inputs or hx (the trace "
                        "already holds the run they describe); pass either (module, inputs, hx) "
                        "or the trace alone")


def _check_int_options(fn: str, bound, ints: dict) -> None:
    for opt, low in ints.items():
        if bound.get(opt) is not None:  # None keeps its documented default meaning
            check_number(fn, opt, bound[opt], low=low, integer=True)


def _model_failed(e: BaseException) -> bool:
    """True when the error came from inside a module's forward that rnnscope called (the
    user's model or torch's layers), not from rnnscope's own checks or from torch functions
    rnnscope called directly: after the deepest rnnscope frame, the traceback enters
    torch.nn.Module.__call__."""
    frames = traceback.extract_tb(e.__traceback__)
    last_ours = max((i for i, f in enumerate(frames) if f.filename.startswith(_PACKAGE_DIR)),
                    default=None)
    if last_ours is None or last_ours == len(frames) - 1:
        return False
    return any(f.filename.endswith(os.path.join("nn", "modules", "module.py"))
               for f in frames[last_ours + 1:])


def _describe_inputs(inputs) -> str:
    x = inputs.data if isinstance(inputs, PackedSequence) else inputs
    if isinstance(x, torch.Tensor):
        kind = "a PackedSequence of" if isinstance(inputs, PackedSequence) else "inputs"
        return f"{kind} shape {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')})"
    return "rnnscope's drawn (B, T, I) features"


def _name_error(fn: str, e: Exception, model, inputs) -> None:
    """Put the function's name in front of the message (in place: type and traceback stay);
    a model's own failure also says what rnnscope gave it and what to do."""
    msg = str(e.args[0]) if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    if isinstance(model, nn.Module) and _model_failed(e):
        name = type(model).__name__
        first = (msg.strip().splitlines() or [""])[0][:300]
        rec = _has_recurrent(unwrap_model(model))
        hint = ("pass inputs in the layout and dtype its forward takes (with forward_args= for "
                "its other arguments)" if rec else
                f"the {name} has no nn.RNN/LSTM/GRU submodule, so rnnscope cannot read its "
                "layout: pass inputs as its forward takes them, with time on dimension 0 or 1 "
                "(time_dim=), or measure a model that reads sequences")
        e.args = (f"{fn}: the {name}'s forward failed on {_describe_inputs(inputs)} "
                  f"({type(e).__name__}: {first}); {hint}",)
    elif not msg.startswith(fn):
        e.args = (f"{fn}: {msg}",) + (e.args[1:] if len(e.args) > 1 and
                                     isinstance(e.args[0], str) else ())


def _warn_nonfinite_inputs(fn: str, inputs) -> None:
    """An analysis of (module, inputs) says when the inputs hold NaN/Inf: an Inf saturates the
    gates into finite numbers that would otherwise go unreported (a replay returns what it
    computes and says nothing)."""
    data = inputs.data if isinstance(inputs, nn.utils.rnn.PackedSequence) else inputs
    if isinstance(data, torch.Tensor) and data.is_floating_point():
        bad = count_nonfinite(data)
        if bad:
            warnings.warn(f"{fn}: the inputs hold {bad} non-finite value(s) (NaN/Inf); what "
                          "depends on them is NaN/Inf, or saturated where an Inf drives a gate "
                          "to 0 or 1", RuntimeWarning, stacklevel=3)


def public(fn: str, *, grad: bool = False, call: bool = False, module: bool = False,
           ints: dict | None = None):
    """Decorator of a public entry point: the validation layer.

    grad: the function differentiates; inference_mode is refused and grad is enabled around
    the call (so torch.no_grad() around it is fine). call: arguments (module, inputs,
    forward_args, forward_kwargs, at) are checked with `check_model_call`; module: (module,
    inputs, hx) with `check_module_call`. ints: option name -> minimum, for int options (bool
    refused). Errors that escape name the function (only the outermost public call renames).
    """
    def decorate(f):
        sig = inspect.signature(f)

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            outer = _ENTRY.get() is None
            token = _ENTRY.set(fn) if outer else None
            a = {}
            try:
                try:
                    bound = sig.bind(*args, **kwargs)
                    bound.apply_defaults()
                    a = bound.arguments
                except TypeError:
                    a = None  # let the function raise its own argument error
                if a is not None:
                    if grad:
                        check_grad_mode(fn)
                    if ints:
                        _check_int_options(fn, a, ints)
                    if call:
                        check_model_call(fn, a.get("module"), a.get("inputs"),
                                         a.get("forward_args", ()), a.get("forward_kwargs"),
                                         a.get("at"), grad=grad)
                    if module and _is_trace(a.get("module")):
                        check_trace_call(fn, a.get("inputs"), a.get("hx"))
                    elif module and _is_decay_trace(a.get("module")):
                        # a replay of a decay recurrence stands for the run it holds
                        check_trace_call(fn, a.get("inputs"), a.get("hx"))
                        tr = a["module"]
                        a["module"], a["inputs"], a["hx"] = tr.module, tr.inputs, tr.hx
                        check_module_call(fn, tr.module, tr.inputs, tr.hx, grad=grad)
                        args, kwargs = bound.args, bound.kwargs
                    elif module:
                        if a.get("inputs", ()) is None:
                            raise TypeError(f"{fn}: inputs are missing; pass (module, inputs, "
                                            "hx) or a Trace from replay() alone")
                        check_module_call(fn, a.get("module"), a.get("inputs"), a.get("hx"),
                                          grad=grad)
                        if outer and not fn.startswith("replay"):
                            _warn_nonfinite_inputs(fn, a.get("inputs"))
                with torch.enable_grad() if grad else contextlib.nullcontext():
                    return f(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - renamed in place and re-raised
                if outer:
                    a = a or {}
                    _name_error(fn, e, a.get("model", a.get("module")), a.get("inputs"))
                raise
            finally:
                if token is not None:
                    _ENTRY.reset(token)

        return wrapper

    return decorate
