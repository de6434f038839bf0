"""replay(module, inputs, hx) -> Trace: the exact unrolled twin of a fused recurrent module.

Fused kernels (cuDNN, oneDNN, PyTorch's CPU loop) hide per-step states and gates. The replay
re-runs the module step by step with the module's own parameter tensors (no copies), so its
output equals the module's and gradients flow into the same parameters, while every layer's and
direction's per-step states and gate activations are exposed.

Beyond plain tensors it reproduces PyTorch's variable-length inputs (PackedSequence: each sample
runs over its own length) and, given the generator state captured before the module's call,
the inter-layer dropout masks of a module in training mode, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import cells
from .cells.layer_trace import LayerTrace
from .checks import check_initial_state, check_inputs, check_packed, current_entry, public
from .modern.decay_trace import DecayTrace, decay_trace
from .modern.protocol import is_decay_recurrence
from .recurrent import RecurrentSpec, check_subclass, describe


@dataclass(frozen=True)
class Trace:
    """The unrolled computation of a recurrent module.

    Attributes:
        output, h_n, c_n: what `module(inputs, hx)` returns, in the module's own layout (c_n is
            None for RNN/GRU). For a cell, output is the (B, T, H) sequence of its states and
            h_n/c_n the last state, (B, H). For a PackedSequence input, output is a
            PackedSequence equal to the module's (same data, batch_sizes, sorted_indices,
            unsorted_indices) and h_n/c_n hold each sample's state at its own end, in the
            batch's original order.
        layers: layers[l][d] is the `LayerTrace` of layer l, direction d: `.h` (B, T, H_out),
            `.c` (B, T, H; LSTM only), `.gates` name -> (B, T, H), always batch-major (B = 1 for
            unbatched inputs) and, for packed inputs, in the original batch order over the
            padded length T = max(lengths).
        unbatched: the inputs were a single (T, I) sequence.
        lengths: (B,) int64 CPU tensor of each sample's length (original batch order) for a
            PackedSequence input, else None. Positions t ≥ lengths[b] are padding: the layer
            outputs (and `layers[l+1][d].x`) are zero there, h/c hold the carried state and
            the gates are not valid (see `LayerTrace`).
        dropout_masks: for a module in training mode with inter-layer dropout (replayed with
            `rng_state`), dropout_masks[l] is the (B, T, D·H_out) multiplier the kernel applied
            to layer l's output before layer l + 1 (0 or 1/(1 − p)); an empty tuple otherwise.
    """

    spec: RecurrentSpec = field(repr=False)
    output: torch.Tensor | PackedSequence
    h_n: torch.Tensor
    c_n: torch.Tensor | None
    layers: tuple[tuple[LayerTrace, ...], ...]
    unbatched: bool
    lengths: torch.Tensor | None = None
    dropout_masks: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def packed(self) -> bool:
        """True when the inputs were a PackedSequence."""
        return self.lengths is not None

    def __repr__(self) -> str:  # one line: never the tensors themselves
        h = self.layers[0][0].h  # (B, T, H_out)
        return (f"Trace(kind={self.kind!r}, layers={len(self.layers)}, "
                f"directions={len(self.layers[0])}, B={h.shape[0]}, T={h.shape[1]}, "
                f"H_out={h.shape[2]}, packed={self.packed}, unbatched={self.unbatched})")


def _run_layer(spec: RecurrentSpec, layer: int, direction: int, x, h0, c0,
               lengths=None) -> LayerTrace:
    p = spec.params(layer, direction)
    reverse = direction == 1
    if spec.kind == "lstm":
        return cells.lstm.run(p, x, h0, c0, reverse=reverse, lengths=lengths)
    eq = cells.rnn if spec.kind == "rnn" else cells.gru
    return eq.run(p, x, h0, reverse=reverse, nonlinearity=spec.nonlinearity, lengths=lengths)


def _dropout_active(spec: RecurrentSpec) -> bool:
    return (not spec.is_cell and spec.module.training and spec.dropout > 0
            and spec.num_layers > 1)


def check_replayable(spec: RecurrentSpec, *, device=None, rng_state=None) -> None:
    """Refuse what a replay cannot reproduce exactly.

    A module in training mode with inter-layer dropout (dropout > 0, num_layers > 1) draws
    random masks: on the CPU the replay redraws them from `rng_state` (torch.get_rng_state()
    captured just before the module's call); without it, or on CUDA (cuDNN keeps a private
    dropout state), the module is refused.
    """
    m = spec.module
    name = type(m).__name__
    params = list(m.parameters())
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise TypeError(f"this {name}'s parameters have mixed dtypes {sorted(map(str, dtypes))}; "
                        "PyTorch's kernel expects one dtype (e.g. module.to(torch.float32))")
    if not _dropout_active(spec):
        return
    device = torch.device(device) if device is not None else params[0].device
    if device.type != "cpu":
        raise ValueError(f"this {name} is in training mode with dropout={spec.dropout} on "
                         f"{device}: {'cuDNN' if device.type == 'cuda' else 'the device kernel'} "
                         "draws its inter-layer dropout masks from a private dropout state that "
                         "rnnscope cannot read, so they cannot be replayed; call module.eval() "
                         "for the analysis (and module.train() after), or replay on the CPU")
    if rng_state is None:
        fn = current_entry("replay")
        how = ("pass rng_state=torch.get_rng_state() captured immediately before the module's "
               "call so the replay redraws the same masks" if fn == "replay" else
               f"{fn} takes no rng_state: replay it yourself, trace = rnnscope.replay(module, "
               "inputs, hx, rng_state=state) with state = torch.get_rng_state() captured "
               f"immediately before the module's call, and pass the trace ({fn}(trace))")
        raise ValueError(f"this {name} is in training mode with dropout={spec.dropout}: its "
                         f"inter-layer dropout masks are random; {how}, or call module.eval() "
                         "before measuring (and module.train() after)")


def _generator(rng_state) -> torch.Generator:
    """A private CPU generator in the given state (the global generator is never touched)."""
    if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.uint8 or \
            rng_state.dim() != 1 or rng_state.device.type != "cpu":
        got = (f"a {rng_state.dtype} tensor of shape {tuple(rng_state.shape)} on "
               f"{rng_state.device}" if isinstance(rng_state, torch.Tensor)
               else type(rng_state).__name__)
        raise TypeError("rng_state must be the torch.ByteTensor returned by "
                        f"torch.get_rng_state() (CPU uint8, 1-D); got {got}")
    g = torch.Generator(device="cpu")
    try:
        g.set_state(rng_state)
    except RuntimeError as e:
        raise ValueError(f"rng_state is not a CPU generator state from torch.get_rng_state(): "
                         f"{e}") from e
    return g


def _dropout_mask(spec: RecurrentSpec, gen: torch.Generator, like: torch.Tensor,
                  packed_rows, batch: int | None = None) -> torch.Tensor:
    """The (B, T, D·H_out) multiplier PyTorch's CPU kernel applies to a layer's output; with
    `batch` (tensor inputs only), that of the first B samples of a kernel call on `batch`.

    The kernel calls at::dropout(layer_output, p, train=True) on its own layout: time-major
    (T, B, D·H_out) contiguous for a tensor input, the (N, D·H_out) packed data for a
    PackedSequence. CPU dropout is noise = empty_like(x).bernoulli_(1 − p); noise.div_(1 − p);
    x * noise (p = 1: x * 0, no draw). Drawing the same noise, in the same layout and order,
    from a generator in the same state reproduces it bit for bit.
    """
    p = spec.dropout
    B, T, F = like.shape
    if p >= 1:
        return like.new_zeros(B, T, F)
    if packed_rows is None:
        # drawn for the whole batch the kernel saw, in its (T, batch, ·) layout: sample b's
        # mask is noise[:, b] whichever samples are replayed
        noise = like.new_empty(T, batch or B, F).bernoulli_(1 - p, generator=gen).div_(1 - p)
        return noise[:, :B].transpose(0, 1)
    noise = like.new_empty(packed_rows.numel(), F).bernoulli_(1 - p, generator=gen).div_(1 - p)
    return like.new_zeros(B * T, F).index_copy_(0, packed_rows.to(like.device), noise).view(B, T, F)


@public("replay", module=True)
def replay(module: nn.Module, inputs, hx=None, *, rng_state=None) -> Trace | DecayTrace:
    """Re-run a recurrent module step by step and expose every state and gate.

    Args:
        module: nn.RNN (tanh or relu), nn.LSTM (proj_size allowed) or nn.GRU, any number of
            layers, uni- or bidirectional, bias or not; or an nn.RNNCell/LSTMCell/GRUCell, which
            is unrolled over a (B, T, I) sequence. Subclasses are accepted when their forward
            computes their parent's (checked once per module, see
            `recurrent.check_subclass`).
        inputs: the module's own layout ((B, T, I) with batch_first, else (T, B, I)), an
            unbatched (T, I) sequence, or a torch.nn.utils.rnn.PackedSequence (fused modules
            only; each sample then runs over its own length, as in PyTorch).
        hx: initial state as the module takes it (tuple (h0, c0) for LSTM), or None for zeros.
            For a PackedSequence, in the batch's original order (as the module takes it).
        rng_state: only for a module in training mode with inter-layer dropout (dropout > 0,
            num_layers > 1) on the CPU: torch.get_rng_state() captured immediately before the
            module's call. The replay redraws the kernel's dropout masks from a private
            generator set to this state (the global generator is not touched). Ignored when no
            dropout is active.

    Returns:
        A `Trace` whose output/h_n/c_n equal `module(inputs, hx)` and whose tensors are part of
        the autograd graph of the module's own parameters (and of the inputs).

        For a decay recurrence (MinGRU, MinLSTM, LRU, RGLRU, SelectiveSSM, SLSTM or a module
        implementing rnnscope.modern.protocol) a `DecayTrace` instead: its states `.h`, its
        per-step decay `.decay` (B, T, *S) and `.gates["a"]` = |a_t| (B, T, N), the gate that
        plays the forget gate's role; the analyses take it as they take a `Trace`.

    Raises:
        TypeError / ValueError: unsupported module, bad inputs or state, a subclass whose
            forward differs, or training-mode dropout that cannot be reproduced (no rng_state,
            or a CUDA module).

    Example:
        >>> lstm = nn.LSTM(3, 5, batch_first=True)
        >>> x = torch.randn(2, 7, 3)
        >>> tr = replay(lstm, x)
        >>> out, (h, c) = lstm(x)
        >>> assert torch.allclose(tr.output, out, atol=1e-6)
        >>> tr.layers[0][0].gates["f"].shape
        torch.Size([2, 7, 5])
    """
    return _replay(module, inputs, hx, rng_state)


@public("replay", module=True)
def replay_leading_samples(module: nn.Module, inputs: torch.Tensor, hx=None, *, rng_state,
                           batch: int) -> Trace:
    """`replay` of the first B samples of a call of a training-mode module with inter-layer
    dropout on `batch` ≥ B samples: inputs (and hx) hold those B samples only, rng_state is
    the generator state captured before the call on all `batch`. The dropout masks are drawn
    for the whole batch, as the kernel drew them, and the first B samples' kept, so the
    replay costs B samples, not `batch` (the monitor keeps `max_batch` samples of a step).
    A PackedSequence is refused (its masks follow the packed rows of the whole batch)."""
    if isinstance(inputs, PackedSequence) or not isinstance(batch, int) or isinstance(batch, bool):
        raise TypeError("replay_leading_samples takes a tensor input and an int batch; got "
                        f"{type(inputs).__name__} and {type(batch).__name__}")
    return _replay(module, inputs, hx, rng_state, batch)


def _replay(module, inputs, hx, rng_state, mask_batch: int | None = None):
    if is_decay_recurrence(module):  # nothing fused to re-run: the decay is module.decay(x)
        if rng_state is not None or isinstance(inputs, PackedSequence):
            raise ValueError(f"a {type(module).__name__} is replayed from a plain (B, T, I) "
                             "tensor without rng_state (it draws no dropout masks); got "
                             + ("a PackedSequence" if isinstance(inputs, PackedSequence)
                                else "rng_state"))
        return decay_trace(module, inputs, hx)
    spec = describe(module)
    is_packed = isinstance(inputs, PackedSequence)
    lengths = rows = None
    if is_packed:
        x, lengths, rows = check_packed(spec, inputs)
        unbatched = False
    else:
        x, unbatched = check_inputs(spec, inputs)
    check_replayable(spec, device=x.device, rng_state=rng_state)
    check_subclass(module)
    gen = _generator(rng_state) if _dropout_active(spec) else None
    B, T = x.shape[0], x.shape[1]
    if mask_batch is not None and mask_batch < B:
        raise ValueError(f"batch={mask_batch} is smaller than the {B} samples given")
    h0s, c0s = check_initial_state(spec, hx, B, unbatched, x)
    D = spec.num_directions
    pad = None
    if lengths is not None and int(lengths.min()) < T:
        pad = (torch.arange(T, device=x.device) >= lengths.to(x.device)[:, None]).unsqueeze(-1)
    layers, masks = [], []
    layer_in = x
    for layer in range(spec.num_layers):
        dirs = tuple(_run_layer(spec, layer, d, layer_in, h0s[layer * D + d], c0s[layer * D + d],
                                lengths) for d in range(D))
        layers.append(dirs)
        layer_in = dirs[0].h if D == 1 else torch.cat([t.h for t in dirs], dim=-1)
        if pad is not None:  # padded positions of a layer's output are zero, as in PyTorch
            layer_in = layer_in.masked_fill(pad, 0)
        if gen is not None and layer < spec.num_layers - 1:
            mask = _dropout_mask(spec, gen, layer_in, rows, mask_batch)
            masks.append(mask)
            layer_in = layer_in * mask
    out = layer_in  # (B, T, D·H_out)
    # Final states in PyTorch's (L·D, B, ·) order; the last processing step carries each
    # sample's own final state (direction 1's is its step at position 0).
    h_n = torch.stack([t.steps_h[-1] for dirs in layers for t in dirs])
    c_n = (torch.stack([t.steps_c[-1] for dirs in layers for t in dirs])
           if spec.has_cell_state else None)
    if is_packed:
        data = out.reshape(B * T, -1).index_select(0, rows.to(out.device))
        out = PackedSequence(data, inputs.batch_sizes, inputs.sorted_indices,
                             inputs.unsorted_indices)
    elif spec.is_cell:
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
                 unbatched=unbatched, lengths=lengths, dropout_masks=tuple(masks))
