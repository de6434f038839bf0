"""Retain-gate statistics and the initialisations that keep the gradient highway open.

The retain gate is the one multiplying the old state: the LSTM forget gate f (c' = f ⊙ c + …)
and the GRU update gate z (h' = (1 − z) ⊙ n + z ⊙ h; z plays the forget gate's role, and 1 − z
the input gate's). A unit whose gate holds value f keeps a perturbation for ~1/(1 − f) steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import check_model, check_number, count_nonfinite, public
from .recurrent import GATES, RETAIN_GATE, describe
from .replay import Trace, replay
from .results import GateLayerStats, GateStats
from .modern import analyses as decay
from .modern.protocol import describe_decay, is_decay_recurrence

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@public("gate_stats", module=True, ints={"bins": 1})
def gate_stats(module: nn.Module | Trace, inputs=None, hx=None, *,
               bins: int = 50) -> GateStats:
    """Forget (LSTM) or retain (GRU) gate statistics for every layer and direction.

    Runs the replay without building a graph; the module is not changed. `module` may be a
    `Trace` from `replay` instead (then inputs and hx are not given).

    Example:
        >>> stats = gate_stats(nn.LSTM(3, 4), torch.randn(5, 2, 3))
        >>> 0 < stats.layers[0].mean < 1
        True
    """
    if is_decay_recurrence(module):  # modern/protocol.py: the decay is the gate
        if isinstance(bins, bool) or not isinstance(bins, int) or bins <= 0:
            raise ValueError(f"bins must be a positive int; got {bins!r}")
        return decay.gate_stats(describe_decay(module), inputs, hx, bins=bins)
    given = module if isinstance(module, Trace) else None
    spec = given.spec if given is not None else describe(module)
    module = spec.module
    if spec.kind not in RETAIN_GATE:
        raise ValueError(f"a vanilla {type(module).__name__} has no gates; gate statistics need "
                         "an LSTM or GRU")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins <= 0:
        raise ValueError(f"bins must be a positive int; got {bins!r}")
    if given is not None:
        trace = given
    else:
        with torch.no_grad():
            trace = replay(module, inputs, hx)
    gate = RETAIN_GATE[spec.kind]
    out = []
    for layer, dirs in enumerate(trace.layers):
        for d, lt in enumerate(dirs):
            v = lt.gates[gate].detach().to("cpu", torch.float64)  # (B, T, H)
            if lt.lengths is not None:  # steps past a sequence's end were never run
                v = v[lt.valid.cpu()].unsqueeze(0)  # (1, N valid steps, H)
            bad = count_nonfinite(v)
            flat = v.reshape(-1)
            n_all = flat.numel()
            fin = flat[torch.isfinite(flat)] if bad else flat
            hist = torch.histc(fin, bins=bins, min=0.0, max=1.0) / max(fin.numel(), 1)
            edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
            q = exact_quantiles(fin, QUANTILES)
            # fractions as counts / n: no float64 copy of the data per threshold
            sat = {name: int(test(flat).sum()) / n_all
                   for name, test in (("<0.01", lambda t: t < 0.01), ("<0.1", lambda t: t < 0.1),
                                      (">0.9", lambda t: t > 0.9), (">0.99", lambda t: t > 0.99))}
            unit_mean = v.mean(dim=(0, 1))  # (H,)
            memory_time = 1.0 / (1.0 - unit_mean)  # inf where the mean gate is exactly 1
            out.append(GateLayerStats(layer, d, gate, float(flat.mean()),
                                      dict(zip(QUANTILES, q.tolist())), hist, edges, sat,
                                      unit_mean, memory_time, bad))
    return GateStats(spec.kind, tuple(out))


def exact_quantiles(values: torch.Tensor, qs) -> torch.Tensor:
    """torch.quantile(values, qs) (linear interpolation) for a 1-D float tensor of any size.

    torch.quantile refuses more than 2^24 values (50 sequences × 2700 steps × 128 units is
    more) and sorts them all. This selects only the order statistics the quantiles need, with
    kthvalue (O(n) each), and interpolates exactly as torch.quantile does:
    rank = q·(n − 1), lerp(v[floor rank], v[ceil rank], rank − floor rank). nan for no values.
    """
    q = torch.tensor(qs, dtype=torch.float64)
    n = values.numel()
    if n == 0:
        return torch.full_like(q, math.nan)
    v = values.to(torch.float64)
    ranks = q * (n - 1)
    below = ranks.to(torch.int64)  # ranks ≥ 0: truncation is floor, as in torch.quantile
    above = ranks.ceil().to(torch.int64)
    order = {r: v.kthvalue(r + 1).values for r in sorted(set(below.tolist() + above.tolist()))}
    lo = torch.stack([order[r] for r in below.tolist()])
    hi = torch.stack([order[r] for r in above.tolist()])
    return torch.lerp(lo, hi, ranks - below)


def _gate_slice(kind: str, gate: str, H: int) -> slice:
    k = GATES[kind].index(gate)
    return slice(k * H, (k + 1) * H)


def _bias_pairs(fn: str, module: nn.Module):
    """(bias_ih, bias_hh) for every layer and direction; refuses modules without biases.
    Errors name `fn`, the public function called (these are not behind `public`)."""
    try:
        spec = describe(module)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    if spec.kind not in RETAIN_GATE:
        raise ValueError(f"{fn}: a vanilla {type(module).__name__} has no forget/retain gate to "
                         "initialise; use an nn.LSTM or nn.GRU (or their cells)")
    if not spec.bias:
        raise ValueError(f"{fn}: this {type(module).__name__} was built with bias=False: there "
                         "is no gate bias to set")
    pairs = [(p.b_ih, p.b_hh) for layer in range(spec.num_layers)
             for d in range(spec.num_directions) for p in [spec.params(layer, d)]]
    return spec, pairs


def init_forget_bias(module: nn.Module, value: float = 1.0) -> nn.Module:
    """Make the EFFECTIVE forget bias (bias_ih + bias_hh) exactly `value` everywhere.

    PyTorch adds two bias vectors; writing `value` into both would give 2·value. This writes
    `value` into bias_ih's forget block and 0 into bias_hh's. For a GRU the retain gate z takes
    the forget gate's role (a positive bias means "keep the old state"). Works in place on
    nn.LSTM/nn.GRU and their cells; returns the module.

    Example:
        >>> lstm = init_forget_bias(nn.LSTM(3, 4), 1.0)
        >>> bool(((lstm.bias_ih_l0 + lstm.bias_hh_l0)[4:8] == 1.0).all())
        True
    """
    check_model("init_forget_bias", module, grad=False, what="module")
    check_number("init_forget_bias", "value", value,
                  hint="an effective forget bias, e.g. 1.0")
    spec, pairs = _bias_pairs("init_forget_bias", module)
    sl = _gate_slice(spec.kind, RETAIN_GATE[spec.kind], spec.hidden_size)
    with torch.no_grad():
        for b_ih, b_hh in pairs:
            b_ih[sl] = value
            b_hh[sl] = 0.0
    return module


def chrono_init(module: nn.Module, t_max: float, *, generator: torch.Generator | None = None
                ) -> nn.Module:
    """Chrono initialisation (Tallec & Ollivier 2018), on effective biases.

    LSTM: forget bias log(u), input bias −log(u), u ~ U(1, t_max − 1) per unit, so the memory
    time 1/(1 − σ(log u)) = 1 + u is uniform on [2, t_max]. GRU: the retain gate z is the
    forget gate (its complement 1 − z is the input gate, tied to it), so only z's bias is set to
    log(u). The hidden-side bias blocks are zeroed so that the effective biases are exact.
    """
    check_model("chrono_init", module, grad=False, what="module")
    check_number("chrono_init", "t_max", t_max, low=2, low_open=True,
                 hint="the longest memory time in steps, usually the sequence length")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"chrono_init: generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__}")
    spec, pairs = _bias_pairs("chrono_init", module)
    H = spec.hidden_size
    f_sl = _gate_slice(spec.kind, RETAIN_GATE[spec.kind], H)
    with torch.no_grad():
        for b_ih, b_hh in pairs:
            u = torch.rand(H, generator=generator, dtype=torch.float64) * (t_max - 2) + 1
            log_u = u.log().to(b_ih)
            b_ih[f_sl] = log_u
            b_hh[f_sl] = 0.0
            if spec.kind == "lstm":
                i_sl = _gate_slice("lstm", "i", H)
                b_ih[i_sl] = -log_u
                b_hh[i_sl] = 0.0
    return module


__all__ = ["gate_stats", "init_forget_bias", "chrono_init"]
