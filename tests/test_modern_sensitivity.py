"""parameter_sensitivity: exact against per-sample float64 autograd Jacobians, and the
Monte-Carlo curve of E(∂h_t/∂λ)² for a diagonal linear recurrence against its closed form
(the curse of memory, and its taming by γ-normalised input and the LRU's parametrisation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rnnscope.modern import LRU, RGLRU, SLSTM, MinGRU, MinLSTM, SelectiveSSM
from rnnscope.modern.sensitivity import linear_recurrence_sensitivity, parameter_sensitivity

D64 = torch.float64


def direct_sum(lam, t, input_scale):
    """Σ_k c_k² written out term by term (module docstring's c_k), no closed form."""
    q = lam * lam
    g = math.sqrt(1 - q)
    total = 0.0
    for k in range(t + 1):
        d_pow = k * lam ** (k - 1) if k >= 1 else 0.0  # d(λ^k)/dλ
        if input_scale == "none":
            c = d_pow
        elif input_scale == "gamma_fixed":
            c = g * d_pow
        else:
            c = (-lam / g) * lam ** k + g * d_pow
        total += c * c
    return total


@pytest.mark.parametrize("input_scale", ["none", "gamma_fixed", "gamma_tied"])
def test_closed_form_equals_direct_sum(input_scale):
    for lam in [0.0, 0.2, 0.7, 0.9, 0.97]:
        for t in [0, 1, 2, 7, 60, 400]:
            want = direct_sum(lam, t, input_scale)
            got = linear_recurrence_sensitivity(lam, t, input_scale=input_scale).item()
            assert abs(got - want) <= 1e-9 * max(1.0, want), (lam, t, got, want)
        # the stationary limit is the t → ∞ sum
        got = linear_recurrence_sensitivity(lam, None, input_scale=input_scale).item()
        assert abs(got - direct_sum(lam, 3000, input_scale)) <= 1e-9 * max(1.0, got)


def test_stationary_growth_rates():
    """(1 + λ²)/(1 − λ²)³ unnormalised; one power less normalised; bounded in ν_log."""
    lam = torch.tensor([0.9, 0.99, 0.999, 0.9999], dtype=D64)
    q = lam * lam
    none = linear_recurrence_sensitivity(lam)
    assert torch.allclose(none * (1 - q) ** 3, 1 + q, rtol=1e-9)
    fixed = linear_recurrence_sensitivity(lam, input_scale="gamma_fixed")
    assert torch.allclose(fixed * (1 - q) ** 2, 1 + q, rtol=1e-9)
    tied = linear_recurrence_sensitivity(lam, input_scale="gamma_tied")
    assert torch.allclose(tied * (1 - q) ** 2, torch.ones_like(q), rtol=1e-9)
    nu_fixed = linear_recurrence_sensitivity(lam, input_scale="gamma_fixed", wrt="nu_log")
    nu_tied = linear_recurrence_sensitivity(lam, input_scale="gamma_tied", wrt="nu_log")
    nu_none = linear_recurrence_sensitivity(lam, wrt="nu_log")
    assert abs(nu_fixed[-1].item() - 0.5) < 1e-3 and abs(nu_tied[-1].item() - 0.25) < 1e-3
    assert torch.allclose((nu_none * 4 * (1 - lam))[1:], torch.ones(3, dtype=D64), rtol=0.01)


class ScalarDiagonal(nn.Module):
    """h_t = λ h_{t−1} + γ x_t per unit, γ = 1 or γ(λ) = sqrt(1 − λ²) (tied); the protocol
    parameter_sensitivity reads: hidden_states, decay, parameter_groups."""

    parameter_groups = {"lambda": ("lam",)}

    def __init__(self, lam, tied):
        super().__init__()
        self.lam = nn.Parameter(torch.as_tensor(lam, dtype=D64))
        self.tied = tied

    def hidden_states(self, x, hx=None):
        gamma = torch.sqrt(1 - self.lam ** 2) if self.tied else torch.ones_like(self.lam)
        h, hs = torch.zeros_like(x[:, 0]), []
        for x_t in x.unbind(1):
            h = self.lam * h + gamma * x_t
            hs.append(h)
        return torch.stack(hs, 1)

    def decay(self, x):
        return self.lam.expand_as(x)


LAMS = [0.3, 0.6, 0.8, 0.9, 0.95, 0.98]


def assert_within_mc(measured, expected, n, what):
    """measured = mean of n squares of N(0, V) draws: E = V, SE = V·sqrt(2/n); 4.5 SE."""
    se = expected * math.sqrt(2 / n)
    z = ((measured - expected).abs() / se).max().item()
    assert z < 4.5, f"{what}: {z:.2f} standard errors off; {measured.tolist()} vs {expected.tolist()}"


@pytest.mark.parametrize("tied", [False, True])
def test_monte_carlo_curve_matches_closed_form_wrt_lambda(tied):
    B, T = 3000, 80
    gen = torch.Generator().manual_seed(10 + tied)
    m = ScalarDiagonal(LAMS, tied)
    x = torch.randn(B, T, len(LAMS), generator=gen, dtype=D64)
    res = parameter_sensitivity(m, x, outputs=False, chunk_size=len(LAMS))
    lam = torch.tensor(LAMS, dtype=D64)
    scale = "gamma_tied" if tied else "none"
    for t in [0, 5, 30, T - 1]:  # λ = 0.98 is still far from stationary at t = 79
        expected = linear_recurrence_sensitivity(lam, t, input_scale=scale)
        if t == 0 and not tied:
            assert res.state_sq["lambda"][t].abs().max() == 0
            continue
        assert_within_mc(res.state_sq["lambda"][t], expected, B, f"t={t} {scale}")
    assert torch.allclose(res.memory_time, 1 / (1 - lam))


def lru_real(lams, normalised):
    """An LRU whose units are independent real decays with identity input map."""
    N = len(lams)
    m = LRU(N, N, dtype=D64)
    lam = torch.tensor(lams, dtype=D64)
    with torch.no_grad():
        m.nu_log.copy_(torch.log(-torch.log(lam)))
        m.theta_log.fill_(-80.0)  # phase e^{−80}: real λ to far below rounding
        m.gamma_log.copy_(torch.log(torch.sqrt(1 - lam ** 2)) if normalised else torch.zeros(N))
        m.B_re.copy_(torch.eye(N, dtype=D64))
        m.B_im.zero_()
    return m


@pytest.mark.parametrize("normalised", [False, True])
def test_monte_carlo_lru_nu_log_matches_closed_form_and_is_tamed(normalised, untouched):
    B, T = 3000, 100
    gen = torch.Generator().manual_seed(20 + normalised)
    m = lru_real(LAMS, normalised)
    x = torch.randn(B, T, len(LAMS), generator=gen, dtype=D64)
    snapshot, assert_untouched = untouched
    before = snapshot(m)
    res = parameter_sensitivity(m, x, groups={"nu": ("nu_log",)}, outputs=False,
                                chunk_size=len(LAMS))
    assert_untouched(m, before)
    lam = torch.tensor(LAMS, dtype=D64)
    scale = "gamma_fixed" if normalised else "none"
    for t in [3, 40, T - 1]:
        expected = linear_recurrence_sensitivity(lam, t, input_scale=scale, wrt="nu_log")
        assert_within_mc(res.state_sq["nu"][t], expected, B, f"LRU t={t} {scale}")
    final = res.state_sq["nu"][-1]
    if normalised:  # bounded (→ 1/2 as λ → 1), and nearly flat over memory times 1.4 … 50
        assert final.max() < 0.6
    else:  # grows with the memory time, like 1/(4(1 − λ)) at the long end
        assert final[-1] > 5 * final[2]


# --- exactness against per-sample autograd ----------------------------------------------------

def build(kind):
    torch.manual_seed(3)
    return {"mingru": lambda: MinGRU(2, 3, dtype=D64),
            "minlstm": lambda: MinLSTM(2, 3, dtype=D64),
            "lru": lambda: LRU(2, 3, dtype=D64),
            "rglru": lambda: RGLRU(2, 3, dtype=D64),
            "s6": lambda: SelectiveSSM(2, 3, state_size=2, dtype=D64),
            "slstm": lambda: SLSTM(2, 3, dtype=D64)}[kind]()


@pytest.mark.parametrize("kind", ["mingru", "minlstm", "lru", "rglru", "s6", "slstm"])
def test_parameter_sensitivity_is_exact(kind, untouched):
    m = build(kind)
    x = torch.randn(2, 5, 2, dtype=D64)
    snapshot, assert_untouched = untouched
    m.train()
    m(x)[0].sum().backward()  # a .grad to preserve
    before = snapshot(m)
    res = parameter_sensitivity(m, x, chunk_size=7)
    assert_untouched(m, before)
    names = dict(m.named_parameters())
    assert set(res.groups) == set(m.parameter_groups)
    for g, members in res.groups.items():
        flat0 = torch.cat([names[n].detach().reshape(-1) for n in members])
        sizes = [names[n].numel() for n in members]

        def states(flat, b):
            ps = {n: v.view_as(names[n]) for n, v in zip(members, flat.split(sizes))}
            full = {n: (ps[n] if n in ps else p.detach()) for n, p in names.items()}
            s = _states_with(m, full, x[b:b + 1])
            return torch.view_as_real(s).flatten() if s.is_complex() else s.flatten()

        sq = []
        for b in range(2):
            J = torch.autograd.functional.jacobian(lambda f: states(f, b), flat0)  # (T·U·[2], P)
            per = J.square().sum(-1).reshape(5, -1)
            if m.hidden_states(x).is_complex():
                per = per.reshape(5, -1, 2).sum(-1)
            sq.append(per)
        want = torch.stack(sq).mean(0)
        got = res.state_sq[g]
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14 * want.abs().max()), g


def _states_with(m, params, x):
    """m.hidden_states with `params` swapped in (torch.func.functional_call runs forward only)."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(m, params):
        return m.hidden_states(x)


def test_groups_errors_and_output_group():
    m = LRU(2, 3, dtype=D64)
    x = torch.randn(2, 4, 2, dtype=D64)
    with pytest.raises(ValueError, match="match none of the module's parameters"):
        parameter_sensitivity(m, x, groups={"bad": ("nope",)})
    res = parameter_sensitivity(m, x)
    # C and D do not touch the state; they do move the output
    assert res.state_sq["output"].abs().max() == 0
    assert res.output_sq["output"].min() > 0
    d = res.to_dict()
    assert set(d["state_sq"]) == {"recurrence", "input", "output"}
