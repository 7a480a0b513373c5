"""The paper's losses: fully differentiable (section 3a) and REINFORCE-style (section 3b) surrogates.

Notation (docs/algorithms.md section 1): w = pi_theta/pi_old, d = log pi_theta/pi_ref, rho = pi_ref/pi_old,
A = advantage, beta = kl_coef.  Samples are tokens (level="token") or responses (level="sequence").
Every variant's exact gradient is  -E_{pi_old}[Weight_X grad log pi_theta]  with (section 2)
  FKL:  w A + beta rho       RKL:  w (A - beta (d + 1))
  UFKL: w A - beta (w - rho) URKL: w (A - beta d)
Arguments of every loss: logp, old_logp, ref_logp, mask: [N, T]; advantages: [N];
params: LossParams; totals: BatchTotals of the whole mini-batch (None = this batch);
token_weights: optional [N, T] per-token factors on each sample's loss (level=token; e.g. truncated IS).
Every registered loss computes in float32 or wider (float64 inputs stay float64), whatever the inputs' dtype.
"""

from __future__ import annotations

import torch

from rpg.core.clipping import clip_branches, clip_metrics, clipped_pg_term
from rpg.core.common_metrics import sample_metrics
from rpg.core.divergences import RPG_KL_TERMS, RPG_KL_WEIGHTS
from rpg.core.masked import aggregate, masked_mean
from rpg.core.registry import member
from rpg.core.samples import build_samples
from rpg.core.types import BatchTotals, LossOutput, LossParams


def fully_differentiable_loss(kl: str, logp, old_logp, ref_logp, advantages, mask, params: LossParams,
                              totals: BatchTotals | None = None, token_weights=None) -> LossOutput:
    """Per sample  L = clipterm(w, A) + beta * KLterm_X(w, d, rho, log pi)  (Tables 1 and 4, Section 3.3).

    The gradient flows through w and d.  clipterm is -w A unclipped, or the PPO dual-clip surrogate
    (rpg.core.clipping) which touches the reward part only; the KL part stays unclipped (Appendix G.1).
    Unclipped, grad L = -Weight_X grad log pi_theta exactly.
    """
    s = build_samples(logp, old_logp, ref_logp, advantages, mask, params)
    pg, branches = clipped_pg_term(s.w, s.adv, params)
    kl_term = RPG_KL_TERMS[kl](s.w, s.d, s.rho, s.logpi)
    pg_loss = aggregate(pg, mask, params.agg, totals, token_weights)
    kl_loss = aggregate(kl_term, mask, params.agg, totals, token_weights)
    loss = pg_loss + params.kl_coef * kl_loss
    metrics = {"loss/pg": pg_loss.detach(), "loss/kl": kl_loss.detach(), **clip_metrics(branches, s.valid, s.adv),
               **sample_metrics(s, logp, old_logp, ref_logp, mask)}
    return LossOutput(loss, metrics)


def reinforce_loss(kl: str, logp, old_logp, ref_logp, advantages, mask, params: LossParams,
                   totals: BatchTotals | None = None, token_weights=None) -> LossOutput:
    """Per sample  L = -SG(Weight_X) * log pi_theta(x)  (Table 2, Appendix F); only log pi carries gradient.

    With clip bounds set, RPG-Style Clip (Section 4.1, Algorithm 2): write Weight = w * A_reg with
    A_reg = A + SG(C)/SG(w), C = beta * kl_weight the KL part of the weight, and psi = A_reg * (-log pi).
    The sample keeps the loss psi * SG(w) (same gradient as unclipped) when psi >= 0 and w < 1 + eps_high,
    or when psi < 0 and 1 - eps_low < w < c; otherwise it is frozen (no gradient) at its value at the
    boundary, (A + SG(C)/bound) * SG(l) * bound with bound = 1 + eps_high, 1 - eps_low or c (Algorithm 2).
    Unclipped this has exactly the per-sample gradient of ``fully_differentiable_loss`` (Proposition 4.1).
    The branch follows the sign of psi (Algorithm 2), which is that of A_reg wherever -log pi > 0; where
    pi(x) = 1 the gradient of log pi is 0 on either branch.
    """
    s = build_samples(logp, old_logp, ref_logp, advantages, mask, params)
    w, d, rho = s.w.detach(), s.d.detach(), s.rho
    kl_part = params.kl_coef * RPG_KL_WEIGHTS[kl](w, d, rho)
    weight = w * s.adv + kl_part
    per_sample = -weight * s.logpi
    nll = -s.logpi.detach()
    psi = (s.adv + kl_part / w) * nll
    branches = clip_branches(w, psi >= 0, params)
    if params.clipped:
        frozen = (s.adv * branches.bound + kl_part) * nll
        per_sample = torch.where(branches.active, per_sample, frozen)
    loss = aggregate(per_sample, mask, params.agg, totals, token_weights)
    metrics = {"loss/pg": loss.detach(), "adv/reg_mean": masked_mean(weight / w, s.valid).detach(),
               **clip_metrics(branches, s.valid, psi), **sample_metrics(s, logp, old_logp, ref_logp, mask)}
    return LossOutput(loss, metrics)


# One function per variant (the name users type as algo=); rpg.core.losses registers them.

@member("fd", "fkl")
def rpg_fkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-FKL (Table 1): L = -w A - beta rho log pi_theta(x); paper form -w A - beta log pi_theta(x)."""
    return fully_differentiable_loss("fkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


@member("fd", "rkl")
def rpg_rkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-RKL (Table 1): L = w (-A + beta d); paper form w (-A + beta log w)."""
    return fully_differentiable_loss("rkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


@member("fd", "ufkl")
def rpg_ufkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-UFKL (Table 4): L = -w A + beta (w - rho log pi_theta(x)); paper form -w A + beta (w - log w - 1)."""
    return fully_differentiable_loss("ufkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


@member("fd", "urkl")
def rpg_urkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-URKL (Table 4): L = -w A + beta (w d - w); paper form -w A + beta (w log w - w)."""
    return fully_differentiable_loss("urkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


@member("rf", "fkl")
def rpg_rf_fkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-REINFORCE-FKL (Table 2): L = -SG(w A + beta rho) log pi_theta(x)."""
    return reinforce_loss("fkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


@member("rf", "rkl")
def rpg_rf_rkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-REINFORCE-RKL (Table 2): L = -SG(w (A - beta (d + 1))) log pi_theta(x)."""
    return reinforce_loss("rkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


@member("rf", "ufkl")
def rpg_rf_ufkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-REINFORCE-UFKL (Table 2): L = -SG(w A - beta (w - rho)) log pi_theta(x)."""
    return reinforce_loss("ufkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)


@member("rf", "urkl")
def rpg_rf_urkl(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals=None, token_weights=None):
    """RPG-REINFORCE-URKL (Table 2): L = -SG(w (A - beta d)) log pi_theta(x)."""
    return reinforce_loss("urkl", logp, old_logp, ref_logp, advantages, mask, params, totals, token_weights)
