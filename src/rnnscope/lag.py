"""lag_profile: how far back each step's loss reaches, ‖∂ℓ_t/∂x_s‖ for loss steps t and earlier s.

For a loss at every step (language models, taggers, seq2seq) the profile of the summed loss
mixes all steps' gradients and stops showing memory: a step close to many losses looks as
strong as one close to the output. The lag-resolved profile separates them: for loss positions
t and every step s, the per-sample norm of ∂ℓ_t/∂x_s, summarised by lag k = t − s.

All positions come from ONE forward. When the site is the input of a fused, unidirectional
nn.LSTM/GRU/RNN, the module's head is differentiated for all positions in one batched VJP and
the recurrence by one closed-form adjoint sweep over time (`lag_sweep`: several times faster
than a backward per position). Otherwise the per-step losses ℓ (B, T) are differentiated with
`torch.autograd.grad(..., is_grads_batched=True)` against one-hot grad_outputs, one per
position (a vmap over the backward). Samples do not interact, so the B sequences of a position
are one vector-Jacobian product, exactly as in `gradient_profile`; the result's
config["method"] says which path ran (and why the sweep was not used).

Shape legend: S samples (B), P loss positions, T steps of the measured site, F features.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import lag_sweep
from .checks import count_nonfinite, public
from .losses import check_loss_option, sample_losses
from .profile import _refuse_sample_mixing, cudnn_guard
from .results import LagProfile
from .site import forward_at_site, model_call


def _positions(positions, T: int, seed: int) -> torch.Tensor:
    """(P,) sorted loss positions: all T if an int ≥ T is asked, else that many drawn without
    replacement from a generator seeded with `seed`; a list is taken as given."""
    if isinstance(positions, bool):
        raise TypeError("positions must be an int (how many) or a list of steps; got a bool")
    if isinstance(positions, int):
        if positions <= 0:
            raise ValueError(f"positions must be a positive int; got {positions}")
        if positions >= T:
            return torch.arange(T)
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(T, generator=g)[:positions].sort().values
    try:
        items = list(positions)
    except TypeError:
        raise TypeError(f"positions must be an int or a list of ints; got {positions!r}") from None
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in
               (int(p) if isinstance(p, torch.Tensor) and not p.is_floating_point()
                and p.dim() == 0 else p for p in items)):
        raise TypeError(f"positions must be an int or a list of ints; got {positions!r}")
    pos = torch.as_tensor([int(p) for p in items], dtype=torch.int64)
    if pos.numel() == 0 or pos.dim() != 1:
        raise ValueError("positions must name at least one step")
    bad = pos[(pos < 0) | (pos >= T)]
    if bad.numel():
        raise ValueError(f"positions must be steps in [0, T={T}); got {bad.tolist()}")
    if pos.unique().numel() != pos.numel():
        raise ValueError(f"positions must be distinct; got {pos.tolist()}")
    return pos.sort().values


@public("lag_profile", grad=True, call=True)
def lag_profile(module: nn.Module, inputs, *, positions: int | Sequence[int] = 16, at=None,
                loss: Callable[[Any], torch.Tensor] | None = None,
                forward_args=(), forward_kwargs=None, time_dim: int | None = None,
                seed: int = 0) -> LagProfile:
    """Exact lag-resolved gradient flow ‖∂ℓ_t/∂x_s‖ per sample, for loss positions t.

    Args:
        module, inputs, at, forward_args, forward_kwargs, time_dim: as in `gradient_profile`
            (token ids, PackedSequences, seq-first wrappers, step-wise decoders).
        positions: an int draws that many loss positions (seeded with `seed`; all steps if
            it is ≥ T), a list gives them exactly.
        loss: None (ℓ_t = the sum of the output features at step t; past a sequence's end 0)
            or a callable on what the model returns, giving per-step losses (B, T) on the
            site's time axis (e.g. the token-level cross-entropy with reduction='none').

    Returns:
        `LagProfile`: `.per_sample` (S, P, T) norms of ∂ℓ_{t_p}/∂x_s, `.by_lag()` (K,) the
        mean over samples and positions at lag k = t − s, decay rate, half-life, effective
        memory. Steps past a sequence's end, and positions past it, are not measured.

    Example:
        >>> lstm = nn.LSTM(3, 8, batch_first=True)
        >>> lp = lag_profile(lstm, torch.randn(4, 30, 3), positions=[10, 29])
        >>> lp.by_lag().shape
        torch.Size([30])
    """
    check_loss_option(loss, allow_none=True)
    if loss == "last":
        raise ValueError("lag_profile needs a loss at every step: loss=None (the sum of the "
                         "output features at each step) or a callable returning (B, T) losses")
    call = model_call(module, inputs, forward_args, forward_kwargs)
    _refuse_sample_mixing(call.model)
    with cudnn_guard(call.model, call.inputs):
        with lag_sweep.raw_outputs(call.model) as raw:
            fwd = forward_at_site(call, at=at, time_dim=time_dim)
        losses, _ = sample_losses(fwd, "all" if loss is None else loss)
        B, T = fwd.axes.B, fwd.axes.T
        if losses.dim() != 2 or losses.shape[1] != T:
            raise ValueError(f"lag_profile needs per-step losses ({B}, T={T}) on the time axis "
                             f"of '{fwd.site}'; the loss gave {tuple(losses.shape)}")
        pos = _positions(positions, T, seed)
        lengths = fwd.axes.lengths
        P = pos.numel()
        onehot = torch.zeros(P, B, T, dtype=losses.dtype, device=losses.device)
        onehot[torch.arange(P), :, pos.to(losses.device)] = 1.0
        if lengths is not None:  # a position past a sequence's end has no loss for it
            valid = pos.unsqueeze(1) < lengths.unsqueeze(0)  # (P, B)
            onehot = onehot * valid.to(onehot).unsqueeze(-1)
        site, why_not = lag_sweep.plan(fwd, losses, raw)
        if site is not None:  # the site is a fused module's input: one adjoint sweep
            per_sample, method = lag_sweep.lag_norms(site, losses, onehot, _batched_vjps)
        else:
            grads, method = _batched_vjps(losses, fwd.tensors, onehot)
            method = f"{method} (no adjoint sweep: {why_not})"
            per_pos = []
            for p in range(P):
                g = fwd.batch_major([gr[p] for gr in grads])  # (B, T, F)
                per_pos.append(g.detach().to("cpu", torch.float64).norm(dim=-1))
            per_sample = torch.stack(per_pos, dim=1)  # (B, P, T)
    bad = count_nonfinite(per_sample)
    if bad:
        warnings.warn(f"lag_profile: {bad} non-finite gradient norm(s); the summaries are nan",
                      RuntimeWarning, stacklevel=2)
    config = {"site": fwd.site, "samples": B, "seq_len": T, "positions": pos.tolist(),
              "seed": seed, "method": method, "loss": "sum of outputs" if loss is None
              else "custom", "dtype": str(losses.dtype).replace("torch.", "")}
    return LagProfile(per_sample, pos, lengths=lengths, site=fwd.site, nonfinite=bad,
                      config=config)


def _batched_vjps(losses: torch.Tensor, tensors: list, onehot: torch.Tensor):
    """Per-position VJPs: one vmapped backward; a loop over positions only if vmap cannot run
    the model's backward (then said in the result's config)."""
    try:
        grads = torch.autograd.grad(losses, tensors, grad_outputs=onehot,
                                    is_grads_batched=True, allow_unused=True,
                                    retain_graph=True)  # kept for the fallback below
        method = "batched"
    except RuntimeError as e:
        if "vmap" not in str(e).lower() and "batched" not in str(e).lower():
            raise
        rows = []
        for p in range(onehot.shape[0]):
            rows.append(torch.autograd.grad(losses, tensors, grad_outputs=onehot[p],
                                            allow_unused=True,
                                            retain_graph=p < onehot.shape[0] - 1))
        grads = [None if rows[0][i] is None else torch.stack([r[i] for r in rows])
                 for i in range(len(tensors))]
        method = "loop (vmap unsupported by the model's backward)"
    P = onehot.shape[0]
    grads = [torch.zeros((P,) + tuple(t.shape), dtype=t.dtype, device=t.device) if g is None
             else g for g, t in zip(grads, tensors)]
    return grads, method
