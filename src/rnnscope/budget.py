"""Memory estimates, checked before any work: a request that cannot fit is refused up front
with the estimate and the memory available, instead of reaching the allocator (or the kernel's
OOM killer) minutes later.

The estimates are deliberately conservative upper bounds of the peak memory rnnscope itself
allocates (not counting the Python process, ~0.3 GB). Each formula below is stated next to
the analysis it covers and was checked against the peak RSS measured with `compare_study` on
the 2-core CPU machine (float32, I=64, J=4 Jacobian samples, H=128 unless said; Δ is
ru_maxrss after minus before, one model per process):

    kind         T     S    measured Δ peak RSS   estimate
    RNN          600   50   1.53 GB               1.89 GB
    GRU          600   50   1.60 GB               2.01 GB
    LSTM         600   50   1.95 GB               2.55 GB
    LSTM (L=3)   300   400  3.75 GB               4.94 GB
    RNN (H=256)  600   10   5.71 GB               6.98 GB
    Transformer  200   50   0.15 GB               0.16 GB
    Transformer  1200  50   0.80 GB               0.94 GB
    Transformer  2400  50   0.97 GB               1.87 GB

Available memory is MemAvailable from /proc/meminfo (else os.sysconf's available physical
pages). The environment variable RNNSCOPE_MEMORY_LIMIT (bytes, or with a K/M/G/T suffix)
replaces it, e.g. to leave room for other jobs or to allow more than the formula thinks fits.
"""

from __future__ import annotations

import os

from .recurrent import BLOCKS
from .spectral import steps_per_chunk
from .stream import CHUNK_ELEMENTS, GROUP_SAMPLE_STEPS, STREAM_ELEMENTS, STREAM_STEPS

GIB = 1024 ** 3


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "KMGT" else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"RNNSCOPE_MEMORY_LIMIT must be a size like 8G or 8000000000; got "
                         f"{text!r}") from None
    if not value > 0:
        raise ValueError(f"RNNSCOPE_MEMORY_LIMIT must be positive; got {text!r}")
    return int(value)


def available_memory() -> tuple[int | None, str]:
    """(bytes available to rnnscope, where the figure comes from); (None, ...) if unknown."""
    limit = os.environ.get("RNNSCOPE_MEMORY_LIMIT")
    if limit:
        return _parse_size(limit), "RNNSCOPE_MEMORY_LIMIT"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_memory(fn: str, estimate: float, what: str, fix: str) -> None:
    """Refuse when `estimate` bytes exceed the memory available; one line with both figures."""
    have, source = available_memory()
    if have is None or estimate <= have:
        return
    raise MemoryError(f"{fn}: {what} needs an estimated {format_bytes(estimate)} of memory but "
                      f"{format_bytes(have)} is {source} on this machine; {fix}")


# ---------------------------------------------------------------------------------------------
# Per-analysis formulas. S samples, T steps, I input features, H hidden units, P projection,
# L layers, D directions, G gate blocks (RNN 1, GRU 3, LSTM 4), J Jacobian samples, e bytes per
# element of the model's dtype.


def recurrent_bytes(kind: str, *, input_size: int, hidden_size: int, num_layers: int = 1,
                    directions: int = 1, proj_size: int = 0, samples: int, seq_len: int,
                    jac_samples: int = 0, elem: int = 4, split: bool = False):
    """Peak bytes of the analyses of one nn.RNN/LSTM/GRU on S sequences of T steps
    (with `split`, (parameter bytes, analysis bytes)).

    - parameters, twice (the module and the replay's views/casts):
      2·e·D·Σ_l G·H·(I_l + H_out + 2) (+ P·H per LSTM projection);
    - past 4096 steps (or 2^26 gate values) the sequence analyses stream over time
      (rnnscope.stream; see the comment in the code for the terms); below:
    - the sequence analyses (gradient profile: fused forward with its graph and backward;
      state gradients: the replay with its graph; gate statistics: float64 gate copies and a
      sort): e/4 · 16·(G + 1) bytes per sample, step, layer, direction and unit (measured:
      ≤ 60 for an LSTM, where this gives 80), plus the drawn inputs in float64, the model's
      dtype and their gradient: S·T·I·(8 + 3e);
    - step and span Jacobians on J samples stream over time: at most 64 steps of (J, ·, M, M)
      one-step Jacobians of the running state (M = H_out + H for an LSTM, else H) and of the
      reported ones (N = H) are held at once with their float64 copies,
      J·min(T, 64)·(e·M² + 10·e·N²), plus the per-step results kept for every step (direct
      diagonals, norms, shares in float64): J·T·8·(2·N + 8).
    """
    G, H, L, D, S, T = BLOCKS[kind], hidden_size, num_layers, directions, samples, seq_len
    H_out = proj_size or H
    params = 0
    for layer in range(L):
        i_l = input_size if layer == 0 else D * H_out
        params += D * (G * H * (i_l + H_out + 2) + (proj_size * H if proj_size else 0))
    inputs = S * T * input_size * (8 + 3 * elem)
    if T > STREAM_STEPS or S * T * G * H > STREAM_ELEMENTS:
        # streamed over time (rnnscope.stream): every layer's outputs and retain-gate values,
        # the output gradients going down one layer at a time, the order statistics' copy of
        # one layer's gate values (values + int64 indices) and (B, T) float64 norms; plus one
        # chunk's graph (≈ CHUNK_ELEMENTS gate values, ×8 for the intermediates and their
        # gradients) and the replay of the Jacobian samples with its stacked gates.
        seq = (S * T * (L * D * (H_out + H) * elem + 2 * D * H_out * elem + H * (elem + 8) + 32)
               + 8 * CHUNK_ELEMENTS * elem + jac_samples * T * 16 * H * elem + inputs)
    else:
        seq = S * T * L * D * H * 16 * (G + 1) * elem / 4 + inputs
    M = H_out + H if kind == "lstm" else H
    jac = (jac_samples * min(T, 64) * (elem * M * M + 10 * elem * H * H)
           + jac_samples * T * 8 * (2 * H + 8))
    return (2 * elem * params, seq + jac) if split else 2 * elem * params + seq + jac


# State values per hidden unit of the modern recurrences `compare` builds (models.KINDS): the
# LRU's complex state counts twice, the S6 layer has 16 states per channel, sLSTM four parts.
MODERN_STATE = {"mingru": 1, "minlstm": 1, "lru": 2, "rglru": 1, "mamba": 16, "slstm": 4}


def modern_bytes(kind: str, *, input_size: int, hidden_size: int, samples: int, seq_len: int,
                 jac_samples: int, elem: int = 4) -> tuple[float, float]:
    """(parameter bytes, analysis bytes) of `compare` on one modern recurrence.

    Parameters: at most 4·H·(I + H) + 4·H values, twice. Analyses: the batch's states,
    decays and their gradients with the graph, 16 values per state value (N = MODERN_STATE·H)
    per sample and step in the model's dtype, plus the drawn inputs S·T·I·(8 + 3e); the
    Jacobian samples' per-step results in float64 (8 arrays of J·T·N); sLSTM also holds its
    closed-form dense step Jacobians, built a chunk of `spectral.steps_per_chunk` steps at a
    time (`SLSTM.step_jacobian_fn`): J·chunk·(4H)² values, three copies (the chunk, its float64
    form, the span products).
    """
    H, S, T = hidden_size, samples, seq_len
    N = MODERN_STATE[kind] * H
    params = 4 * H * (input_size + H) + 4 * H
    seq = S * T * N * 16 * elem + S * T * input_size * (8 + 3 * elem)
    jac = jac_samples * T * N * 8 * 8
    if kind == "slstm":
        chunk = steps_per_chunk(jac_samples, 4 * H)  # jacobians._chunk's default
        jac += 3 * jac_samples * min(T, chunk) * (4 * H) ** 2 * 8
    return 2 * elem * params, seq + jac


def transformer_bytes(*, input_size: int, d_model: int, nhead: int, num_layers: int,
                      samples: int, seq_len: int, elem: int = 4, split: bool = False):
    """Peak bytes of the gradient profile of the causal Transformer `compare` builds.

    Parameters (≈ 6·d² + d·I per layer with a 2·d feed-forward, twice); activations saved for
    the backward, budgeted at 28·d values per sample, step and layer (q, k, v, attention
    output, two norms, the feed-forward's 2·d hidden and their gradients); and the drawn inputs
    S·T·I·(8 + 3e). No S·heads·T² term and no T² mask: the model calls
    `scaled_dot_product_attention(..., is_causal=True)`, whose fused CPU kernel attends in
    blocks (measured with the encoder's own masked forward, which also held a (T, T) mask:
    0.80 GB at T=1200 and 0.97 GB at T=2400, S=50, d=128; the formula gives 0.94 and 1.87 GB).
    """
    S, T, d = samples, seq_len, d_model
    params = num_layers * (6 * d * d + 10 * d) + d * (input_size + 1)
    if T > STREAM_STEPS:  # the profile is taken a group of samples at a time (profile.py)
        S_act = min(S, max(1, GROUP_SAMPLE_STEPS // T))
    else:
        S_act = S
    acts = S_act * T * d * 28 * num_layers * elem + S * T * 16
    work = acts + S * T * input_size * (8 + 3 * elem)
    return (2 * elem * params, work) if split else 2 * elem * params + work


def compare_bytes(models, *, seq_len: int, hidden_size: int, input_size: int, samples: int,
                  num_layers: int, jac_samples: int) -> float:
    """`compare_study`: the models live together, and their analyses run one after another,
    so the estimate is every model's parameters plus the largest analysis."""
    per_model = []
    for kind in models:
        if kind in MODERN_STATE:
            per_model.append(modern_bytes(kind, input_size=input_size, hidden_size=hidden_size,
                                          samples=samples, seq_len=seq_len,
                                          jac_samples=jac_samples))
        elif kind == "transformer":
            nhead = 4 if hidden_size % 4 == 0 else 1
            per_model.append(transformer_bytes(input_size=input_size, d_model=hidden_size,
                                               nhead=nhead, num_layers=num_layers,
                                               samples=samples, seq_len=seq_len, split=True))
        else:
            per_model.append(recurrent_bytes(kind, input_size=input_size,
                                             hidden_size=hidden_size, num_layers=num_layers,
                                             samples=samples, seq_len=seq_len,
                                             jac_samples=jac_samples, split=True))
    if not per_model:
        return 0.0
    return sum(p for p, _ in per_model) + max(w for _, w in per_model)


def model_bytes(model, *, samples: int, seq_len: int, input_size: int,
                jac_samples: int = 0) -> float:
    """Drawn inputs for a user's model: the inputs, the model's parameters (twice), and the
    analyses of every nn.RNN/LSTM/GRU inside it (`recurrent_bytes`) as if each received all
    S·T steps (a recurrent submodule sees at most the sequence the model was given)."""
    from torch import nn

    elem = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    total = samples * seq_len * input_size * (8 + 3 * elem)
    total += 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, nn.RNNBase) and m.mode in ("RNN_TANH", "RNN_RELU", "LSTM", "GRU"):
            kind = {"LSTM": "lstm", "GRU": "gru"}.get(m.mode, "rnn")
            total += recurrent_bytes(kind, input_size=m.input_size, hidden_size=m.hidden_size,
                                     num_layers=m.num_layers,
                                     directions=2 if m.bidirectional else 1,
                                     proj_size=getattr(m, "proj_size", 0), samples=samples,
                                     seq_len=seq_len, jac_samples=jac_samples, elem=elem)
        elif isinstance(m, nn.RNNCellBase):
            kind = {nn.LSTMCell: "lstm", nn.GRUCell: "gru"}.get(type(m), "rnn")
            total += recurrent_bytes(kind, input_size=m.input_size, hidden_size=m.hidden_size,
                                     samples=samples, seq_len=seq_len, jac_samples=jac_samples,
                                     elem=elem)
    return total


def experiment_bytes(*, T: int, steps: int, batch_size: int, hidden_size: int, variants: int,
                     profile_samples: int, seq_len: int) -> float:
    """`run_experiment`: one variant trains at a time (an LSTM is the largest: G = 4) on
    batches of the task's sequence length, with its gradient profiles and gate statistics on
    `profile_samples` sequences; every variant's per-step records stay in the results (the
    monitor history and heatmap: about 64 bytes per step and sequence position, as Python
    floats in lists and dicts, plus 2 KB per step of record structure)."""
    train = recurrent_bytes("lstm", input_size=10, hidden_size=hidden_size,
                            samples=batch_size, seq_len=seq_len)
    probe = recurrent_bytes("lstm", input_size=10, hidden_size=hidden_size,
                            samples=profile_samples, seq_len=seq_len)
    records = variants * steps * (64 * seq_len + 2048)
    return 3 * train + probe + records
