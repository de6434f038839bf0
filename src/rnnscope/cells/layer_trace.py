"""The per-layer, per-direction record a cell's `run` produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from collections.abc import Callable

import torch


@dataclass(frozen=True)
class LayerTrace:
    """Everything one layer and direction computed, batch-major, in input-position order.

    Shapes: x (B, T, I_l) the layer's input; h (B, T, H_out); c (B, T, H) or None; gates:
    name -> (B, T, H); h0 (B, H_out); c0 (B, H) or None.

    Direction 1 of a bidirectional layer runs backward in time: its recurrence visits positions
    T-1, T-2, ..., 0, and h[:, t] is its state after reading x[:, t] (as in PyTorch's output).
    `steps_h` / `steps_c` hold the same states as separate tensors in *processing* order (the
    autograd nodes the recurrence actually passes on), so that total state gradients can be
    taken with respect to them.

    `c` and `gates` are stacked on first access (most measurements never need them, and a
    (B, T, 5H) copy per layer is not free); they join the autograd graph if grad mode is on then.

    Packed (variable-length) inputs: `lengths` (B,) int64 (CPU) holds each sample's length, in
    the batch's original order; it is None for an ordinary input. Position t of sample b is
    valid when t < lengths[b] (`valid`). At an invalid position the recurrence did not run: the
    state is carried through unchanged, so h/c there hold the carried state (direction 0: the
    state at lengths[b] − 1; direction 1: its initial state h0/c0), `steps_h`/`steps_c` hold the
    same carried values, and `prev_h`/`prev_c` stay the true states entering every step. The
    gates at invalid positions were computed on padding and are not valid (keep them out of any
    statistic with `valid`); `x` is zero there.
    """

    x: torch.Tensor
    h: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor | None
    reverse: bool
    steps_h: tuple[torch.Tensor, ...] = field(repr=False)
    steps_c: tuple[torch.Tensor, ...] | None = field(repr=False, default=None)
    gate_builder: Callable[[], dict] | None = field(repr=False, default=None)
    lengths: torch.Tensor | None = field(repr=False, default=None)

    @cached_property
    def valid(self) -> torch.Tensor | None:
        """(B, T) bool, position order: True where t < lengths[b]; None for unpacked inputs."""
        if self.lengths is None:
            return None
        T = self.h.shape[1]
        return torch.arange(T, device=self.h.device) < self.lengths.to(self.h.device)[:, None]

    @cached_property
    def c(self) -> torch.Tensor | None:
        """(B, T, H) cell states (LSTM), None otherwise."""
        return None if self.steps_c is None else stack_steps(list(self.steps_c), self.reverse)

    @cached_property
    def gates(self) -> dict[str, torch.Tensor]:
        """Gate name -> (B, T, H) activations ({} for a vanilla RNN)."""
        return {} if self.gate_builder is None else self.gate_builder()

    def in_steps(self, tensor: torch.Tensor) -> torch.Tensor:
        """Reorder a (B, T, ...) position-order tensor into processing order.

        Direction 1 needs a flipped copy; for a tensor outside any graph it is made once and
        kept (callers that take `in_steps(t)[:, n]` chunk after chunk would otherwise copy the
        whole sequence per chunk: O(T²)). Prefer `step_range` for a slice of steps.
        """
        if not self.reverse:
            return tensor
        if tensor.requires_grad:  # a graph tensor: never hand out a cached, graph-less copy
            return tensor.flip(1)
        hit = self._flipped.get(id(tensor))
        if hit is not None and hit[0] is tensor and hit[1] == tensor._version:
            return hit[2]
        out = tensor.flip(1)
        self._flipped[id(tensor)] = (tensor, tensor._version, out)
        return out

    def step_range(self, tensor: torch.Tensor, n: slice) -> torch.Tensor:
        """Processing steps n (a slice with step 1) of a (B, T, ...) position-order tensor:
        (B, S, ...), at a cost proportional to S (only the slice is flipped for direction 1)."""
        if not self.reverse:
            return tensor[:, n]
        T = tensor.shape[1]
        start, stop, step = n.indices(T)
        if step != 1:
            raise ValueError(f"step_range takes a slice with step 1; got {n}")
        return tensor[:, T - stop: T - start].flip(1) if stop > start else tensor[:, :0]

    @cached_property
    def _flipped(self) -> dict:
        """id -> (tensor, version, flipped copy): `in_steps`'s cache."""
        return {}

    @cached_property
    def prev_h(self) -> torch.Tensor:
        """(B, T, H_out) state entering each processing step n (h0 for n = 0); built once,
        since Jacobian sweeps read it chunk by chunk."""
        hs = self.in_steps(self.h)
        return torch.cat([self.h0.unsqueeze(1), hs[:, :-1]], dim=1)

    @cached_property
    def prev_c(self) -> torch.Tensor:
        """(B, T, H) cell state entering each processing step n (c0 for n = 0); built once."""
        cs = self.in_steps(self.c)
        return torch.cat([self.c0.unsqueeze(1), cs[:, :-1]], dim=1)


def stack_steps(steps: list[torch.Tensor], reverse: bool) -> torch.Tensor:
    """Stack per-step (B, ...) tensors given in processing order into (B, T, ...) positions."""
    return torch.stack(steps[::-1] if reverse else steps, dim=1)


def step_masks(lengths: torch.Tensor | None, T: int, device, reverse: bool) -> list:
    """Per processing step, a (B, 1) bool mask of the samples whose position is valid, or None
    where every sample is valid (no masking needed there). Built once and unbound once (see
    DESIGN traps: no per-step indexing into a big tensor)."""
    if lengths is None:
        return [None] * T
    min_len = int(lengths.min())
    if min_len >= T:
        return [None] * T
    valid = torch.arange(T, device=device) < lengths.to(device)[:, None]  # (B, T)
    cols = valid.unsqueeze(-1).unbind(1)
    masks = [None if t < min_len else cols[t] for t in range(T)]
    return masks[::-1] if reverse else masks
