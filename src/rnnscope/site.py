"""Where a measurement is taken inside a user's model, and which dimension is time there.

A user's model is called as it is written: `model(inputs, *forward_args, **forward_kwargs)`,
with token ids, a PackedSequence, hidden states or masks. The gradient is measured at a
*site*: the model's own input ("input", which must be floating point) or the input of one of
its submodules, as captum's layer methods do. The time axis is never guessed from a wrapper's
signature: one forward records what the recurrent submodules really receive
(`RecurrentCall`), and the batch and time dimensions of every other tensor are read against
those sizes. Where that cannot settle the question, the error names `time_dim=`.

Shape legend: B batch, T time (steps of the measured site), F features (flattened).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .modern.protocol import is_decay_recurrence
from .recurrent import is_recurrent


# ----------------------------------------------------------------------------------------------
# The model and how it is called


def unwrap_model(model: nn.Module) -> nn.Module:
    """The eager module behind `torch.compile`, `nn.DataParallel` and DDP wrappers.

    The wrappers compute the same function; measuring the module they wrap makes the module
    hooks below see the real submodules (a compiled graph would bypass them).
    """
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        break
    return model


class CellOverTime(nn.Module):
    """An nn.RNNCell/LSTMCell/GRUCell run over a (B, T, I) sequence from a zero state, returning
    the (B, T, H) sequence of its h states: what a bare cell given a sequence is taken to mean.
    The cell is called once per step, so its calls form the time axis."""

    def __init__(self, cell: nn.RNNCellBase):
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, I) -> (B, T, H)
        state = None
        hs = []
        for x_t in x.unbind(1):
            state = self.cell(x_t, state)
            hs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(hs, dim=1)


@dataclass(frozen=True)
class ModelCall:
    """`model(inputs, *args, **kwargs)`: the user's model and the arguments it takes."""

    model: nn.Module
    inputs: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    time_dim: int | None = None  # known by construction (a cell run over (B, T, I)), else None

    def __call__(self, inputs=None):
        return self.model(self.inputs if inputs is None else inputs, *self.args, **self.kwargs)

    def replace(self, inputs) -> "ModelCall":
        return ModelCall(self.model, inputs, self.args, self.kwargs, self.time_dim)


def model_call(model, inputs, forward_args=(), forward_kwargs=None) -> ModelCall:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(forward_args, (tuple, list)):
        raise TypeError(f"forward_args must be a tuple of extra positional arguments; got "
                        f"{type(forward_args).__name__}")
    if forward_kwargs is not None and not isinstance(forward_kwargs, dict):
        raise TypeError(f"forward_kwargs must be a dict; got {type(forward_kwargs).__name__}")
    if not isinstance(inputs, (torch.Tensor, PackedSequence)):
        raise TypeError(f"inputs must be a torch.Tensor (features or token ids) or a "
                        f"PackedSequence; got {type(inputs).__name__}")
    model = unwrap_model(model)
    if isinstance(model, nn.RNNCellBase) and isinstance(inputs, torch.Tensor) and \
            inputs.dim() == 3 and not forward_args and not forward_kwargs:
        return ModelCall(CellOverTime(model), inputs, time_dim=1)
    return ModelCall(model, inputs, tuple(forward_args), dict(forward_kwargs or {}))


# ----------------------------------------------------------------------------------------------
# What the recurrent submodules receive


def _state_parts(state) -> tuple:
    """The tensors of a recurrent state (h or (h, c)), for chaining checks."""
    if isinstance(state, torch.Tensor):
        return (state,)
    if isinstance(state, (tuple, list)):
        return tuple(t for t in state if isinstance(t, torch.Tensor))
    return ()


@dataclass
class RecurrentCall:
    """One call of a recurrent submodule: what it received and returned.

    `x` is the module's first argument (Tensor or PackedSequence) after any substitution by a
    leaf; `hx` the state it was given; `out` what it returned (None until it returns).
    """

    x: Any
    hx: Any
    out: Any = None


def _is_cell(module: nn.Module) -> bool:
    return isinstance(module, nn.RNNCellBase)


def _returned_state(module: nn.Module, out):
    if _is_cell(module):
        return out  # h' or (h', c')
    if isinstance(out, tuple) and len(out) == 2:
        return out[1]  # (output, h_n) or (output, (h_n, c_n))
    return None


def calls_are_chained(module: nn.Module, calls: list[RecurrentCall]) -> bool:
    """True when every call after the first was given the state the previous call returned
    (the same tensor objects): the calls are one recurrence unrolled by the caller."""
    for prev, cur in zip(calls, calls[1:]):
        before = _state_parts(_returned_state(module, prev.out))
        given = _state_parts(cur.hx)
        if not before or len(before) != len(given):
            return False
        if any(a is not b for a, b in zip(before, given)):
            return False
    return True


@dataclass(frozen=True)
class Axes:
    """Batch and time sizes of a recurrent submodule's time axis, as it received its inputs.

    `layout` is "bt" (batch-major), "tb" (time-major), "packed" or "steps" (a cell called once
    per step, or an nn.RNNBase called once per step chunk: the calls are the time axis).
    """

    B: int
    T: int
    layout: str
    lengths: torch.Tensor | None = None  # (B,) int64, packed inputs only
    per_call: tuple[int, ...] = ()  # steps contributed by each call ("steps")


def recurrent_axes(name: str, module: nn.Module, calls: list[RecurrentCall]) -> Axes:
    """The (B, T) of a recurrent submodule from the calls it received in one forward."""
    if not calls:
        raise ValueError(f"'{name}' was not called by the model's forward")
    if len(calls) > 1 and not calls_are_chained(module, calls):
        raise ValueError(f"'{name}' ({type(module).__name__}) was called {len(calls)} times in "
                         "one forward, and the calls do not pass their state on (a call's hx is "
                         "not the state the previous call returned), so they are not one time "
                         "axis; measure at another submodule with at=...")
    first = calls[0].x
    if isinstance(first, PackedSequence):
        if len(calls) > 1:
            raise ValueError(f"'{name}' received PackedSequences in {len(calls)} calls; one "
                             "packed call per forward is supported")
        lengths = _packed_lengths(first)
        return Axes(int(lengths.numel()), int(lengths.max()), "packed", lengths)
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"'{name}' received a {type(first).__name__}; expected a tensor or a "
                        "PackedSequence")
    if _is_cell(module):
        B = first.shape[0] if first.dim() == 2 else 1
        return Axes(B, len(calls), "steps", per_call=(1,) * len(calls))
    # decay recurrences (modern/protocol.py) are batch-first unless they say otherwise
    batch_first = bool(getattr(module, "batch_first", is_decay_recurrence(module)))
    steps = []
    B = None
    for c in calls:
        x = c.x
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"'{name}' received a {type(x).__name__} in a later call")
        if x.dim() == 2:  # unbatched (T, I)
            b, t = 1, x.shape[0]
        else:
            b, t = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
        if B is not None and b != B:
            raise ValueError(f"'{name}' was called with batch sizes {B} and {b} in one forward")
        B = b
        steps.append(int(t))
    if len(calls) == 1:
        x = first
        layout = "bt" if (batch_first or x.dim() == 2) else "tb"
        return Axes(int(B), steps[0], layout)
    return Axes(int(B), sum(steps), "steps", per_call=tuple(steps))


def _packed_lengths(p: PackedSequence) -> torch.Tensor:
    """(B,) lengths in the original (unsorted) batch order."""
    bs = p.batch_sizes.cpu()
    B = int(bs[0])
    lengths = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)  # sorted order
    if p.unsorted_indices is not None:
        lengths = lengths[p.unsorted_indices.cpu()]
    return lengths.to(torch.int64)


def pad_packed(data: torch.Tensor, like: PackedSequence) -> torch.Tensor:
    """Packed rows `data` (N, ...) laid out as `like` -> padded batch-major (B, T, ...),
    original batch order, zeros past each sequence's end."""
    p = PackedSequence(data.reshape(data.shape[0], -1), like.batch_sizes, like.sorted_indices,
                       like.unsorted_indices)
    padded, _ = pad_packed_sequence(p, batch_first=True)
    return padded.reshape(padded.shape[0], padded.shape[1], *data.shape[1:])


# ----------------------------------------------------------------------------------------------
# The capture forward: hooks on the site and on every recurrent submodule


def find_submodule(model: nn.Module, at) -> tuple[str, nn.Module]:
    """(name, module) for `at` given as a name from named_modules() or as the module."""
    if isinstance(at, nn.Module):
        for name, m in model.named_modules():
            if m is at:
                return name, m
        raise ValueError(f"at= is a {type(at).__name__} that is not a submodule of the "
                         f"{type(model).__name__}")
    mods = dict(model.named_modules())
    if at not in mods or at == "":
        names = [n for n in mods if n][:12]
        raise ValueError(f"at={at!r} names no submodule of the {type(model).__name__}; "
                         f"submodules: {', '.join(names)}{' ...' if len(mods) > 13 else ''} "
                         "(or at='input' for the model's own input)")
    return at, mods[at]


@dataclass
class Capture:
    """What one forward of the model showed: the output, the site's differentiable tensors and
    every recurrent submodule's calls (in the order they were first called)."""

    output: Any = None
    site_tensors: list = field(default_factory=list)  # tensors the gradient is taken at
    site_inputs: list = field(default_factory=list)   # what the site received, per call
    recurrent: dict = field(default_factory=dict)     # name -> list[RecurrentCall]
    modules: dict = field(default_factory=dict)       # name -> module
    auto_site: str | None = None                      # with at=None: the site chosen

    def first_recurrent(self) -> str | None:
        return next(iter(self.recurrent), None)


def _as_leaf(x):
    """A fresh leaf with x's values. Always a fresh one, so that the gradient measured at a
    submodule's input means the same whether the layers before it are trainable or frozen:
    the gradient reaching that input through the submodule (a residual path around it is
    not counted)."""
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().requires_grad_(True), x.batch_sizes,
                              x.sorted_indices, x.unsorted_indices)
    return x.detach().requires_grad_(True)


def _differentiable(x) -> torch.Tensor:
    return x.data if isinstance(x, PackedSequence) else x


@contextlib.contextmanager
def capturing(model: nn.Module, site_module: nn.Module | None, cap: Capture, *,
              grad_at_site: bool = True, auto_site: bool = False):
    """Hooks recording every recurrent submodule's calls and making the site's first argument
    differentiable (a fresh leaf only when it was not already part of the graph).

    The site is `site_module`, or with `auto_site` the first recurrent submodule called (its
    name lands in `cap.auto_site`). Hooks are held as handles and removed on exit, also after
    an error.
    """
    handles = []

    def substitute(args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, (torch.Tensor, PackedSequence)):
            raise TypeError(f"the measured submodule received a {type(x).__name__} as its first "
                            "argument; expected a tensor or a PackedSequence")
        if not torch.is_floating_point(_differentiable(x)):
            raise TypeError(f"the measured submodule receives a {_differentiable(x).dtype} "
                            "tensor (not differentiable); measure at a submodule that receives "
                            "floating-point features, e.g. the recurrent layer after an "
                            "embedding")
        x2 = _as_leaf(x) if grad_at_site else x
        cap.site_inputs.append(x2)
        cap.site_tensors.append(_differentiable(x2))
        if x2 is x:
            return args, kwargs
        if args:
            return (x2,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input": x2}

    def record(name, module):
        def pre(mod, args, kwargs):
            if auto_site and cap.auto_site in (None, name):
                cap.auto_site = name
                args, kwargs = substitute(args, kwargs)
            x = args[0] if args else kwargs.get("input")
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            cap.recurrent.setdefault(name, []).append(RecurrentCall(x, hx))
            cap.modules[name] = mod
            return args, kwargs

        def post(mod, args, kwargs, out):
            cap.recurrent[name][-1].out = out

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    def site_hook(mod, args, kwargs):
        return substitute(args, kwargs)

    try:
        if site_module is not None:
            handles.append(site_module.register_forward_pre_hook(site_hook, with_kwargs=True))
        for name, m in model.named_modules():
            if is_recurrent(m) or isinstance(m, (nn.RNNBase, nn.RNNCellBase)) or \
                    is_decay_recurrence(m):
                record(name or type(m).__name__, m)
        if site_module is not None and not any(m is site_module for _, m in
                                               model.named_modules()):
            raise ValueError("the measured submodule is not part of the model")
        yield cap
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Batch and time dimensions of tensors outside the recurrent modules


class AmbiguousLayout(ValueError):
    """Batch and time cannot be told apart (they have the same size)."""


def _layout_error(what: str, shape, anchor: str, B: int, T: int, extra: str = "",
                  cls=ValueError) -> ValueError:
    T_text = f" of T={T} steps" if T is not None else ""
    return cls(
        f"cannot tell which dimension of {what} {tuple(shape)} is time: the recurrent submodule "
        f"'{anchor}' receives B={B} sequences{T_text}{extra}; pass time_dim=0 "
        "(time first) or time_dim=1 (batch first)")


def batch_time_dims(shape, *, B: int, T: int | None, anchor: str, what: str,
                    time_dim: int | None) -> tuple[int, int]:
    """(batch_dim, time_dim) of a tensor of `shape` whose leading two dimensions are batch and
    time in some order, read against the anchor's B (and T when known)."""
    if len(shape) < 2:
        raise ValueError(f"{what} has shape {tuple(shape)}; expected at least (batch, time)")
    if time_dim is not None:
        if time_dim not in (0, 1):
            raise ValueError(f"time_dim must be 0 or 1; got {time_dim!r}")
        bdim = 1 - time_dim
        if shape[bdim] != B:
            raise ValueError(f"time_dim={time_dim} makes dimension {bdim} of {what} "
                             f"{tuple(shape)} the batch, but the recurrent submodule "
                             f"'{anchor}' receives B={B} sequences")
        return bdim, time_dim
    fits = []
    for bdim in (0, 1):
        tdim = 1 - bdim
        if shape[bdim] == B and (T is None or shape[tdim] == T):
            fits.append((bdim, tdim))
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise _layout_error(what, shape, anchor, B, T,
                            extra=" and neither of its first two dimensions matches that")
    raise _layout_error(what, shape, anchor, B, T, extra=" (batch and time have the same size)",
                        cls=AmbiguousLayout)


# ----------------------------------------------------------------------------------------------
# One forward with the gradient made available at the site


@dataclass
class SiteForward:
    """One forward of the model with the site's inputs in the autograd graph.

    Attributes:
        site: "input" or the measured submodule's name.
        output: what the model returned.
        tensors: the tensors to differentiate with respect to (one per call of the site).
        axes: batch and time of the site (B, T; lengths for packed sequences).
        capture: every recurrent submodule's calls in this forward.
        time_dim: the time dimension the caller gave (or None), reused for the output.
    """

    site: str
    output: Any
    tensors: list
    axes: Axes
    capture: Capture
    time_dim: int | None
    _to_bt: Any = field(repr=False, default=None)

    def batch_major(self, grads: list) -> torch.Tensor:
        """Gradients w.r.t. `tensors` -> (B, T, F) batch-major, calls joined along time,
        features flattened (zeros past each packed sequence's end)."""
        return self._to_bt(grads)

    def anchor(self) -> tuple[str, Axes] | None:
        """The first recurrent submodule called and its axes (None if there is none)."""
        name = self.capture.first_recurrent()
        if name is None:
            return None
        module, calls = self.capture.modules[name], self.capture.recurrent[name]
        try:
            return name, recurrent_axes(name, module, calls)
        except (ValueError, TypeError):
            # calls that do not chain (e.g. a cell whose state is normalised in between) still
            # tell the batch size; the time axis is then read from the batch alone
            x = calls[0].x
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                batch_first = isinstance(module, nn.RNNCellBase) or getattr(
                    module, "batch_first", False)
                B = x.shape[0] if (batch_first or x.dim() == 2) else x.shape[1]
                return name, Axes(int(B), None, "unknown")
            return None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (B, T, F)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def _recurrent_to_bt(module: nn.Module, calls: list[RecurrentCall], axes: Axes):
    def convert(grads):
        if axes.layout == "packed":
            return _flat(pad_packed(grads[0], calls[0].x))
        parts = []
        for g, c in zip(grads, calls):
            x = c.x
            if _is_cell(module):
                parts.append(g.reshape(axes.B, 1, -1))
            elif x.dim() == 2:  # unbatched (T, I)
                parts.append(g.unsqueeze(0))
            elif getattr(module, "batch_first", False):
                parts.append(g)
            else:
                parts.append(g.transpose(0, 1))
        return _flat(torch.cat(parts, dim=1))
    return convert


def forward_at_site(call: ModelCall, *, at=None, time_dim=None,
                    drawn_batch_major: bool = False) -> SiteForward:
    """Run `call` once with grad enabled, making the site's input differentiable.

    at: None (the model's input when it is floating point, else the input of the first
    recurrent submodule the forward calls), "input", a submodule name or the submodule itself.
    drawn_batch_major: the inputs were drawn (B, T, I) by rnnscope; a model with no recurrent
    submodule to read the layout from is then taken to read them that way (the documented
    contract of drawn inputs) instead of asking for time_dim.
    """
    model = call.model
    inputs = call.inputs
    if time_dim is None:
        time_dim = call.time_dim
    float_inputs = torch.is_floating_point(_differentiable(inputs))
    if at is None:
        at = "input" if float_inputs else "auto"
    elif isinstance(at, str) and at == "input" and not float_inputs:
        raise TypeError(f"at='input' needs floating-point model inputs, but they are "
                        f"{_differentiable(inputs).dtype} (token ids are not differentiable); "
                        "leave at=None to measure at the first recurrent submodule's input, or "
                        "pass at='<submodule name>'")
    cap = Capture()
    site_name, site_module = None, None
    if isinstance(at, nn.Module) or (isinstance(at, str) and at not in ("input", "auto")):
        site_name, site_module = find_submodule(model, at)
    elif at == "input":
        site_name = "input"
        inputs = _as_fresh_leaf(inputs)
        cap.site_inputs.append(inputs)
        cap.site_tensors.append(_differentiable(inputs))
    with capturing(model, site_module, cap, grad_at_site=True, auto_site=(at == "auto")):
        with torch.enable_grad():
            cap.output = call(inputs)
    if at == "auto":
        site_name = cap.auto_site
        if site_name is None:
            raise ValueError(f"the model's inputs are {_differentiable(call.inputs).dtype} (not "
                             f"differentiable) and its forward called no nn.RNN/LSTM/GRU or cell "
                             "to measure at instead; pass at='<submodule name>' (a submodule "
                             "that receives floating-point features)")
    if not cap.site_tensors:
        raise ValueError(f"the submodule '{site_name}' was not called by the model's forward; "
                         "pass at= a submodule the forward uses")
    fwd = SiteForward(site_name, cap.output, cap.site_tensors, None, cap, time_dim)
    site_mod = cap.modules.get(site_name) if site_name != "input" else None
    if site_mod is not None and site_name in cap.recurrent:
        calls = cap.recurrent[site_name]
        fwd.axes = recurrent_axes(site_name, site_mod, calls)
        fwd._to_bt = _recurrent_to_bt(site_mod, calls, fwd.axes)
        return fwd
    if len(cap.site_inputs) > 1:
        raise ValueError(f"'{site_name}' was called {len(cap.site_inputs)} times in one forward; "
                         "measure at a recurrent submodule (calls that chain their state are "
                         "joined into one time axis) or at='input'")
    x = cap.site_inputs[0]
    if isinstance(x, PackedSequence):
        lengths = _packed_lengths(x)
        fwd.axes = Axes(int(lengths.numel()), int(lengths.max()), "packed", lengths)
        fwd._to_bt = lambda grads: _flat(pad_packed(grads[0], x))
        return fwd
    if time_dim is None and drawn_batch_major and fwd.anchor() is None:
        time_dim = 1
    fwd.axes, fwd._to_bt = _plain_axes(fwd, x, site_name, time_dim)
    return fwd


def _as_fresh_leaf(x):
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().requires_grad_(True), x.batch_sizes,
                              x.sorted_indices, x.unsorted_indices)
    return x.detach().requires_grad_(True)


def _plain_axes(fwd: SiteForward, x: torch.Tensor, site_name: str, time_dim):
    """Axes of a plain tensor site (the model's input or a non-recurrent submodule's)."""
    what = "the model's input" if site_name == "input" else f"the input of '{site_name}'"
    anchor = fwd.anchor()
    if anchor is None:
        if time_dim is None:
            raise ValueError(f"{what} has shape {tuple(x.shape)} and the forward called no "
                             "nn.RNN/LSTM/GRU or cell to read its time dimension from; pass "
                             "time_dim=1 (batch first) or time_dim=0 (time first)")
        if x.dim() < 2:
            raise ValueError(f"{what} has shape {tuple(x.shape)}; expected (batch, time, ...)")
        bdim, tdim = 1 - time_dim, time_dim
        lengths = None
    else:
        name, ax = anchor
        calls = fwd.capture.recurrent[name]
        same = calls[0].x is x or (isinstance(calls[0].x, torch.Tensor)
                                   and calls[0].x.dim() == x.dim() and calls[0].x.shape == x.shape
                                   and _same_storage(calls[0].x, x))
        if time_dim is None and same and ax.layout in ("bt", "tb") and x.dim() == 3:
            bdim, tdim = (0, 1) if ax.layout == "bt" else (1, 0)
        elif time_dim is None and same and x.dim() == 2 and ax.layout == "bt":
            bdim, tdim = None, 0  # unbatched (T, I)
        else:
            try:
                bdim, tdim = batch_time_dims(x.shape, B=ax.B, T=ax.T, anchor=name, what=what,
                                             time_dim=time_dim)
            except AmbiguousLayout:
                raise
            except ValueError:
                if time_dim is not None:
                    raise
                # the time axis may be resampled before the recurrence: match the batch alone
                bdim, tdim = batch_time_dims(x.shape, B=ax.B, T=None, anchor=name, what=what,
                                             time_dim=None)
        lengths = ax.lengths
        T_site = x.shape[tdim]
        if lengths is not None and T_site < int(lengths.max()):
            lengths = None
    T = x.shape[tdim]
    B = 1 if bdim is None else x.shape[bdim]

    def convert(grads):
        g = grads[0]
        if bdim is None:
            return _flat(g.unsqueeze(0))
        return _flat(g.movedim((bdim, tdim), (0, 1)))

    layout = "bt" if bdim in (0, None) else "tb"
    return Axes(int(B), int(T), layout, lengths), convert


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and \
            a.storage_offset() == b.storage_offset() and a.stride() == b.stride()
    except (RuntimeError, NotImplementedError):
        return False
