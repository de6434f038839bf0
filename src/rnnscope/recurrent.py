"""What a supported recurrent module is: its kind, sizes and per-layer parameter views.

This is the one dispatch table of the package: every function that accepts a
recurrent module asks `describe(module)` and gets either a `RecurrentSpec` or a clear error.

Shape legend: B batch, T time, I input features, H hidden units, P projection size (H_out = P
when proj_size > 0, else H), L layers, D directions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

# Gate names in PyTorch's weight-block order.
GATES = {"rnn": (), "lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}
# How many H-sized blocks weight_ih / weight_hh stack for each kind.
BLOCKS = {"rnn": 1, "lstm": 4, "gru": 3}
# The gate that keeps the old state (the "highway"): LSTM forget f, GRU retain z.
RETAIN_GATE = {"lstm": "f", "gru": "z"}


@dataclass(frozen=True)
class LayerParams:
    """Views (not copies) of one layer and direction's parameters.

    Shapes: w_ih (G·H, I_l), w_hh (G·H, H_out), b_ih/b_hh (G·H,) or None, w_hr (P, H) or None.
    """

    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None
    w_hr: torch.Tensor | None = None


@dataclass(frozen=True)
class RecurrentSpec:
    """A supported recurrent module described once.

    Attributes:
        kind: "rnn", "lstm" or "gru".
        nonlinearity: "tanh" or "relu" (vanilla RNN only; "tanh" otherwise).
        is_cell: True for nn.RNNCell / nn.LSTMCell / nn.GRUCell (one step per call).
        input_size, hidden_size, proj_size (0 if none), num_layers, num_directions.
        batch_first: layout of the module's own inputs (cells: always treated as batch-first).
    """

    module: nn.Module
    kind: str
    nonlinearity: str
    is_cell: bool
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    num_directions: int
    batch_first: bool
    bias: bool
    dropout: float

    @property
    def hidden_out(self) -> int:
        """H_out: size of h (P with a projection, else H)."""
        return self.proj_size or self.hidden_size

    @property
    def gate_names(self) -> tuple[str, ...]:
        return GATES[self.kind]

    @property
    def has_cell_state(self) -> bool:
        return self.kind == "lstm"

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.num_directions * self.hidden_out

    def params(self, layer: int = 0, direction: int = 0) -> LayerParams:
        """The module's own parameter tensors for one layer and direction (no copies)."""
        self.check_layer(layer, direction)
        m = self.module
        if self.is_cell:
            return LayerParams(m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda name: getattr(m, name + sfx) if hasattr(m, name + sfx) else None  # noqa: E731
        return LayerParams(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                           get("weight_hr"))

    def check_layer(self, layer: int, direction: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}) for this "
                             f"{type(self.module).__name__}; got {layer!r}")
        if not isinstance(direction, int) or not 0 <= direction < self.num_directions:
            raise ValueError(f"direction must be an int in [0, {self.num_directions}) for this "
                             f"{type(self.module).__name__}; got {direction!r}")


_FUSED = {nn.RNN: "rnn", nn.LSTM: "lstm", nn.GRU: "gru"}
_CELLS = {nn.RNNCell: "rnn", nn.LSTMCell: "lstm", nn.GRUCell: "gru"}


def _builtin_parent(module) -> type | None:
    """The nearest of nn.RNN/LSTM/GRU/RNNCell/LSTMCell/GRUCell in the module's class hierarchy."""
    for cls in type(module).__mro__:
        if cls in _FUSED or cls in _CELLS:
            return cls
    return None


def is_recurrent(module: nn.Module) -> bool:
    """True for the module types `describe` accepts: nn.RNN/LSTM/GRU, the three cells, and their
    subclasses (whose forward `replay` checks once with `check_subclass`)."""
    return isinstance(module, nn.Module) and _builtin_parent(module) is not None


def describe(module: nn.Module) -> RecurrentSpec:
    """Describe a fused nn.RNN/LSTM/GRU or an nn.RNNCell/LSTMCell/GRUCell (or a subclass of one),
    or refuse it.

    A subclass is described from the attributes its PyTorch parent defines. Whether its forward
    still computes the parent's equations is a separate, cached check (`check_subclass`) that
    `replay` performs; `describe` only reads attributes.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (nn.RNN, nn.LSTM, nn.GRU or a cell); "
                        f"got {type(module).__name__}")
    t = type(module)
    parent = _builtin_parent(module)
    if parent in _FUSED:
        kind = _FUSED[parent]
        mode = getattr(module, "mode", "")
        nonlin = "relu" if mode == "RNN_RELU" else "tanh"
        return RecurrentSpec(module, kind, nonlin, False, module.input_size, module.hidden_size,
                             getattr(module, "proj_size", 0), module.num_layers,
                             2 if module.bidirectional else 1, module.batch_first, module.bias,
                             float(module.dropout))
    if parent in _CELLS:
        kind = _CELLS[parent]
        nonlin = getattr(module, "nonlinearity", "tanh")
        return RecurrentSpec(module, kind, nonlin, True, module.input_size, module.hidden_size, 0,
                             1, 1, True, module.bias, 0.0)
    supported = "nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell (or a subclass)"
    hint = ""
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        base = "RNNBase" if isinstance(module, nn.RNNBase) else "RNNCellBase"
        hint = (f" ({t.__name__} subclasses nn.{base} but none of nn.RNN/LSTM/GRU or their "
                "cells, so its forward is not one of PyTorch's recurrences)")
    elif getattr(module, "linear_in_state", None) is not None and callable(
            getattr(module, "decay", None)):
        hint = (f" ({t.__name__} is a decay recurrence: its per-step decay is "
                f"module.decay(x), and gradient_profile, state_gradients, cell_jacobians, "
                f"lyapunov_spectrum and gate_stats take the module itself)")
    raise TypeError(f"cannot replay a {t.__name__}: expected one of {supported}{hint}")


# module -> (accepted, message); weak keys, so a checked module can still be garbage-collected.
_SUBCLASS_CHECKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_subclass(module: nn.Module) -> None:
    """Refuse a subclass of a PyTorch recurrent module whose forward computes something else.

    rnnscope replays PyTorch's equations, so a subclass is measurable only if its forward is
    its parent's (extra attributes, or a wrapper that is the identity on ordinary inputs, are
    fine). The check runs the module's own forward and the parent's
    (`type(parent).forward(module, ...)`) on small seeded probe inputs (B=2, T=3, with and
    without an initial state, the module's dtype and device, drawn from a private generator)
    under torch.no_grad and compares outputs and final states. It is done once per module
    instance and cached. Built-in modules pass without a probe.

    The module is left exactly as it was: forward is called directly (no hooks fire), nothing
    is written to parameters or .grad, and the global RNG state is saved before and restored
    after each call (both calls see the same state, so dropout masks agree and the user's
    random stream is unchanged).

    Raises:
        TypeError: the module is not a supported recurrent module, or its forward fails or
            differs from its parent's on the probe.
    """
    describe(module)  # refuses what is not a recurrent module at all
    parent = _builtin_parent(module)
    if type(module) is parent:
        return
    try:
        result = _SUBCLASS_CHECKS.get(module)
    except TypeError:  # not weak-referenceable / not hashable: check every time
        result = None
    if result is None:
        result = _probe_subclass(module, parent)
        try:
            _SUBCLASS_CHECKS[module] = result
        except TypeError:
            pass
    ok, message = result
    if not ok:
        raise TypeError(message)


def _leaves(obj):
    """(structure, tensors) of a forward's return value: nested tuples/lists of tensors/None."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), obj.dtype), [obj]
    if obj is None:
        return None, []
    if isinstance(obj, (tuple, list)):
        structs, tensors = [], []
        for o in obj:
            s, t = _leaves(o)
            structs.append(s)
            tensors.extend(t)
        return (type(obj).__name__, tuple(structs)), tensors
    return ("other", type(obj).__name__), []


def _probe_inputs(module, parent):
    p = next(module.parameters())
    dtype, device = p.dtype, p.device
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    B, T = 2, 3
    H = module.hidden_size
    if parent in _CELLS:
        x = rand(B, module.input_size)
        h = rand(B, H)
        hx = (h, rand(B, H)) if parent is nn.LSTMCell else h
        return [(x,), (x, hx)]
    D = 2 if module.bidirectional else 1
    LD = module.num_layers * D
    P = getattr(module, "proj_size", 0) or H
    x = rand(B, T, module.input_size) if module.batch_first else rand(T, B, module.input_size)
    h = rand(LD, B, P)
    hx = (h, rand(LD, B, H)) if parent is nn.LSTM else h
    return [(x,), (x, hx)]


def _probe_subclass(module, parent) -> tuple[bool, str]:
    name = type(module).__name__
    advice = (f"; rnnscope replays PyTorch's equations only, so it cannot measure this module "
              f"exactly; pass a module whose forward is nn.{parent.__name__}'s")
    head = f"{name} subclasses nn.{parent.__name__} but its forward"
    device = next(module.parameters()).device
    # A non-CPU kernel (cuDNN) keeps a private dropout state that the global RNG does not
    # reset: probe such a module in eval mode (restored exactly afterwards).
    flags = None
    if device.type != "cpu" and module.training and getattr(module, "dropout", 0) > 0:
        flags = [(m, m.training) for m in module.modules()]
        module.train(False)
    cpu_state = torch.get_rng_state()
    dev_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def reset_rng():
        torch.set_rng_state(cpu_state)
        if dev_state is not None:
            torch.cuda.set_rng_state(dev_state, device)

    worst = 0.0
    try:
        for args in _probe_inputs(module, parent):
            with torch.no_grad():
                try:
                    reset_rng()
                    own = type(module).forward(module, *args)
                    reset_rng()
                    ref = parent.forward(module, *args)
                except Exception as e:  # noqa: BLE001 - any failure means "cannot replay"
                    return False, f"{head} fails on a probe input ({type(e).__name__}: {e}){advice}"
            s_own, t_own = _leaves(own)
            s_ref, t_ref = _leaves(ref)
            if s_own != s_ref:
                return False, (f"{head} returns a different structure on a probe input "
                               f"({_describe_structure(s_own)} instead of "
                               f"{_describe_structure(s_ref)}){advice}")
            for a, b in zip(t_own, t_ref):
                if torch.equal(a, b):
                    continue
                diff = (a - b).abs().nan_to_num(nan=float("inf")).max().item()
                tol = 64 * torch.finfo(b.dtype).eps * (1 + b.abs().max().item())
                worst = max(worst, diff)
                if not diff <= tol:
                    return False, (f"{head} computes something else (max difference {diff:.3g} "
                                   f"on a probe input){advice}")
    finally:
        reset_rng()
        if flags is not None:
            for m, training in flags:
                m.training = training
    return True, f"{name}'s forward matches nn.{parent.__name__}'s (max difference {worst:.3g})"


def _describe_structure(s) -> str:
    if s is None:
        return "None"
    if s[0] == "T":
        return f"tensor{tuple(s[1])}"
    if s[0] == "other":
        return s[1]
    inner = ", ".join(_describe_structure(x) for x in s[1])
    return f"({inner})" if s[0] == "tuple" else f"[{inner}]"
