"""Clipping: RPG-Style Clip (Algorithm 2) for the REINFORCE-style family, PPO dual clip on the reward term
only for the fully differentiable family and the baselines, the branch-fraction metrics, and the
max_log_ratio guard.  (eps_low, eps_high, c) = (.2, .28, 2).

The hand-built batch has 7 samples (tokens, or responses at level="sequence"), A = +-1, beta = .05,
d = .1 per sample, so that sign(A_reg) = sign(A) for every divergence:
  w:  1.1   1.5   .5          |  .5   1.5          2.5   |  1.0
  A:  +1    +1    +1          |  -1   -1           -1    |  +1
      keep  high  keep(below) |  low  keep(above)  dual  |  keep
fractions: high 1/7, low 1/7, dual 1/7, zero-gradient 3/7 (padding, which would clip, is not counted).
"""

from __future__ import annotations

import math

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES, LossParams

from .helpers import F64, LOSS_NAMES, aggs, case

W = [[1.1, 1.5, 0.5], [0.5, 1.5, 2.5], [1.0]]
A = [1.0, -1.0, 1.0]
KEEP = [[True, False, True], [False, True, False], [True]]
BETA = 0.05
CLIPPED = LOSS_NAMES


def branch_batch(level):
    """Token level: rows of A are the groups above, 3 tokens each (padding garbage w = 3).
    Sequence level: one response per sample, 2 tokens sharing log w (the last one has 1 token)."""
    adv = []
    if level == "token":
        logw = torch.tensor([[math.log(x) for x in row] + [math.log(3.0)] * (3 - len(row)) for row in W], dtype=F64)
        mask = torch.tensor([[1.0] * len(row) + [0.0] * (3 - len(row)) for row in W], dtype=F64)
        adv = A
    else:
        flat = [(w, a) for row, a in zip(W, A) for w in row]
        logw = torch.tensor([[math.log(w) / 2] * 2 for w, _ in flat], dtype=F64)
        logw[-1] = torch.tensor([math.log(flat[-1][0]), 5.0])
        mask = torch.ones_like(logw)
        mask[-1, 1] = 0.0
        adv = [a for _, a in flat]
    old = torch.full_like(logw, math.log(0.3))
    logp = (old + logw).requires_grad_()
    ref = logp.detach() - 0.1 * mask / mask.sum(-1, keepdim=True)  # d = .1 per sample
    ref = torch.where(mask > 0, ref, logp.detach())
    keep = [k for row in KEEP for k in row]
    if level == "token":
        keep_mask = torch.tensor([row + [False] * (3 - len(row)) for row in KEEP])
    else:
        keep_mask = torch.tensor(keep)[:, None] & (mask > 0)
    return logp, old, ref, torch.tensor(adv, dtype=F64), mask, keep_mask


def grad_of(name, batch, params, adv=None):
    logp, old, ref, a, mask, _ = batch
    out = POLICY_LOSSES[name](logp, old, ref, a if adv is None else adv, mask, params)
    return torch.autograd.grad(out.loss, logp)[0], out.metrics


def clip_params(level, agg, est=None, beta=BETA, c=2.0):
    return LossParams(kl_coef=beta, clip_low=0.2, clip_high=0.28, dual_clip_c=c, level=level, agg=agg, kl_estimator=est)


@pytest.mark.parametrize("name", CLIPPED)
def test_clip_gradients_and_branch_metrics(name):
    c = case(name)
    for level in c.levels:
        for agg in aggs(level):
            est = "k2" if c.family == "ppo" else None
            batch = branch_batch(level)
            keep, mask = batch[5], batch[4]
            g_clip, metrics = grad_of(name, batch, clip_params(level, agg, est))
            g_free, _ = grad_of(name, batch, LossParams(kl_coef=BETA, level=level, agg=agg, kl_estimator=est))
            assert (g_free[mask > 0].abs() > 1e-6).all()
            if c.family == "rf":  # Algorithm 2: a clipped sample loses its whole gradient, a kept one is exact
                want = torch.where(keep, g_free, 0.0)
            else:  # PPO dual clip on -w A only: the KL gradient (the A = 0 gradient) always stays
                g_kl, _ = grad_of(name, batch, clip_params(level, agg, est), adv=torch.zeros_like(batch[3]))
                assert (g_kl[mask > 0].abs() > 1e-6).all()
                want = g_kl + torch.where(keep, g_free - g_kl, 0.0)
            torch.testing.assert_close(g_clip, want, atol=1e-15, rtol=0)
            for key, frac in (("high", 1), ("low", 1), ("dual", 1), ("zero_grad", 3)):
                torch.testing.assert_close(metrics[f"clip/frac_{key}"], torch.tensor(frac / 7, dtype=F64),
                                           atol=1e-15, rtol=0)


@pytest.mark.parametrize("name", ["rpg_fkl", "rpg_rf_fkl", "dapo"])
def test_without_dual_clip_negative_large_w_keeps_its_gradient(name):
    batch = branch_batch("token")
    g, m = grad_of(name, batch, clip_params("token", "token-mean", beta=0.0 if name == "dapo" else BETA, c=None))
    g_free, _ = grad_of(name, batch, LossParams(kl_coef=0.0 if name == "dapo" else BETA))
    torch.testing.assert_close(g[1, 2], g_free[1, 2], atol=1e-15, rtol=0)  # w = 2.5, A = -1
    assert "clip/frac_dual" not in m and float(m["clip/frac_zero_grad"]) == pytest.approx(2 / 7, abs=1e-15)


def test_ppo_clip_value_is_the_max_min_formula():
    """Value of -w A clipped: max(-w A, -clip(w) A), then min(., -c A) for A < 0 (docs/algorithms.md 3a)."""
    logp, old, ref, adv, mask, _ = branch_batch("token")
    w = torch.exp(logp.detach() - old)
    a = adv[:, None]
    want = torch.maximum(-w * a, -w.clamp(0.8, 1.28) * a)
    want = torch.where(a < 0, torch.minimum(want, -2.0 * a), want)
    want = (want * mask).sum() / mask.sum()
    out = POLICY_LOSSES["ppo_clip"](logp, old, ref, adv, mask, clip_params("token", "token-mean", beta=0.0))
    torch.testing.assert_close(out.loss.detach(), want, atol=1e-15, rtol=0)


@pytest.mark.parametrize("name", ["rpg_fkl", "rpg_rf_rkl", "grpo_is"])
def test_ratio_guard_stops_gradient_through_w(name):
    """|log w| = 25 > max_log_ratio = 20: w is frozen at e^20 (no gradient through w) and reported."""
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=F64, requires_grad=True)
    old = torch.tensor([[math.log(0.5) - 25.0, math.log(0.5)]], dtype=F64)
    out = POLICY_LOSSES[name](logp, old, logp.detach(), torch.tensor([1.0], dtype=F64), torch.ones(1, 2, dtype=F64),
                              LossParams(kl_coef=0.0))
    (g,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(g).all()
    want_first = 0.0 if case(name).family != "rf" else -math.exp(20.0) / 2  # rf: -SG(w A) grad log pi / 2 tokens
    torch.testing.assert_close(g[0, 0], torch.tensor(want_first, dtype=F64), atol=1e-15, rtol=1e-15)
    torch.testing.assert_close(g[0, 1], torch.tensor(-0.5, dtype=F64), atol=1e-15, rtol=0)  # w = 1: -w A / 2
    torch.testing.assert_close(out.metrics["is/frac_ratio_clamped"], torch.tensor(0.5, dtype=F64), atol=0, rtol=0)
