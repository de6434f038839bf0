"""Statistics declared with their reduction, so that distributed sync is one generic step
(torchmetrics' `add_state(name, default, dist_reduce_fx=...)`).

Every value is a float64 CPU tensor. Under torch.distributed each rank's values are reduced
with their declared op (sum or max); vectors whose lengths differ across ranks (sequences of
different lengths) are zero-padded to the longest first, which is exact for sums.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("sum", "max")


class StatSet:
    """Named tensors, each with a reduction: "sum" (counts, sums of per-sample norms) or "max"
    (values already identical on every rank, e.g. norms of DDP-averaged parameter gradients)."""

    def __init__(self):
        self.values: dict = {}
        self.reductions: dict = {}

    def add(self, name, value, reduce: str) -> None:
        """Accumulate `value` into statistic `name` (any hashable: the monitor uses
        (statistic, submodule, state, sub-key...) tuples) with its declared reduction."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}")
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64 and \
                value.device.type == "cpu" and not value.requires_grad:
            t = value  # the usual case, as the statistics hand them over: no conversion
        else:
            t = torch.as_tensor(value).detach().to("cpu", torch.float64)
        if name in self.values:
            if self.reductions[name] != reduce:
                raise ValueError(f"statistic {name!r} was declared with reduce="
                                 f"{self.reductions[name]!r}")
            old = self.values[name]
            if old.shape != t.shape:
                n = max(old.numel(), t.numel())
                old = torch.nn.functional.pad(old, (0, n - old.numel()))
                t = torch.nn.functional.pad(t, (0, n - t.numel()))
            t = old + t if reduce == "sum" else torch.maximum(old, t)
        self.values[name] = t
        self.reductions[name] = reduce

    def get(self, name: str, default=None):
        return self.values.get(name, default)

    def sync(self, group=None) -> None:
        """Reduce every statistic across the ranks of `group` (no-op without distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size(group) == 1:
            return
        names = sorted(self.values, key=repr)  # names may be tuples of mixed types
        # Every rank must hold the same names; an absent statistic reduces as zeros.
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, {n: (self.reductions[n], self.values[n].numel())
                                          for n in names}, group=group)
        spec = {}
        for d in gathered:
            for n, (red, size) in d.items():
                spec[n] = (red, max(size, spec.get(n, (red, 0))[1]))
        for op_name, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
            mine = [n for n in sorted(spec, key=repr) if spec[n][0] == op_name]
            if not mine:
                continue
            flat = torch.cat([self._padded(n, spec[n][1]) for n in mine])
            dist.all_reduce(flat, op=op, group=group)
            off = 0
            for n in mine:
                size = spec[n][1]
                old = self.values.get(n)
                out = flat[off:off + size].clone()
                # keep scalars scalar (and any shape whose size did not change)
                self.values[n] = out.reshape(old.shape) if old is not None and \
                    old.numel() == size else out
                self.reductions[n] = op_name
                off += size

    def _padded(self, name: str, size: int) -> torch.Tensor:
        t = self.values.get(name, torch.zeros(0, dtype=torch.float64)).reshape(-1)
        return torch.nn.functional.pad(t, (0, size - t.numel()))
