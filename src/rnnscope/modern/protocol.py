"""The decay-recurrence protocol, and the one table that dispatches the analyses on it.

A module gets rnnscope's Jacobian, state-gradient, Lyapunov and gate analyses (closed forms,
no per-step autograd Jacobians) when it says how its state decays. It need not subclass
anything of rnnscope and its weights stay where they are. What it must have:

    linear_in_state: bool
        True when h_t = a_t ⊙ h_{t−1} + b_t with a_t, b_t functions of x_t alone: then
        ∂h_t/∂h_{t−1} = diag(a_t) is the WHOLE step Jacobian (there are no indirect paths).
    decay(x) -> a  (B, T, *S)
        The per-step decay a_t, batch-major, real or complex; x in the module's own layout
        (as its forward takes it). With linear_in_state False it is called decay(x, hx) and
        is the gate that plays the forget gate's role (it feeds gate_stats only).
    hidden_states(x, hx=None) -> h  (B, T, *S)
        Every state, batch-major, differentiable (hx as the module's forward takes it).

Optional:

    readout(xb, states) -> y  (B, T, O)
        The module's outputs from batch-major inputs xb (B, T, I) and states (B, T, *S); the
        losses of `state_gradients` are taken on y. Default: y = the states, flattened.
    batch_first: bool (default True) — the layout of x.
    input_size: int — lets `compare` and the CLI draw inputs for the module.

Required when linear_in_state is False (a recurrence whose state feeds its own gates):

    step_jacobians(x, hx=None) -> A  (B, T, M, M)
        The closed-form ∂s_t/∂s_{t−1} of the full running state s flattened (M entries); its
        first N entries are `hidden_states` flattened. Span Jacobians and Lyapunov exponents
        are products of these; state gradients run their transposes backward.
    highway(x, hx=None) -> d  (B, T, M)   (optional)
        The diagonal of A counted as the highway (0 where there is none).
    step_jacobian_fn(x, hx=None) -> at   (optional)
        `at(steps)` gives A[:, steps] (B, S, M, M) for a contiguous slice of steps, the
        trajectory run once. When present, the analyses build A `chunk_size` steps at a time
        (memory O(B·chunk·M²) instead of O(B·T·M²)); sLSTM has it.

Shapes: B batch, T time, S one sample's state shape, N = prod(S) the flattened state size.

Example — a third-party diagonal linear recurrence, nothing but the protocol:

    >>> import torch
    >>> from torch import nn
    >>> class Leaky(nn.Module):                       # h_t = σ(w) ⊙ h_{t−1} + W x_t
    ...     linear_in_state = True
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w, self.inp = nn.Parameter(torch.zeros(4)), nn.Linear(3, 4)
    ...     def decay(self, x):
    ...         return torch.sigmoid(self.w).expand(x.shape[0], x.shape[1], 4)
    ...     def hidden_states(self, x, hx=None):
    ...         h, hs = torch.zeros(x.shape[0], 4), []
    ...         for x_t in self.inp(x).unbind(1):
    ...             h = torch.sigmoid(self.w) * h + x_t
    ...             hs.append(h)
    ...         return torch.stack(hs, 1)
    >>> from rnnscope import cell_jacobians
    >>> J = cell_jacobians(Leaky(), torch.randn(2, 5, 3))
    >>> J.highway_is_whole, J.direct[0, 0].tolist()   # σ(0)⁴: the decay product over 4 steps
    (True, [0.0625, 0.0625, 0.0625, 0.0625])
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn

from .lru import LRU
from .mingru import MinGRU
from .minlstm import MinLSTM
from .rglru import RGLRU
from .selective_ssm import SelectiveSSM
from .slstm import SLSTM

REQUIRED = ("decay", "hidden_states")
REQUIRED_NONLINEAR = ("step_jacobians",)


def _slstm_highway(m: SLSTM, x, hx) -> torch.Tensor:
    """The diagonal highway of sLSTM's full state s = (h, c, n, m): f'_t on the c and n blocks
    (∂c_t/∂c_{t−1} = ∂n_t/∂n_{t−1} = diag(f'_t)), 0 on h and m. (B, T, 4H)."""
    f = m.highway(x, hx)
    zero = torch.zeros_like(f)
    return torch.cat([zero, f, f, zero], dim=-1)


def _slstm_cell_gradient(m: SLSTM, x, hx, g: torch.Tensor) -> torch.Tensor:
    """Total ∂L/∂c_t (B, T, H) from the state-coordinate gradients g (B, T, 4H): c_t reaches
    the loss through c_{t+1}, n and m (g's c block) and through h_t = o_t c_t / n_t of its own
    step, as autograd on the per-step c tensors counts it (and as for the LSTM)."""
    H = m.hidden_size
    with torch.no_grad():
        _, pre = m._trajectory(x, hx)
        _, _, _, states = m._run(x, hx)
    n = torch.stack([s[2] for s in states], 1)
    o = torch.sigmoid(pre.chunk(4, dim=-1)[3])
    return g[..., H:2 * H] + (o / n).to(g) * g[..., :H]


@dataclass(frozen=True)
class Entry:
    """What the analyses need to know of one module type beyond the protocol itself.

    kind: the name results carry. highway: (module, x, hx) -> (B, T, M) diagonal highway of
    the step Jacobian (nonlinear recurrences); None: the module's own `highway` if any.
    cell_gradient: (module, x, hx, g (B, T, M)) -> the total ∂L/∂c_t (B, T, H) that
    `state_gradients` reports as the cell state's, from the running state's coordinate
    gradients g; None: no cell state is reported.
    """

    kind: str
    highway: Callable | None = None
    cell_gradient: Callable | None = None


# The one table. A module whose type is not here but that implements the protocol is a
# third-party recurrence: kind "protocol".
TABLE: dict[type, Entry] = {
    MinGRU: Entry("mingru"),
    MinLSTM: Entry("minlstm"),
    LRU: Entry("lru"),
    RGLRU: Entry("rglru"),
    SelectiveSSM: Entry("selective_ssm"),
    SLSTM: Entry("slstm", highway=_slstm_highway, cell_gradient=_slstm_cell_gradient),
}
PROTOCOL = Entry("protocol")


@dataclass(frozen=True)
class DecaySpec:
    """A module that implements the protocol, described once.

    Attributes:
        module: the module itself (never copied).
        kind: table name ("mingru", "lru", ...) or "protocol" for a third-party module.
        linear: `linear_in_state`.
        batch_first: the layout of the module's inputs.
        entry: its table entry.
    """

    module: nn.Module
    kind: str
    linear: bool
    batch_first: bool
    entry: Entry

    @property
    def state(self) -> str:
        """"h" for a recurrence linear in h (the state is h), "full" otherwise (the flattened
        running state, e.g. sLSTM's (h, c, n, m))."""
        return "h" if self.linear else "full"


def _entry(module: nn.Module) -> Entry | None:
    for cls in type(module).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return None


def is_decay_recurrence(module) -> bool:
    """True for a module that claims the protocol (a built-in modern cell, or any nn.Module
    with a `linear_in_state` attribute). `describe_decay` then checks the rest loudly."""
    return isinstance(module, nn.Module) and (
        _entry(module) is not None or hasattr(type(module), "linear_in_state")
        or "linear_in_state" in vars(module))


def describe_decay(module: nn.Module) -> DecaySpec:
    """The `DecaySpec` of a protocol module, or a TypeError naming what it lacks."""
    name = type(module).__name__
    if not is_decay_recurrence(module):
        raise TypeError(f"{name} does not implement the decay-recurrence protocol: it needs "
                        f"`linear_in_state` and {', '.join(REQUIRED)} (see "
                        "rnnscope.modern.protocol)")
    linear = module.linear_in_state
    if not isinstance(linear, bool):
        raise TypeError(f"{name}.linear_in_state must be a bool; got {linear!r}")
    need = REQUIRED + (() if linear else REQUIRED_NONLINEAR)
    missing = [m for m in need if not callable(getattr(module, m, None))]
    if missing:
        why = "" if linear else " (linear_in_state is False)"
        raise TypeError(f"{name} claims the decay-recurrence protocol (it has linear_in_state) "
                        f"but lacks {', '.join(missing)}{why}; see rnnscope.modern.protocol")
    batch_first = getattr(module, "batch_first", True)
    if not isinstance(batch_first, bool):
        raise TypeError(f"{name}.batch_first must be a bool; got {batch_first!r}")
    entry = _entry(module) or PROTOCOL
    return DecaySpec(module, entry.kind, linear, batch_first, entry)
