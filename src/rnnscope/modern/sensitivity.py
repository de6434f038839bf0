"""Parameter sensitivity of the state, ‖∂h_t/∂θ‖, per unit and per parameter group, and its
closed form for a diagonal linear recurrence (the "curse of memory", Zucchet & Orvieto 2024).

Closed form. For one unit h_t = λ h_{t−1} + γ x_t, t = 0, 1, …, h_{−1} = 0, with x_t i.i.d.,
mean 0, variance σ², real 0 ≤ λ < 1, write q = λ², n = t and

    S0 = Σ_{k=0..n} q^k         = (1 − q^{n+1}) / (1 − q)
    S1 = Σ_{k=1..n} k q^{k−1}   = (1 − (n+1) q^n + n q^{n+1}) / (1 − q)²
    S2 = Σ_{k=1..n} k² q^{k−1}  = (1 + q − (n+1)² q^n + (2n² + 2n − 1) q^{n+1} − n² q^{n+2}) / (1 − q)³

Since h_t = γ Σ_{k=0..n} λ^k x_{t−k}, ∂h_t/∂λ = Σ_k c_k x_{t−k} and E(∂h_t/∂λ)² = σ² Σ_k c_k²:

    input_scale="none"        γ = 1:                   c_k = k λ^{k−1}
        E = σ² S2                                   → σ² (1 + λ²) / (1 − λ²)³     (t → ∞)
    input_scale="gamma_fixed" γ = sqrt(1 − λ²) held fixed (the LRU, whose γ_log is its own
                              parameter):               c_k = γ k λ^{k−1}
        E = σ² (1 − q) S2                           → σ² (1 + λ²) / (1 − λ²)²
    input_scale="gamma_tied"  γ(λ) = sqrt(1 − λ²) differentiated with λ (Zucchet & Orvieto):
                              c_k = γ' λ^k + γ k λ^{k−1},  γ' = −λ/γ
        E = σ² (q/(1 − q) S0 − 2q S1 + (1 − q) S2)  → σ² / (1 − λ²)²

The plain recurrence's sensitivity explodes like 1/(1 − λ²)³ as λ → 1 — two powers faster than
the state's own variance σ²/(1 − λ²). Normalising the input takes one power away; the LRU's
exponential parametrisation λ = exp(−exp(ν_log)) (wrt="nu_log") multiplies by
(dλ/dν_log)² = (λ log λ)² ~ (1 − λ)², which makes the normalised cases bounded as λ → 1
(gamma_fixed → σ²/2, gamma_tied → σ²/4) while the plain one still grows like σ²/(4(1 − λ)).

Measurement. `parameter_sensitivity` computes ∂h_t[u]/∂θ_p exactly by forward-mode automatic
differentiation (one JVP per parameter element, vmapped in chunks; the scan has its own JVP
rule), squares and sums it over the elements p of each parameter group, and averages over the
batch: mean_b ‖∂h_t[b, u]/∂θ_G‖², for every step t and unit u. Cost: one forward pass per
parameter element, so it suits the small probe models the analysis is about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..checks import public
from .scan import linear_scan

INPUT_SCALES = ("none", "gamma_fixed", "gamma_tied")
WRTS = ("lambda", "nu_log")
CHUNK = 32  # default chunk_size of parameter_sensitivity: tangents per vmapped pass


@public("linear_recurrence_sensitivity")
def linear_recurrence_sensitivity(
        lam, t: int | None = None, *,
        input_scale: Literal["none", "gamma_fixed", "gamma_tied"] = "none",
        wrt: Literal["lambda", "nu_log"] = "lambda", sigma2: float = 1.0) -> torch.Tensor:
    """E(∂h_t/∂θ)² for h_t = λ h_{t−1} + γ x_t with white-noise x (module docstring).

    Args:
        lam: real decay(s) λ in [0, 1), scalar or tensor.
        t: the step (h_{−1} = 0, so h_t sums t + 1 inputs); None for the stationary limit.
        input_scale: "none" (γ = 1), "gamma_fixed" (γ = sqrt(1 − λ²) not differentiated) or
            "gamma_tied" (γ(λ) = sqrt(1 − λ²) differentiated).
        wrt: "lambda" (θ = λ) or "nu_log" (θ = ν_log, λ = exp(−exp(ν_log))).
        sigma2: the input variance σ².

    Returns:
        float64 tensor shaped like lam.

    Example:
        >>> v = linear_recurrence_sensitivity(torch.tensor(0.5))
        >>> assert abs(v.item() - 1.25 / 0.75 ** 3) < 1e-12
    """
    if input_scale not in INPUT_SCALES:
        raise ValueError(f"input_scale must be one of {INPUT_SCALES}; got {input_scale!r}")
    if wrt not in WRTS:
        raise ValueError(f"wrt must be one of {WRTS}; got {wrt!r}")
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if bool(((lam < 0) | (lam >= 1)).any()):
        raise ValueError("the closed form is for real 0 ≤ λ < 1; got values outside")
    q = lam * lam
    if t is None:
        S0, S1, S2 = 1 / (1 - q), 1 / (1 - q) ** 2, (1 + q) / (1 - q) ** 3
    else:
        if int(t) < 0:
            raise ValueError(f"t must be ≥ 0; got {t}")
        n = int(t)
        S0 = (1 - q ** (n + 1)) / (1 - q)
        S1 = (1 - (n + 1) * q ** n + n * q ** (n + 1)) / (1 - q) ** 2
        S2 = (1 + q - (n + 1) ** 2 * q ** n + (2 * n * n + 2 * n - 1) * q ** (n + 1)
              - n * n * q ** (n + 2)) / (1 - q) ** 3
    if input_scale == "none":
        e = S2
    elif input_scale == "gamma_fixed":
        e = (1 - q) * S2
    else:
        e = q / (1 - q) * S0 - 2 * q * S1 + (1 - q) * S2
    if wrt == "nu_log":
        e = e * (lam * torch.log(lam)) ** 2 if bool((lam > 0).all()) else \
            e * torch.where(lam > 0, lam * torch.log(lam.clamp(min=1e-300)), 0.0) ** 2
    return sigma2 * e


@dataclass(frozen=True)
class ParameterSensitivity:
    """mean_b ‖∂h_t[b, u]/∂θ_G‖² per group G, step t, unit u, with each unit's memory time.

    Attributes:
        groups: group -> the parameter names in it.
        state_sq: group -> (T, U) float64, the mean over the batch of the squared norm for the
            state units u (the state flattened, U = prod(S); complex states count |·|²).
        output_sq: group -> (T, O) float64, the same for the output units (empty if
            outputs=False).
        decay: (U,) geometric mean over batch and time of |a_t[u]| (None if the module has no
            `decay`): the effective per-step decay of each unit.
        memory_time: (U,) 1/(1 − decay) (inf where decay ≥ 1), None with decay.
    """

    groups: dict
    state_sq: dict
    output_sq: dict
    decay: torch.Tensor | None
    memory_time: torch.Tensor | None

    def state_norms(self, group: str) -> torch.Tensor:
        """sqrt(mean_b ‖∂h_t[u]/∂θ_G‖²), (T, U)."""
        return self.state_sq[group].sqrt()

    def to_dict(self) -> dict:
        from ..codec import encode_tensor

        def json_list(t):  # a bare nested list whatever the dtype
            return encode_tensor(t, default=t.dtype)

        return {"groups": {g: list(v) for g, v in self.groups.items()},
                "state_sq": {g: json_list(v) for g, v in self.state_sq.items()},
                "output_sq": {g: json_list(v) for g, v in self.output_sq.items()},
                "decay": None if self.decay is None else json_list(self.decay),
                "memory_time": None if self.memory_time is None else json_list(self.memory_time)}


class _StatesAndOutputs(nn.Module):
    """forward(x, hx) -> (states (B, T, *S), outputs (B, T, O)) of the wrapped module."""

    def __init__(self, inner: nn.Module, outputs: bool = True):
        super().__init__()
        self.inner = inner
        self.outputs = outputs

    def forward(self, x, hx):
        m = self.inner
        if not hasattr(m, "hidden_states"):
            out = m(x, hx)[0]
            return out, out
        states = m.hidden_states(x, hx)
        if not self.outputs:
            return states, states.new_zeros(())
        if hasattr(m, "readout") and hasattr(m, "_batch_major"):
            return states, m.readout(m._batch_major(x)[0], states)
        return states, states


def _resolve_groups(module: nn.Module, groups) -> dict[str, tuple[str, ...]]:
    names = [n for n, p in module.named_parameters()]
    spec = groups if groups is not None else getattr(module, "parameter_groups", None)
    if not spec:
        return {"all": tuple(names)}
    out = {}
    for g, entries in spec.items():
        entries = (entries,) if isinstance(entries, str) else tuple(entries)
        members = tuple(n for n in names if any(n == e or n.startswith(e + ".") for e in entries))
        if not members:
            raise ValueError(f"parameter group {g!r} names {entries}, which match none of the "
                             f"module's parameters {names}")
        out[g] = members
    return out


@public("parameter_sensitivity", ints={"chunk_size": 1})
def parameter_sensitivity(module: nn.Module, inputs: torch.Tensor, hx=None, *, groups=None,
                          outputs: bool = True,
                          chunk_size: int | None = None) -> ParameterSensitivity:
    """Exact mean_b ‖∂h_t[b, u]/∂θ_G‖² for every step t, state unit u and parameter group G.

    Args:
        module: a modern recurrence from rnnscope, or any module with
            `hidden_states(x, hx) -> (B, T, *S)` (and optionally `readout(x, states)`,
            `decay(x) -> (B, T, *S)`, `parameter_groups`); without `hidden_states` the first
            output of `module(x, hx)`, taken as (B, T, ...), stands for the states.
        inputs: x as the module takes it.
        hx: initial state as the module takes it, or None.
        groups: group name -> parameter names or submodule prefixes; default the module's
            `parameter_groups` (recurrence / input / output), else one group "all".
        outputs: also measure the output units (output_sq); False skips the readout.
        chunk_size: tangents per vmapped forward-mode pass (memory ~ chunk · B · T · U;
            None: 32).

    Returns:
        ParameterSensitivity. The module is left exactly as found (functional call on
        detached copies of its parameters; no .grad is written).
    """
    from torch.func import functional_call, jvp, vmap

    chunk_size = CHUNK if chunk_size is None else chunk_size
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be ≥ 1; got {chunk_size}")
    group_names = _resolve_groups(module, groups)
    wrapper = _StatesAndOutputs(module, outputs)
    base = {"inner." + n: p.detach() for n, p in module.named_parameters()}
    x = inputs.detach()
    state_sq, output_sq = {}, {}
    for g, members in group_names.items():
        keys = ["inner." + n for n in members]
        primals = tuple(base[k] for k in keys)
        sizes = [p.numel() for p in primals]
        P = sum(sizes)

        def f(*ps, keys=keys):
            return functional_call(wrapper, {**base, **dict(zip(keys, ps))}, (x, hx))

        def one(v, primals=primals, sizes=sizes, f=f):
            tangents = tuple(t.view_as(p) for t, p in zip(v.split(sizes), primals))
            return jvp(f, primals, tangents)[1]

        acc_s = acc_y = None
        eye_dtype = primals[0].dtype
        for start in range(0, P, int(chunk_size)):
            stop = min(P, start + int(chunk_size))
            basis = torch.zeros(stop - start, P, dtype=eye_dtype, device=x.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
            ds, dy = vmap(one)(basis)  # (c, B, T, *S), (c, B, T, O)
            sq_s = ds.abs().square().sum(0).flatten(2)  # (B, T, U)
            sq_y = dy.abs().square().sum(0).flatten(2) if outputs else dy.new_zeros(1, 1, 1)
            acc_s = sq_s if acc_s is None else acc_s + sq_s
            acc_y = sq_y if acc_y is None else acc_y + sq_y
        state_sq[g] = acc_s.mean(0).to(torch.float64).cpu()
        if outputs:
            output_sq[g] = acc_y.mean(0).to(torch.float64).cpu()
    decay = memory_time = None
    if hasattr(module, "decay"):
        with torch.no_grad():
            a = module.decay(x).abs().flatten(2).to(torch.float64)  # (B, T, U)
        decay = torch.exp(torch.log(a).mean((0, 1))).cpu()
        memory_time = torch.where(decay < 1, 1 / (1 - decay), torch.full_like(decay, math.inf))
    return ParameterSensitivity(groups=group_names, state_sq=state_sq, output_sq=output_sq,
                                decay=decay, memory_time=memory_time)


# ----------------------------------------------------------------------------------------------
# The curse of memory, measured against its closed form


@dataclass(frozen=True)
class CurseOfMemory:
    """Measured and closed-form E(∂h_t/∂λ)² of h_t = λ h_{t−1} + γ x_t, white-noise x.

    Attributes:
        lam: (L,) float64, the decays λ.
        t: the step measured (h_{−1} = 0, so h_t sums t + 1 inputs).
        samples: sequences averaged.
        measured, stderr: input_scale -> (L,) the Monte-Carlo mean of (∂h_t/∂λ)² over the
            samples, as `parameter_sensitivity` measures it (exact derivatives), and its
            standard error.
        closed: input_scale -> (L,) `linear_recurrence_sensitivity(λ, t, input_scale=...)`.
    """

    lam: torch.Tensor
    t: int
    samples: int
    measured: dict
    stderr: dict
    closed: dict

    def plot(self, ax=None):
        from .. import plotting

        return plotting.plot_curse_of_memory(self, ax=ax)


class _DiagonalProbe(nn.Module):
    """h_t = λ ⊙ h_{t−1} + γ ⊙ x_t, one unit per λ (L units), γ = 1 or γ(λ) = sqrt(1 − λ²)
    (differentiated with λ); the decay-recurrence protocol plus `parameter_groups`."""

    linear_in_state = True
    parameter_groups = {"lambda": ("lam",)}

    def __init__(self, lam: torch.Tensor, input_scale: str):
        super().__init__()
        self.lam = nn.Parameter(lam.clone())
        self.input_scale = input_scale

    def decay(self, x):
        return self.lam.expand_as(x)

    def hidden_states(self, x, hx=None):
        gamma = (torch.ones_like(self.lam) if self.input_scale == "none"
                 else torch.sqrt(1 - self.lam ** 2))
        if self.input_scale == "gamma_fixed":
            gamma = gamma.detach()
        return linear_scan(self.lam.expand_as(x), gamma * x)

    def forward(self, x, hx=None):
        h = self.hidden_states(x, hx)
        return h, h[:, -1].unsqueeze(0)


def curse_of_memory(lams, *, t: int = 400, samples: int = 256, seed: int = 0,
                    input_scales=("none", "gamma_tied")) -> CurseOfMemory:
    """Measure E(∂h_t/∂λ)² on white-noise sequences of t + 1 steps for every decay in `lams`,
    with exact derivatives (`parameter_sensitivity`), beside the closed form.

    Example:
        >>> com = curse_of_memory([0.5, 0.9], t=30, samples=400)
        >>> bool((com.measured["none"] - com.closed["none"]).abs().le(
        ...     4.5 * com.stderr["none"]).all())
        True
    """
    lam = torch.as_tensor(lams, dtype=torch.float64).reshape(-1)
    if lam.numel() == 0 or not bool(((lam >= 0) & (lam < 1)).all()):
        raise ValueError(f"curse_of_memory: lams must be decays with 0 ≤ λ < 1 (the closed "
                         f"forms diverge at 1); got {lam.tolist()}")
    if int(t) < 0 or int(samples) < 2:
        raise ValueError(f"curse_of_memory: need t ≥ 0 and samples ≥ 2; got t={t}, "
                         f"samples={samples}")
    for s in input_scales:
        if s not in INPUT_SCALES:
            raise ValueError(f"curse_of_memory: input_scales must be from {INPUT_SCALES}; "
                             f"got {s!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, int(t) + 1, lam.numel(), generator=g, dtype=torch.float64)
    measured, stderr, closed = {}, {}, {}
    for s in input_scales:
        probe = _DiagonalProbe(lam, s)
        # the batch mean of (∂h_t[u]/∂λ)² over all λ: unit u depends on λ_u alone
        measured[s] = parameter_sensitivity(probe, x, outputs=False).state_sq["lambda"][-1]
        # its standard error needs the per-sample squares: the same derivatives as one JVP
        # with a tangent of ones (again because unit u depends on λ_u alone)
        from torch.func import functional_call, jvp

        def h_last(lam_, probe=probe):
            return functional_call(probe, {"lam": lam_}, (x,))[0][:, -1]  # (B, L)

        d = jvp(h_last, (probe.lam.detach(),), (torch.ones_like(lam),))[1]  # (B, L)
        stderr[s] = d.square().std(0) / math.sqrt(samples)
        closed[s] = linear_recurrence_sensitivity(lam, int(t), input_scale=s)
    return CurseOfMemory(lam, int(t), int(samples), measured, stderr, closed)
