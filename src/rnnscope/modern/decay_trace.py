"""What `replay` gives for a decay recurrence (modern/protocol.py): its states and its per-step
decay a_t, exposed as the gate that plays the LSTM forget gate's role.

For nn.RNN/LSTM/GRU `replay` re-runs a fused kernel to expose what it hides. A decay recurrence
hides nothing: its decay is `module.decay(x)`. The `DecayTrace` gathers that run — the states,
the decays and, for rnnscope's own modules, the module's outputs — in the place a user of
`replay` looks for gates (`trace.gates["a"]`, like `trace.layers[0][0].gates["f"]` of an LSTM),
and stands for (module, inputs, hx) in every analysis, as a `Trace` does.

Shapes: B batch, T time, S one sample's state shape, N = prod(S).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import ModernRecurrence
from .protocol import describe_decay


@dataclass(frozen=True, eq=False)
class DecayTrace:
    """The run of a decay recurrence on some inputs.

    Attributes:
        module: the module (not copied).
        inputs, hx: what it ran on, as given (the module's own layout).
        output, h_n: `module(inputs, hx)` for rnnscope's modern modules (MinGRU, ..., SLSTM);
            None for a third-party protocol module (its forward is its own business).
        h: (B, T, *S) every state, batch-major (sLSTM: h_t, (B, T, H)).
        decay: (B, T, *S) the per-step decay a_t, batch-major: real, or complex for the LRU
            (λ); for sLSTM the forget gate f_t along the trajectory.
        unbatched: the inputs were a single (T, I) sequence (B = 1 in h and decay).
        kind: "mingru", "lru", ..., or "protocol".

    The tensors are part of the autograd graph of the module's parameters when grad mode was
    on, as a `Trace`'s are.
    """

    module: nn.Module = field(repr=False)
    inputs: torch.Tensor = field(repr=False)
    hx: object = field(repr=False)
    output: torch.Tensor | None = field(repr=False)
    h_n: object = field(repr=False)
    h: torch.Tensor = field(repr=False)
    decay: torch.Tensor = field(repr=False)
    unbatched: bool
    kind: str

    @property
    def gates(self) -> dict[str, torch.Tensor]:
        """{"a": |a_t|} (B, T, N): the decay's magnitude per unit, the state flattened — the
        retain gate of the recurrence (memory time 1/(1 − |a|)), as "f" is the LSTM's."""
        B, T = self.decay.shape[:2]
        return {"a": self.decay.abs().reshape(B, T, -1)}

    def __repr__(self) -> str:
        B, T = self.decay.shape[:2]
        return (f"DecayTrace(kind={self.kind!r}, B={B}, T={T}, "
                f"state={tuple(self.decay.shape[2:])}, unbatched={self.unbatched})")


def decay_trace(module: nn.Module, inputs: torch.Tensor, hx=None) -> DecayTrace:
    """Run a decay recurrence and keep its states and per-step decays (see `DecayTrace`);
    what `replay(module, inputs, hx)` returns for one."""
    spec = describe_decay(module)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (2, 3):
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        layout = "(B, T, I)" if spec.batch_first else "(T, B, I)"
        raise ValueError(f"inputs must be a {layout} tensor or an unbatched (T, I) one for a "
                         f"{type(module).__name__}; got {got}")
    unbatched = inputs.dim() == 2
    xb = inputs.unsqueeze(0) if unbatched else (inputs if spec.batch_first
                                                 else inputs.transpose(0, 1))
    B, T = xb.shape[:2]
    h = module.hidden_states(inputs, hx)
    a = module.decay(inputs) if spec.linear else module.decay(inputs, hx)
    for what, v in (("hidden_states(x, hx)", h), ("decay(x)", a)):
        if not isinstance(v, torch.Tensor) or v.dim() < 3 or tuple(v.shape[:2]) != (B, T):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{type(module).__name__}.{what} must return a batch-major "
                             f"(B={B}, T={T}, ...) tensor; got {got}")
    if spec.linear:
        a = a.expand_as(h)  # a decay constant over time (the LRU's λ) comes broadcast
    output = h_n = None
    if isinstance(module, ModernRecurrence):
        output, h_n = module(inputs, hx)
    return DecayTrace(module, inputs, hx, output, h_n, h, a, unbatched, spec.kind)
