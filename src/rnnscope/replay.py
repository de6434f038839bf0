"""replay(module, inputs, hx) -> Trace: the exact unrolled twin of a fused recurrent module.

Fused kernels (cuDNN, oneDNN, PyTorch's CPU loop) hide per-step states and gates. The replay
re-runs the module step by step with the module's own parameter tensors (no copies), so its
output equals the module's and gradients flow into the same parameters, while every layer's and
direction's per-step states and gate activations are exposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import cells
from .cells.layer_trace import LayerTrace
from .checks import check_initial_state, check_inputs
from .recurrent import RecurrentSpec, describe


@dataclass(frozen=True)
class Trace:
    """The unrolled computation of a recurrent module.

    Attributes:
        output, h_n, c_n: what `module(inputs, hx)` returns, in the module's own layout (c_n is
            None for RNN/GRU). For a cell, output is the (B, T, H) sequence of its states and
            h_n/c_n the last state, (B, H).
        layers: layers[l][d] is the `LayerTrace` of layer l, direction d: `.h` (B, T, H_out),
            `.c` (B, T, H; LSTM only), `.gates` name -> (B, T, H), always batch-major (B = 1 for
            unbatched inputs).
        unbatched: the inputs were a single (T, I) sequence.
    """

    spec: RecurrentSpec = field(repr=False)
    output: torch.Tensor
    h_n: torch.Tensor
    c_n: torch.Tensor | None
    layers: tuple[tuple[LayerTrace, ...], ...]
    unbatched: bool

    @property
    def kind(self) -> str:
        return self.spec.kind


def _run_layer(spec: RecurrentSpec, layer: int, direction: int, x, h0, c0) -> LayerTrace:
    p = spec.params(layer, direction)
    reverse = direction == 1
    if spec.kind == "lstm":
        return cells.lstm.run(p, x, h0, c0, reverse=reverse)
    eq = cells.rnn if spec.kind == "rnn" else cells.gru
    return eq.run(p, x, h0, reverse=reverse, nonlinearity=spec.nonlinearity)


def check_replayable(spec: RecurrentSpec) -> None:
    """Refuse what a replay cannot reproduce exactly."""
    m = spec.module
    if m.training and spec.dropout > 0 and spec.num_layers > 1:
        raise ValueError(f"this {type(m).__name__} is in training mode with dropout="
                         f"{spec.dropout}: inter-layer dropout draws random masks that a replay "
                         "cannot reproduce; call module.eval() before measuring (and "
                         "module.train() after)")


def replay(module: nn.Module, inputs: torch.Tensor, hx=None) -> Trace:
    """Re-run a recurrent module step by step and expose every state and gate.

    Args:
        module: nn.RNN (tanh or relu), nn.LSTM (proj_size allowed) or nn.GRU, any number of
            layers, uni- or bidirectional, bias or not; or an nn.RNNCell/LSTMCell/GRUCell, which
            is unrolled over a (B, T, I) sequence.
        inputs: the module's own layout ((B, T, I) with batch_first, else (T, B, I)) or an
            unbatched (T, I) sequence.
        hx: initial state as the module takes it (tuple (h0, c0) for LSTM), or None for zeros.

    Returns:
        A `Trace` whose output/h_n/c_n equal `module(inputs, hx)` and whose tensors are part of
        the autograd graph of the module's own parameters.

    Example:
        >>> lstm = nn.LSTM(3, 5, batch_first=True)
        >>> x = torch.randn(2, 7, 3)
        >>> tr = replay(lstm, x)
        >>> out, (h, c) = lstm(x)
        >>> assert torch.allclose(tr.output, out, atol=1e-6)
        >>> tr.layers[0][0].gates["f"].shape
        torch.Size([2, 7, 5])
    """
    spec = describe(module)
    check_replayable(spec)
    x, unbatched = check_inputs(spec, inputs)
    B = x.shape[0]
    h0s, c0s = check_initial_state(spec, hx, B, unbatched, x)
    D = spec.num_directions
    layers = []
    layer_in = x
    for layer in range(spec.num_layers):
        dirs = tuple(_run_layer(spec, layer, d, layer_in, h0s[layer * D + d], c0s[layer * D + d])
                     for d in range(D))
        layers.append(dirs)
        layer_in = dirs[0].h if D == 1 else torch.cat([t.h for t in dirs], dim=-1)
    out = layer_in  # (B, T, D·H_out)
    # Final states in PyTorch's (L·D, B, ·) order; direction 1's final state is its last step.
    h_n = torch.stack([t.steps_h[-1] for dirs in layers for t in dirs])
    c_n = (torch.stack([t.steps_c[-1] for dirs in layers for t in dirs])
           if spec.has_cell_state else None)
    if spec.is_cell:
        h_n, c_n = h_n[0], (c_n[0] if c_n is not None else None)
        if unbatched:
            out, h_n = out[0], h_n[0]
            c_n = c_n[0] if c_n is not None else None
    elif unbatched:
        out, h_n = out[0], h_n[:, 0]
        c_n = c_n[:, 0] if c_n is not None else None
    elif not spec.batch_first:
        out = out.transpose(0, 1)
    return Trace(spec=spec, output=out, h_n=h_n, c_n=c_n, layers=tuple(layers),
                 unbatched=unbatched)
