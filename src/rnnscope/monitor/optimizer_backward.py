"""Whether the backward pass running now is one the optimizer will see.

The monitor's statistics describe the gradient that reaches the parameters' `.grad`, summed
over every backward of the step (gradient accumulation, retain_graph). A
`torch.autograd.grad` call through the same graph (a gradient penalty, a saliency map, a
diagnostic) fires the same tensor hooks but leaves `.grad` alone, and so does a
`backward(inputs=...)` that names none of the model's parameters: their gradients must not
be added in.

PyTorch tells, inside a backward, whether a node will run: `_will_engine_execute_node` on a
parameter's gradient accumulator is True when this backward accumulates into its `.grad`,
False when the parameter is left out, and raises under `torch.autograd.grad` (which never
runs accumulators). `torch.autograd.graph.register_multi_grad_hook` asks the engine the same
way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.autograd.graph import get_gradient_edge


def feeds_grad(params: Iterable[torch.Tensor]) -> bool:
    """Inside a backward pass: whether it accumulates into the `.grad` of at least one of
    `params` (those that require grad). True when none requires grad (nothing tells the
    passes apart, and every backward is counted) and where PyTorch cannot say."""
    probes = [p for p in params if p.requires_grad and p.grad_fn is None]
    if not probes:
        return True
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    if will_run is None:  # an older PyTorch without the query: count, as before
        return True
    for p in probes:
        try:
            if will_run(get_gradient_edge(p).node):
                return True
        except RuntimeError as e:
            # "A leaf node was passed to _will_engine_execute_node but we are currently
            # running autograd.grad()": nothing of this pass reaches .grad
            return "autograd.grad" not in str(e)
    return False


class OptimizerBackward:
    """`feeds_grad` of a model's parameters, asked once per backward pass (a pass fires many
    tensor hooks; the answer is kept under the engine's graph-task id)."""

    def __init__(self, params: Callable[[], Iterable[torch.Tensor]]):
        self._params = params
        self._task: int | None = None
        self._feeds = True

    def __call__(self) -> bool:
        current = getattr(torch._C, "_current_graph_task_id", None)
        task = current() if current is not None else None
        if task is None or task == -1:  # outside a backward (not a hook call): nothing to tell
            return True
        if task != self._task:
            self._task, self._feeds = task, feeds_grad(self._params())
        return self._feeds

    def only(self, hook: Callable) -> Callable:
        """`hook` (a tensor hook returning None) called only in passes that feed `.grad`."""
        def counted(g):
            if self():
                hook(g)
            return None

        return counted
