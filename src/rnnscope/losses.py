"""What is differentiated: per-sample or per-step losses from whatever the model returns.

A model returns a tensor, a tuple (output first, e.g. `(logits, hidden)`), a dict (`logits`,
`output`...) or a PackedSequence. Its output sequence is read batch-major (B, T, F) against
the site's batch size and the recurrent submodules' own layouts (`site.SiteForward`), never
from a guess about the wrapper. Options:

- "last": per sample, the sum of the output features at its own last step (for packed or
  padded sequences, each sequence's last valid step). (B,)
- "all": per sample and step, the sum of the output features (steps past a sequence's end
  are 0). (B, T)
- a callable on the model's return value, returning per-sample (B,) or per-step (B, T) losses.

Every sample's loss must depend on that sample alone (see `profile`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from .site import SiteForward, _packed_lengths, batch_time_dims, pad_packed

LOSS_CHOICES = "'last', 'all' or a callable(model output) -> (B,) or (B, T) losses"
_DICT_KEYS = ("logits", "output", "outputs", "prediction", "predictions", "y")


def check_loss_option(loss, *, allow_none: bool = False) -> str:
    """The loss's name for results ("last", "all", "custom"), or a clear error."""
    if loss is None and allow_none:
        return "all"
    if callable(loss):
        return "custom"
    if loss not in ("last", "all"):
        raise ValueError(f"loss must be {LOSS_CHOICES}; got {loss!r}")
    return loss


def primary_output(out: Any):
    """The output sequence inside what the model returned."""
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, (torch.Tensor, PackedSequence)):
                return item
        raise TypeError("the model returned a tuple with no tensor in it; pass loss= a callable "
                        "that computes per-sample losses from it")
    if isinstance(out, dict):
        for k in _DICT_KEYS:
            if isinstance(out.get(k), (torch.Tensor, PackedSequence)):
                return out[k]
        raise TypeError(f"the model returned a dict with keys {sorted(map(str, out))}; none of "
                        f"{', '.join(_DICT_KEYS)} holds the output sequence: pass loss= a "
                        "callable that computes per-sample losses from it")
    if isinstance(out, (torch.Tensor, PackedSequence)):
        return out
    raise TypeError(f"the model returned a {type(out).__name__}; pass loss= a callable that "
                    "computes per-sample losses from it")


def output_sequence(fwd: SiteForward) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's output batch-major: (B, T', F) with lengths (B,) or None — or (B, F) for a
    model that returns only its final output."""
    y = primary_output(fwd.output)
    B = fwd.axes.B
    if isinstance(y, PackedSequence):
        return pad_packed(y.data, y), _packed_lengths(y)
    # The output of a recurrent submodule itself: its own layout says which dimension is time.
    for name, calls in fwd.capture.recurrent.items():
        mod = fwd.capture.modules[name]
        for c in calls:
            o = c.out[0] if isinstance(c.out, tuple) else c.out
            if o is y and len(calls) == 1 and not isinstance(mod, torch.nn.RNNCellBase):
                if y.dim() == 2:  # unbatched (T, F)
                    return y.unsqueeze(0), None
                bt = y if getattr(mod, "batch_first", False) else y.transpose(0, 1)
                return bt, _lengths_for(fwd, bt.shape[1])
    if y.dim() < 2:
        raise ValueError(f"the model's output has shape {tuple(y.shape)}; expected (B, T, F) "
                         "or (B, F). Pass loss= a callable returning per-sample losses")
    if y.dim() == 2:
        T = fwd.axes.T
        if y.shape[0] == B * T and B > 1 and y.shape[0] != B:
            raise ValueError(f"the model returns {tuple(y.shape)}: B·T={B}·{T} rows flattened "
                             "into one dimension, in an order rnnscope cannot tell (time-major "
                             "or batch-major); pass loss= a callable, e.g. loss=lambda out: "
                             f"out[0].view({T}, {B}, -1)[-1].sum(-1) for time-major rows")
        if y.shape[0] != B:
            raise ValueError(f"the model's output {tuple(y.shape)} does not start with the batch "
                             f"(B={B}); pass loss= a callable returning per-sample losses")
        if y.shape[1] == T and T > 1:
            raise ValueError(f"the model's output {tuple(y.shape)} may be (B, F) final features "
                             f"or (B, T={T}) per-step values; pass loss= a callable to say which")
        return y, None
    bdim, tdim = batch_time_dims(y.shape, B=B, T=None, anchor=_anchor_name(fwd),
                                 what="the model's output", time_dim=fwd.time_dim)
    bt = y.movedim((bdim, tdim), (0, 1))
    return bt, _lengths_for(fwd, bt.shape[1])


def _anchor_name(fwd: SiteForward) -> str:
    return fwd.site if fwd.site != "input" else (fwd.capture.first_recurrent() or "input")


def _lengths_for(fwd: SiteForward, T_out: int):
    """The site's sequence lengths, when the output runs on the site's own time axis (a
    decoder's output is not measured with its encoder's source lengths)."""
    lengths = fwd.axes.lengths
    if lengths is not None and T_out == fwd.axes.T and T_out >= int(lengths.max()):
        return lengths
    return None


def _valid_mask(lengths: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor | None:
    if lengths is None:
        return None
    return torch.arange(T, device=device).unsqueeze(0) < lengths.to(device).unsqueeze(1)


def sample_losses(fwd: SiteForward, loss) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample (B,) or per-step (B, T') losses, and the output's lengths (or None)."""
    B = fwd.axes.B
    if callable(loss):
        out = loss(fwd.output)
        if not isinstance(out, torch.Tensor) or out.dim() not in (1, 2) or out.shape[0] != B:
            raise ValueError(f"a loss callable must return per-sample losses ({B},) or per-step "
                             f"losses ({B}, T); got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out, None
    y, lengths = output_sequence(fwd)
    if y.dim() == 2:  # (B, F): the model already reduced time to its final output
        if loss == "all":
            raise ValueError(f"loss='all' needs the output sequence (B, T, F), but the model "
                             f"returned {tuple(y.shape)}")
        return y.sum(-1), None
    per_step = y.reshape(y.shape[0], y.shape[1], -1).sum(-1)  # (B, T')
    mask = _valid_mask(lengths, *per_step.shape, per_step.device)
    if loss == "last":
        if lengths is None:
            return per_step[:, -1], None
        idx = (lengths.to(per_step.device) - 1).clamp_min(0).unsqueeze(1)
        return per_step.gather(1, idx).squeeze(1), lengths
    if mask is not None:
        per_step = per_step * mask
    return per_step, lengths
