"""What a supported recurrent module is: its kind, sizes and per-layer parameter views.

This is the one dispatch table of the package (DESIGN habit 5): every function that accepts a
recurrent module asks `describe(module)` and gets either a `RecurrentSpec` or a clear error.

Shape legend: B batch, T time, I input features, H hidden units, P projection size (H_out = P
when proj_size > 0, else H), L layers, D directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Gate names in PyTorch's weight-block order.
GATES = {"rnn": (), "lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n")}
# How many H-sized blocks weight_ih / weight_hh stack for each kind.
BLOCKS = {"rnn": 1, "lstm": 4, "gru": 3}
# The gate that keeps the old state (the "highway"): LSTM forget f, GRU retain z.
RETAIN_GATE = {"lstm": "f", "gru": "z"}


@dataclass(frozen=True)
class LayerParams:
    """Views (not copies) of one layer and direction's parameters.

    Shapes: w_ih (G·H, I_l), w_hh (G·H, H_out), b_ih/b_hh (G·H,) or None, w_hr (P, H) or None.
    """

    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None
    w_hr: torch.Tensor | None = None


@dataclass(frozen=True)
class RecurrentSpec:
    """A supported recurrent module described once.

    Attributes:
        kind: "rnn", "lstm" or "gru".
        nonlinearity: "tanh" or "relu" (vanilla RNN only; "tanh" otherwise).
        is_cell: True for nn.RNNCell / nn.LSTMCell / nn.GRUCell (one step per call).
        input_size, hidden_size, proj_size (0 if none), num_layers, num_directions.
        batch_first: layout of the module's own inputs (cells: always treated as batch-first).
    """

    module: nn.Module
    kind: str
    nonlinearity: str
    is_cell: bool
    input_size: int
    hidden_size: int
    proj_size: int
    num_layers: int
    num_directions: int
    batch_first: bool
    bias: bool
    dropout: float

    @property
    def hidden_out(self) -> int:
        """H_out: size of h (P with a projection, else H)."""
        return self.proj_size or self.hidden_size

    @property
    def gate_names(self) -> tuple[str, ...]:
        return GATES[self.kind]

    @property
    def has_cell_state(self) -> bool:
        return self.kind == "lstm"

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.num_directions * self.hidden_out

    def params(self, layer: int = 0, direction: int = 0) -> LayerParams:
        """The module's own parameter tensors for one layer and direction (no copies)."""
        self.check_layer(layer, direction)
        m = self.module
        if self.is_cell:
            return LayerParams(m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh)
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda name: getattr(m, name + sfx) if hasattr(m, name + sfx) else None  # noqa: E731
        return LayerParams(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
                           get("weight_hr"))

    def check_layer(self, layer: int, direction: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}) for this "
                             f"{type(self.module).__name__}; got {layer!r}")
        if not isinstance(direction, int) or not 0 <= direction < self.num_directions:
            raise ValueError(f"direction must be an int in [0, {self.num_directions}) for this "
                             f"{type(self.module).__name__}; got {direction!r}")


_FUSED = {nn.RNN: "rnn", nn.LSTM: "lstm", nn.GRU: "gru"}
_CELLS = {nn.RNNCell: "rnn", nn.LSTMCell: "lstm", nn.GRUCell: "gru"}


def is_recurrent(module: nn.Module) -> bool:
    """True for the module types `describe` accepts."""
    return type(module) in _FUSED or type(module) in _CELLS


def describe(module: nn.Module) -> RecurrentSpec:
    """Describe a fused nn.RNN/LSTM/GRU or an nn.RNNCell/LSTMCell/GRUCell, or refuse it.

    Subclasses are refused on purpose: their forward may differ from PyTorch's equations, and a
    replay that silently computed something else would be worse than an error.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module (nn.RNN, nn.LSTM, nn.GRU or a cell); "
                        f"got {type(module).__name__}")
    t = type(module)
    if t in _FUSED:
        kind = _FUSED[t]
        mode = getattr(module, "mode", "")
        nonlin = "relu" if mode == "RNN_RELU" else "tanh"
        return RecurrentSpec(module, kind, nonlin, False, module.input_size, module.hidden_size,
                             getattr(module, "proj_size", 0), module.num_layers,
                             2 if module.bidirectional else 1, module.batch_first, module.bias,
                             float(module.dropout))
    if t in _CELLS:
        kind = _CELLS[t]
        nonlin = getattr(module, "nonlinearity", "tanh")
        return RecurrentSpec(module, kind, nonlin, True, module.input_size, module.hidden_size, 0,
                             1, 1, True, module.bias, 0.0)
    supported = "nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell"
    hint = ""
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        hint = (f" ({t.__name__} subclasses {t.__mro__[1].__name__}, but its forward may differ "
                "from PyTorch's equations, so it is not replayed; pass the inner module)")
    raise TypeError(f"cannot replay a {t.__name__}: expected one of {supported}{hint}")
