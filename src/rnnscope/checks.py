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
    p = next(spec.module.parameters())
    if inputs.dtype != p.dtype:
        raise TypeError(f"inputs are {inputs.dtype} but the {name}'s parameters are {p.dtype}; "
                        f"convert one of them (e.g. module.to({inputs.dtype}))")
    if inputs.device != p.device:
        raise ValueError(f"inputs are on {inputs.device} but the {name}'s parameters are on "
                         f"{p.device}")
    return x, unbatched


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
