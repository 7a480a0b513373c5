"""The diagnostics every loss reports: what the clip fractions count and what each KL estimate estimates."""

from __future__ import annotations

import math

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES, LossParams
from .helpers import F64, LOSS_NAMES

CLIPPED = dict(clip_low=0.2, clip_high=0.28, dual_clip_c=3.0, level="token", agg="token-mean")


def params_for(name: str, beta: float = 0.0) -> LossParams:
    est = "k3" if name in ("ppo_clip", "dapo", "reinforce_pp", "reinforce_pp_baseline") else None
    return LossParams(kl_coef=beta, kl_estimator=est if beta else None, **CLIPPED)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_signal_samples_are_not_counted_as_clipped(name):
    # every token far above the trust region (w = 2); half the responses have A = 0, whose gradient is 0 on
    # either side of the bound: only the A = 1 half is clipped.  (Counting A = 0 read 1.0 here.)
    old = torch.full((4, 3), -1.0, dtype=F64)
    logp = old + math.log(2.0)
    mask = torch.ones_like(old)
    out = POLICY_LOSSES[name](logp, old, old, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64), mask, params_for(name))
    assert out.metrics["clip/frac_high"].item() == pytest.approx(0.5, abs=1e-12)
    assert out.metrics["clip/frac_zero_grad"].item() == pytest.approx(0.5, abs=1e-12)


def enumerated_tokens(pi_old: list[float], n: int) -> torch.Tensor:
    """n token ids, each vocabulary entry x repeated pi_old(x) * n times: a token mean over them is the
    exact expectation under pi_old."""
    return torch.tensor([x for x, p in enumerate(pi_old) for _ in range(round(p * n))])


@pytest.mark.parametrize("name", ["rpg_rf_urkl", "rpg_fkl", "grpo", "dapo"])
def test_importance_weighted_kl_estimates_are_exact_off_policy(name):
    pi_old = [1 / 8, 1 / 8, 1 / 4, 1 / 2]
    pi_theta = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    pi_ref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    tokens = enumerated_tokens(pi_old, 8)[None]  # [1, 8]
    old = torch.log(torch.tensor(pi_old, dtype=F64))[tokens]
    logp, ref = torch.log(pi_theta)[tokens], torch.log(pi_ref)[tokens]
    mask = torch.ones_like(old)
    m = POLICY_LOSSES[name](logp, old, ref, torch.ones(1, dtype=F64), mask, params_for(name)).metrics
    kl_theta_ref = (pi_theta * (pi_theta / pi_ref).log()).sum().item()
    assert m["kl/k3_iw"].item() == pytest.approx(kl_theta_ref, rel=1e-12)
    assert m["kl/k1_iw"].item() == pytest.approx(kl_theta_ref, rel=1e-12)
    assert abs(m["kl/k3"].item() - kl_theta_ref) > 0.1  # the plain mean is not that KL off-policy
    # with ref = old the plain k1 is minus KL(pi_old || pi_theta), negative by construction
    m_old = POLICY_LOSSES[name](logp, old, old, torch.ones(1, dtype=F64), mask, params_for(name)).metrics
    p_old = torch.tensor(pi_old, dtype=F64)
    assert m_old["kl/k1"].item() == pytest.approx(-(p_old * (p_old / pi_theta).log()).sum().item(), rel=1e-12)


@pytest.mark.parametrize("name", ["rpg_rf_fkl", "rpg_fkl", "grpo"])
def test_rho_clamp_is_reported(name):
    old = torch.zeros(2, 2, dtype=F64) - 1.0
    ref = old.clone()
    ref[0] = old[0] + 25.0  # log rho = 25 > max_log_ratio = 20 on the first response's tokens
    m = POLICY_LOSSES[name](old.clone(), old, ref, torch.ones(2, dtype=F64), torch.ones_like(old),
                            params_for(name)).metrics
    assert m["is/frac_rho_clamped"].item() == pytest.approx(0.5)
    assert m["is/frac_ratio_clamped"].item() == 0.0
