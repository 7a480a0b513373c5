"""Way 1 of house rule 4: hand-computed values and gradients of every registered loss.

One token, arithmetic in the comments:
  logp = log .55, old = log .5, ref = log .4, A = .5, beta = .1
  w = .55/.5 = 1.1,  d = log(.55/.4) = log 1.375 = 0.318453731118535,  rho = .4/.5 = .8,
  log pi = log .55 = -0.597837000755620,  r = pi_ref/pi = .4/.55 = 0.727272727272727,
  k3 = r - 1 - log r = 0.045726458391262.
w = 1.1 lies inside every trust region used here, so clip on/off give the same numbers; d L / d logp
is the gradient (one token: log pi = logp, d w / d logp = w).
"""

from __future__ import annotations

import math

import pytest
import torch

from rpg.core.divergences import k1, k2, k3
from rpg.core.losses import POLICY_LOSSES, LossParams

from .helpers import CLIP, F64, LOSS_NAMES, aggs, beta_for, case, loss_configs, params_for, ragged_batch, ref_loss

HAND = {  # key (family:divergence, or the baseline): (loss value, d loss / d logp)
    # -w A - beta rho log pi = -.55 + .1*.8*.597837 ;  -(w A + beta rho) = -(.55 + .08)
    "fd:fkl": (-0.502173039939550, -0.63),
    # w (-A + beta d) = 1.1 (-.5 + .0318453731) ;  -w (A - beta (d + 1)) = -1.1 (.5 - .1318453731)
    "fd:rkl": (-0.514970089576961, -0.404970089576961),
    # -w A + beta (w - rho log pi) = -.55 + .1 (1.1 + .4782696006) ;  -(w A - beta (w - rho)) = -(.55 - .03)
    "fd:ufkl": (-0.392173039939550, -0.52),
    # -w A + beta (w d - w) = -.55 + .1 (.3502991042 - 1.1) ;  -w (A - beta d) = -1.1 (.5 - .0318453731)
    "fd:urkl": (-0.624970089576961, -0.514970089576961),
    # REINFORCE-style: value -Weight log pi = Weight * .597837..., gradient -Weight (Proposition 4.1)
    "rf:fkl": (0.376637310476041, -0.63),  # .63 * .5978370008
    "rf:rkl": (0.242106103748425, -0.404970089576961),  # .404970089577 * .5978370008
    "rf:ufkl": (0.310875240392923, -0.52),  # .52 * .5978370008
    "rf:urkl": (0.307868173831544, -0.514970089576961),  # .514970089577 * .5978370008
    # -w A + beta k3 = -.55 + .0045726458 ;  -w A + beta (1 - r) = -.55 + .1 * .2727272727
    "grpo": (-0.545427354160874, -0.522727272727273),
    # -w A + beta w k3 = -.55 + .11 * .0457264584 ;  -w A + beta w d = -.55 + .11 * .3184537311
    "grpo_is": (-0.544970089576961, -0.514970089576961),
    # ppo_clip: -w A + beta k_X, gradient -w A + beta dk_X/dlogp
    "ppo:k1": (-0.518154626888147, -0.45),  # k1 = d ; dk1 = 1
    "ppo:k2": (-0.544929361056834, -0.518154626888147),  # k2 = d^2/2 = .0507063 ; dk2 = d
    "ppo:k3": (-0.545427354160874, -0.522727272727273),  # as grpo
    "ppo:None": (-0.55, -0.55),  # no KL term (beta = 0)
}


def hand_key(name, est):
    c = case(name)
    return f"ppo:{est}" if c.family == "ppo" else f"{c.family}:{c.kl}" if c.kl else c.family


def one_token(level="token"):
    logp = torch.tensor([[math.log(0.55)]], dtype=F64, requires_grad=True)
    old = torch.tensor([[math.log(0.5)]], dtype=F64)
    ref = torch.tensor([[math.log(0.4)]], dtype=F64)
    return logp, old, ref, torch.tensor([0.5], dtype=F64), torch.ones(1, 1, dtype=F64)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_one_token_hand_values(name):
    """Every name, both levels it supports, each agg, clip off and on, every KL estimator it takes."""
    c = case(name)
    checked = 0
    for est in c.estimators:
        key = hand_key(name, est)
        assert key in HAND, f"no hand value for {name!r} (key {key!r}); add one to HAND"
        value, grad = HAND[key]
        for level in c.levels:
            for agg in aggs(level):
                for clip in (None, CLIP):
                    logp, old, ref, adv, mask = one_token()
                    p = params_for(level, agg, est, clip, beta_for(name, est, 0.1))
                    out = POLICY_LOSSES[name](logp, old, ref, adv, mask, p)
                    (g,) = torch.autograd.grad(out.loss, logp)
                    torch.testing.assert_close(out.loss.detach(), torch.tensor(value, dtype=F64), atol=1e-14, rtol=0)
                    torch.testing.assert_close(g, torch.tensor([[grad]], dtype=F64), atol=1e-14, rtol=0)
                    checked += 1
    assert checked >= 2


# Clip cases, one token, (eps_low, eps_high, c) = (.2, .28, 2), beta = .1.  Fully differentiable rpg_fkl clips
# only -w A; its KL gradient -beta rho stays.  rpg_rf_fkl freezes the whole sample at its boundary value
# (A + C/bound) * l * bound (Algorithm 2), l = -log pi, C = beta rho.  ppo_clip (no KL) freezes -w A.
CLIP_CASES = [
    # high: w = .75/.5 = 1.5 >= 1.28, A = +1, ref = log .6 -> rho = 1.2, l = -log .75 = .2876820725
    #   ppo: -1.28 * 1 ; fkl: -1.28 + .1 * 1.2 * .2876820725 ; rf: A_reg = 1 + .12/1.5 > 0 -> (1.28 + .12) * l
    ("high", .75, .5, .6, 1.0,
     {"ppo_clip": (-1.28, 0.0), "rpg_fkl": (-1.245478151305788, -0.12), "rpg_rf_fkl": (0.402754901432493, 0.0)}),
    # low: w = .25/.5 = .5 <= .8, A = -1, ref = log .25 -> rho = .5, l = -log .25 = 1.3862943611
    #   ppo: max(.5, .8) = .8 ; fkl: .8 + .1 * .5 * 1.3862943611 ; rf: A_reg = -1 + .05/.5 < 0 -> (-.8 + .05) * l
    ("low", .25, .5, .25, -1.0,
     {"ppo_clip": (0.8, 0.0), "rpg_fkl": (0.869314718055995, -0.05), "rpg_rf_fkl": (-1.039720770839918, 0.0)}),
    # dual: w = .5/.2 = 2.5 >= c = 2, A = -1, ref = log .5 -> rho = 2.5, l = -log .5 = .6931471806
    #   ppo: min(max(2.5, 1.28), 2) = 2 ; fkl: 2 + .1 * 2.5 * .6931471806 ; rf: A l c + C l = (-2 + .25) * l
    ("dual", .5, .2, .5, -1.0,
     {"ppo_clip": (2.0, 0.0), "rpg_fkl": (2.173286795139986, -0.25), "rpg_rf_fkl": (-1.213007565979904, 0.0)}),
    # positive A below the region is NOT clipped: w = .5, A = +1: ppo -.5, grad -w A = -.5
    #   fkl (ref = log .25, rho = .5): -.5 + .1 * .5 * 1.3862943611, grad -(.5 + .05) ; rf: active, Weight .55
    ("pos-below", .25, .5, .25, 1.0,
     {"ppo_clip": (-0.5, -0.5), "rpg_fkl": (-0.430685281944005, -0.55), "rpg_rf_fkl": (0.762461898615939, -0.55)}),
    # negative A above 1 + eps_high but below c is NOT clipped: w = 1.5, A = -1: ppo 1.5, grad +1.5
    #   fkl (rho 1.2, l .2876820725): 1.5 + .0345218487, grad 1.5 - .12 ; rf: psi < 0, active, Weight = -1.38
    ("neg-above", .75, .5, .6, -1.0,
     {"ppo_clip": (1.5, 1.5), "rpg_fkl": (1.534521848694212, 1.38), "rpg_rf_fkl": (-0.397001259983458, 1.38)}),
]


@pytest.mark.parametrize("label,p,po,pr,a,expected", CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_clip_hand_values(label, p, po, pr, a, expected):
    for name, (value, grad) in expected.items():
        logp = torch.tensor([[math.log(p)]], dtype=F64, requires_grad=True)
        args = (torch.tensor([[math.log(po)]], dtype=F64), torch.tensor([[math.log(pr)]], dtype=F64),
                torch.tensor([a], dtype=F64), torch.ones(1, 1, dtype=F64))
        beta = 0.0 if name == "ppo_clip" else 0.1
        for level in case(name).levels:
            params = LossParams(kl_coef=beta, clip_low=.2, clip_high=.28, dual_clip_c=2.0, level=level,
                                agg=aggs(level)[0])
            out = POLICY_LOSSES[name](logp, *args, params)
            (g,) = torch.autograd.grad(out.loss, logp)
            torch.testing.assert_close(out.loss.detach(), torch.tensor(value, dtype=F64), atol=1e-13, rtol=0)
            torch.testing.assert_close(g, torch.tensor([[grad]], dtype=F64), atol=1e-13, rtol=0)


def test_rf_clip_branches_on_regularized_advantage_not_on_a():
    """rpg_rf_rkl, A = .1 > 0 but A_reg = A - beta (d + 1) = .1 - 1 * 1.5 = -1.4 < 0 (beta = 1, d = .5):
    w = 1.5 is in (1 - eps_low, c) of the psi < 0 branch, so the gradient -w A_reg = 2.1 stays, while the
    fully differentiable rpg_rkl clips its reward term (A > 0, w >= 1.28): gradient beta w (d + 1) = 2.25."""
    logp = torch.tensor([[math.log(0.75)]], dtype=F64, requires_grad=True)
    old, ref = torch.tensor([[math.log(0.5)]], dtype=F64), torch.tensor([[math.log(0.75) - 0.5]], dtype=F64)
    args = (old, ref, torch.tensor([0.1], dtype=F64), torch.ones(1, 1, dtype=F64))
    params = LossParams(kl_coef=1.0, clip_low=.2, clip_high=.28, dual_clip_c=2.0)
    for name, grad in (("rpg_rf_rkl", 2.1), ("rpg_rkl", 2.25)):
        (g,) = torch.autograd.grad(POLICY_LOSSES[name](logp, *args, params).loss, logp)
        torch.testing.assert_close(g, torch.tensor([[grad]], dtype=F64), atol=1e-13, rtol=0)


@pytest.mark.parametrize("name,level,agg,est,clip", loss_configs())
def test_batch_matches_spec_reference(name, level, agg, est, clip):
    """A ragged batch (clipped samples included when clip is on) against the plain-float reference."""
    logp, old, ref, adv, mask = ragged_batch(lengths=(5, 3, 1, 4, 2, 5), seed=3, spread=0.4)
    beta = beta_for(name, est, 0.3)
    out = POLICY_LOSSES[name](logp, old, ref, adv, mask, params_for(level, agg, est, clip, beta))
    (g,) = torch.autograd.grad(out.loss, logp)
    value, grad = ref_loss(name, est, logp, old, ref, adv, mask, level, agg, beta, clip)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(value, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(g, torch.tensor(grad, dtype=F64), atol=1e-12, rtol=0)
    if clip is not None:
        assert out.metrics["clip/frac_zero_grad"] > 0 or level == "sequence", "batch should hit a clip branch"


def test_kl_estimator_hand_values():
    """k1 = d = log 1.375, k2 = d^2/2, k3 = r - 1 - log r with r = .4/.55 (logp = log .55, ref = log .4)."""
    lp, rf = torch.tensor([math.log(.55)], dtype=F64), torch.tensor([math.log(.4)], dtype=F64)
    torch.testing.assert_close(k1(lp, rf), torch.tensor([0.318453731118535], dtype=F64), atol=1e-14, rtol=0)
    torch.testing.assert_close(k2(lp, rf), torch.tensor([0.050706389431658], dtype=F64), atol=1e-14, rtol=0)
    torch.testing.assert_close(k3(lp, rf), torch.tensor([0.045726458391262], dtype=F64), atol=1e-14, rtol=0)
