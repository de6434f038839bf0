"""The option types of the public functions, written once.

Public functions take the measured module first (`module`, or a `Trace` from `replay` where an
analysis accepts one), then its inputs and initial state, then keyword-only options after `*`,
as torch.func does (`jacrev(func, argnums=0, *, has_aux=False, chunk_size=None)`). The
string-valued options are `Literal` types, so a type checker and an editor show the choices;
the functions still check them at run time and name themselves in the error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

Keep = Literal["norms", "full"]
"""What a Jacobian or gradient result holds: "norms" (the default everywhere: per-step norms
and shares, memory O(B·T·N)) or "full" (also the (B, T, N, N) matrices or gradient tensors)."""

State = Literal["c", "h", "full"]
"""Which recurrent state a Jacobian is taken of: LSTM "c" (its default), "h" or "full" (h, c
stacked); RNN/GRU "h" only. None picks the module's default."""

Method = Literal["auto", "closed", "autograd"]
"""How one-step Jacobians are built: closed forms, torch.func autograd (cells only), or
whichever applies ("auto")."""

LossName = Literal["last", "all"]
"""The built-in losses: the output features summed at each sequence's last step, or at all."""

Loss = LossName | Callable[[Any], torch.Tensor]
"""A built-in loss or a callable on what the model returns -> (B,) or (B, T) losses."""
