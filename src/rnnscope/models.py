"""The reference models that `compare` and the experiments build: RNN, LSTM, GRU, the modern
recurrences of rnnscope.modern and a small causal Transformer encoder, with the forget-bias
initialisations of rnnscope.gates (LSTM and GRU only)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_number
from .gates import chrono_init, init_forget_bias
from .modern import LRU, RGLRU, SLSTM, MinGRU, MinLSTM, SelectiveSSM

# The one table of model kinds: name -> (display name, class or None for the built-ins below).
# The modern recurrences take (input_size, hidden_size, batch_first=True) like nn.GRU.
KINDS = {
    "rnn": ("RNN", None), "lstm": ("LSTM", None), "gru": ("GRU", None),
    "mingru": ("minGRU", MinGRU), "minlstm": ("minLSTM", MinLSTM), "lru": ("LRU", LRU),
    "rglru": ("RG-LRU", RGLRU), "mamba": ("Mamba (S6)", SelectiveSSM), "slstm": ("sLSTM", SLSTM),
    "transformer": ("Transformer", None),
}
MODEL_KINDS = tuple(KINDS)
MODERN_KINDS = tuple(k for k, (_, cls) in KINDS.items() if cls is not None)
DEFAULT_KINDS = ("rnn", "lstm", "gru", "transformer")  # `compare` without --models
DISPLAY = {k: name for k, (name, _) in KINDS.items()}
FORGET_INITS = ("default", "1.0", "chrono")


class CausalTransformer(nn.Module):
    """A small causal Transformer encoder over (B, T, I) sequences, returning (B, T, d_model).

    Input projection, fixed sinusoidal positions, `num_layers` pre-norm encoder layers with
    causal attention (step t attends to steps ≤ t, like an RNN reading left to right), no
    dropout. The layers are `nn.TransformerEncoderLayer`s (their parameters and state_dict),
    run by `forward` through `F.scaled_dot_product_attention(..., is_causal=True)`: no (T, T)
    mask is ever built and PyTorch's fused kernel attends in blocks, so memory is linear in T
    (the encoder's own forward with `generate_square_subsequent_mask` holds T² floats, 0.4 GB
    at T = 10 000, twice over while it checks the mask is causal).
    """

    def __init__(self, input_size: int, d_model: int = 128, nhead: int = 4, num_layers: int = 1,
                 dim_feedforward: int | None = None):
        super().__init__()
        for name, v in (("input_size", input_size), ("d_model", d_model), ("nhead", nhead),
                        ("num_layers", num_layers)):
            check_number("CausalTransformer", name, v, low=1, integer=True)
        if d_model % nhead:
            raise ValueError(f"d_model must be divisible by nhead; got d_model={d_model}, "
                             f"nhead={nhead}")
        self.input_size = input_size
        self.d_model = d_model
        self.proj = nn.Linear(input_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward or 2 * d_model,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def positions(self, T: int, like: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(T, dtype=torch.float64).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float64)
                        * (-math.log(10000.0) / self.d_model))
        pe = torch.zeros(T, self.d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : self.d_model // 2]
        return pe.to(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, I) -> (B, T, d_model)
        T = x.shape[1]
        z = self.proj(x) + self.positions(T, x)  # (B, T, d)
        for layer in self.encoder.layers:  # pre-norm: z + SA(LN(z)), then z + FF(LN(z))
            z = z + self._attention(layer.self_attn, layer.norm1(z))
            z = z + layer.linear2(F.relu(layer.linear1(layer.norm2(z))))
        return z

    @staticmethod
    def _attention(attn: nn.MultiheadAttention, z: torch.Tensor) -> torch.Tensor:
        """Causal multi-head self-attention with `attn`'s weights, (B, T, d) -> (B, T, d)."""
        B, T, d = z.shape
        heads = attn.num_heads
        q, k, v = F.linear(z, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d/heads)
        return attn.out_proj(y.transpose(1, 2).reshape(B, T, d))


def build_model(kind: str, input_size: int, hidden_size: int, *, num_layers: int = 1,
                forget_init: str = "default", t_max: int | None = None,
                generator: torch.Generator | None = None) -> nn.Module:
    """A batch-first model of the given kind (`KINDS`); `forget_init` ("default", "1.0",
    "chrono") applies to LSTM and GRU (chrono needs t_max, usually the sequence length); the
    modern recurrences keep their papers' initialisations."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}; got {kind!r}")
    if forget_init not in FORGET_INITS:
        raise ValueError(f"forget_init must be one of {', '.join(FORGET_INITS)}; got "
                         f"{forget_init!r}")
    for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                    ("num_layers", num_layers)):
        check_number("build_model", name, v, low=1, integer=True)
    check_number("build_model", "t_max", t_max, low=0, integer=True, allow_none=True)
    if kind == "transformer":
        nhead = 4 if hidden_size % 4 == 0 else 1
        return CausalTransformer(input_size, hidden_size, nhead, num_layers)
    modern = KINDS[kind][1]
    if modern is not None:
        if num_layers != 1:
            raise ValueError(f"a {DISPLAY[kind]} model has one layer here; got "
                             f"num_layers={num_layers} (use --layers 1 with it)")
        return modern(input_size, hidden_size, batch_first=True)
    cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
    m = cls(input_size, hidden_size, num_layers=num_layers, batch_first=True)
    if kind != "rnn" and forget_init == "1.0":
        init_forget_bias(m, 1.0)
    elif kind != "rnn" and forget_init == "chrono":
        chrono_init(m, max(t_max or 0, 3), generator=generator)
    return m
