"""Input validation shared by every public entry point: clear errors naming given vs expected."""

from __future__ import annotations

import torch

from .recurrent import RecurrentSpec


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
            raise TypeError(f"hx for an {name} must be a tuple (h0, c0); got {type(hx).__name__}")
        h0, c0 = hx
    else:
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx for an {name} must be a tensor; got {type(hx).__name__}")
        h0, c0 = hx, None

    def fix(t, size, what):
        if spec.is_cell:
            want = (size,) if unbatched else (batch, size)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                raise ValueError(f"{what} must have shape {want} for this {name}; got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
            return [t.reshape(batch, size)]
        want = (LD, size) if unbatched else (LD, batch, size)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"{what} must have shape {want} (L·D, {'' if unbatched else 'B, '}"
                             f"{'H_out' if what == 'h0' else 'H'}) for this {name}; got "
                             f"{tuple(getattr(t, 'shape', ()))}")
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
