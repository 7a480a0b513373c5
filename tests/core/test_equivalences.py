"""Way 4 of house rule 4: the equivalences the paper claims.

- Proposition 4.1: per sample and unclipped, rpg_X (fully differentiable) and rpg_rf_X (REINFORCE-style)
  have identical gradients, at both levels, with a general anchor (ref != old); inside the trust region
  the clipped versions agree too.
- Appendix D: E_{x~p}[k3(q/p)] = UKL(p || q) and E_{x~q}[k3(p/q)] = UKL(q || p), for normalised and
  unnormalised measures.
- Section 2.2: per token, grpo_is has the rpg_urkl gradient (value differs by the constant beta rho),
  and grpo's KL gradient is (1 - pi_ref/pi_theta) grad log pi_theta.
"""

from __future__ import annotations

import pytest
import torch

from rpg.core.divergences import k3
from rpg.core.losses import POLICY_LOSSES, LossParams
from rpg.core.masked import aggregate

from .helpers import F64, LOSS_NAMES, aggs, case, clip_margin, params_for, ragged_batch, sample_stats

RF_NAMES = [n for n in LOSS_NAMES if getattr(POLICY_LOSSES[n], "family", None) == "rf"]


def test_every_rpg_loss_has_its_twin():
    fd = {n for n in LOSS_NAMES if case(n).family == "fd"}
    rf = {n for n in LOSS_NAMES if case(n).family == "rf"}
    assert fd and {case(n).partner for n in rf} == fd


def _grad(name, batch, params):
    logp, old, ref, adv, mask = batch
    out = POLICY_LOSSES[name](logp, old, ref, adv, mask, params)
    return out.loss.detach(), torch.autograd.grad(out.loss, logp)[0]


@pytest.mark.parametrize("name", RF_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_proposition_4_1_unclipped(name, seed):
    batch = ragged_batch(lengths=(5, 3, 1, 4, 2), seed=seed, spread=0.4)
    assert (batch[2] - batch[1]).abs().min() > 1e-3, "general anchor: ref differs from old everywhere"
    for level in case(name).levels:
        for agg in aggs(level):
            params = params_for(level, agg, None, None, 0.7)
            v_rf, g_rf = _grad(name, batch, params)
            v_fd, g_fd = _grad(case(name).partner, batch, params)
            torch.testing.assert_close(g_rf, g_fd, atol=1e-12, rtol=0)
            assert (v_rf - v_fd).abs() > 1e-3, "the two surrogates differ in value, only gradients agree"


@pytest.mark.parametrize("name", RF_NAMES)
def test_proposition_4_1_inside_trust_region(name):
    """Both families with clip on, every sample inside [1 - eps_low, 1 + eps_high] and below c."""
    clip = (0.2, 0.28, 2.0)
    for level in case(name).levels:
        batch = ragged_batch(lengths=(3, 2, 1), seed=4, spread=0.02 if level == "token" else 0.015)
        ws = [w for w, _, _ in sample_stats(*batch, level, 0.7, case(name).kl)]
        assert max(ws) < 1.2 and min(ws) > 0.85 and clip_margin(sample_stats(*batch, level, 0.7, case(name).kl), clip) > 0
        for agg in aggs(level):
            params = params_for(level, agg, None, clip, 0.7)
            torch.testing.assert_close(_grad(name, batch, params)[1], _grad(case(name).partner, batch, params)[1],
                                       atol=1e-12, rtol=0)


def _measures(seed, normalised):
    g = torch.Generator().manual_seed(seed)
    p, q = (torch.exp(torch.randn(6, generator=g, dtype=F64)) for _ in range(2))
    if normalised:
        p, q = p / p.sum(), q / q.sum()
    else:
        assert abs(float(p.sum()) - 1) > 0.1 and abs(float(q.sum()) - 1) > 0.1
    return p, q


def ukl(p, q):
    """UKL(p || q) = sum p log(p/q) - sum p + sum q."""
    return (p * (p / q).log()).sum() - p.sum() + q.sum()


@pytest.mark.parametrize("normalised", [True, False], ids=["normalised", "unnormalised"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k3_is_unnormalised_kl(normalised, seed):
    p, q = _measures(seed, normalised)
    # k3(logp, ref_logp) = r - 1 - log r with r = exp(ref_logp - logp)
    e_p = (p * k3(p.log(), q.log())).sum()  # E_{x~p}[k3(q/p)]
    e_q = (q * k3(q.log(), p.log())).sum()  # E_{x~q}[k3(p/q)]
    torch.testing.assert_close(e_p, ukl(p, q), atol=1e-13, rtol=0)
    torch.testing.assert_close(e_q, ukl(q, p), atol=1e-13, rtol=0)
    assert (e_p - e_q).abs() > 1e-3  # the two directions differ
    if normalised:  # UKL equals KL in value for normalised measures
        torch.testing.assert_close(e_p, (p * (p / q).log()).sum(), atol=1e-13, rtol=0)


@pytest.mark.parametrize("agg", aggs("token"))
@pytest.mark.parametrize("clip", [None, (0.2, 0.28, 2.0)], ids=["noclip", "clip"])
def test_grpo_is_is_token_level_rpg_urkl(agg, clip):
    """w k3(ref/theta) = w (r - 1 + d) = rho - w + w d per token: the urkl term plus the constant rho."""
    logp, old, ref, adv, mask = batch = ragged_batch(lengths=(5, 3, 1, 4), seed=2, spread=0.4)
    params = params_for("token", agg, None, clip, 0.7)
    v_is, g_is = _grad("grpo_is", batch, params)
    v_u, g_u = _grad("rpg_urkl", batch, params)
    torch.testing.assert_close(g_is, g_u, atol=1e-12, rtol=0)
    rho = torch.exp(ref - old)
    torch.testing.assert_close(v_is - v_u, 0.7 * aggregate(rho, mask, agg), atol=1e-12, rtol=0)


def test_grpo_kl_gradient_per_token():
    """With A = 0 the grpo gradient is beta (1 - pi_ref/pi_theta) per token (token-mean over 6 tokens)."""
    logp, old, ref, _, _ = ragged_batch(lengths=(3, 3), t=3, seed=9, spread=0.5)
    mask = torch.ones(2, 3, dtype=F64)
    params = LossParams(kl_coef=0.7, clip_low=0.2, clip_high=0.28)
    (g,) = torch.autograd.grad(POLICY_LOSSES["grpo"](logp, old, ref, torch.zeros(2, dtype=F64), mask, params).loss, logp)
    torch.testing.assert_close(g, 0.7 * (1 - torch.exp(ref - logp.detach())) / 6, atol=1e-14, rtol=0)
