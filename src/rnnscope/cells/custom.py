"""User-written cells: any module with forward(x_t, state) -> new_state.

`state` is a tensor (B, N) or a tuple of tensors (B, N_k); the new state has the same
structure. No closed form is known for such a cell, so its one-step Jacobians come from
autograd: torch.func.jacrev of one step, vmapped over the batch (torch.func works on a cell,
unlike on the fused nn.LSTM/nn.GRU). The state is flattened component after component, so for
nn.LSTMCell the flat state is (h, c).
"""

from __future__ import annotations

import torch
from torch import nn


def as_tuple(state) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def flatten_state(state) -> torch.Tensor:
    """(B, N) concatenation of the state's components."""
    return torch.cat(as_tuple(state), dim=-1)


def unflatten_state(flat: torch.Tensor, sizes: tuple[int, ...], is_tuple: bool):
    parts = flat.split(sizes, dim=-1)
    return tuple(parts) if is_tuple else parts[0]


def run(cell: nn.Module, x: torch.Tensor, state0) -> list:
    """Unroll a cell over x (B, T, I) from state0; returns the states after each step."""
    state = state0
    states = []
    for x_t in x.unbind(1):
        new = cell(x_t, state)
        if isinstance(state, (tuple, list)) != isinstance(new, (tuple, list)) or \
                len(as_tuple(new)) != len(as_tuple(state)):
            raise TypeError(f"{type(cell).__name__}.forward(x_t, state) must return a new state "
                            "with the same structure as `state` (a tensor, or a tuple of the "
                            "same length)")
        state = new
        states.append(state)
    return states


def step_jacobians(cell: nn.Module, x: torch.Tensor, prev_states: list) -> torch.Tensor:
    """Exact ∂s_n/∂s_{n-1} by autograd for every step n: (B, T, N, N), s flattened.

    prev_states[n] is the state entering step n (state0 first).
    """
    from torch.func import jacrev, vmap

    first = prev_states[0]
    is_tuple = isinstance(first, (tuple, list))
    sizes = tuple(t.shape[-1] for t in as_tuple(first))

    def one(x_b, s_b):  # one sample: x_b (I,), s_b (N,)
        s = unflatten_state(s_b.unsqueeze(0), sizes, is_tuple)
        return flatten_state(cell(x_b.unsqueeze(0), s))[0]

    jac = vmap(jacrev(one, argnums=1))
    out = [jac(x_t, flatten_state(s).detach()) for x_t, s in zip(x.unbind(1), prev_states)]
    return torch.stack(out, dim=1)
