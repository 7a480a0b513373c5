"""Baseline losses the paper compares against (docs/algorithms.md section 4); token level only.

All use the PPO clip surrogate on the token ratio w_t = pi_theta/pi_old (rpg.core.clipping) and differ in
the KL penalty added per token, computed against pi_ref with the current log-probs:
  grpo        beta * k3(pi_ref/pi_theta)        (DeepSeekMath GRPO; no importance weight)
  grpo_is     beta * w_t * k3(pi_ref/pi_theta)  (the paper's correction, Section 2.2; w_t carries grad)
  ppo_clip    beta * k_X, X = params.kl_estimator in k1/k2/k3, or no KL (dapo, reinforce_pp*)
Gradient facts (tested): the grpo term's per-token gradient is (1 - pi_ref/pi_theta) grad log pi_theta,
whose expectation under pi_theta is the gradient of the *forward* KL(pi_ref || pi_theta); the grpo_is
term's gradient is w log(pi_theta/pi_ref) grad log pi_theta, the exact URKL gradient for any pi_old.
Arguments as in rpg.core.rpg_losses; rpg.core.losses registers these functions.
"""

from __future__ import annotations

import torch

from rpg.core.clipping import clip_metrics, clipped_pg_term
from rpg.core.common_metrics import sample_metrics
from rpg.core.divergences import KL_ESTIMATORS, k3
from rpg.core.masked import aggregate
from rpg.core.registry import member
from rpg.core.samples import build_samples, zero_padding
from rpg.core.types import BatchTotals, LossOutput, LossParams


def _ppo_with_penalty(penalty: torch.Tensor | None, s, logp, old_logp, ref_logp, mask, params, totals,
                      token_weights) -> LossOutput:
    pg, branches = clipped_pg_term(s.w, s.adv, params)
    pg_loss = aggregate(pg, mask, params.agg, totals, token_weights)
    loss, metrics = pg_loss, {"loss/pg": pg_loss.detach()}
    if penalty is not None:
        kl_loss = aggregate(penalty, mask, params.agg, totals, token_weights)
        loss = loss + params.kl_coef * kl_loss
        metrics["loss/kl"] = kl_loss.detach()
    metrics.update(clip_metrics(branches, s.valid, s.adv))
    metrics.update(sample_metrics(s, logp, old_logp, ref_logp, mask))
    return LossOutput(loss, metrics)


def _token_samples(logp, old_logp, ref_logp, advantages, mask, params: LossParams, name: str):
    if params.level != "token":
        raise ValueError(f"{name} is a token-level loss; set level=token (got level={params.level!r})")
    s = build_samples(logp, old_logp, ref_logp, advantages, mask, params)
    return s, *zero_padding(mask, logp, old_logp.detach(), ref_logp.detach())


@member("grpo")
def grpo(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals: BatchTotals | None = None,
         token_weights=None) -> LossOutput:
    """GRPO: per token  max(-w A, -clip(w) A) + beta * k3(pi_ref/pi_theta)  (Shao et al. 2024; paper Section 2.2)."""
    s, logp, old_logp, ref_logp = _token_samples(logp, old_logp, ref_logp, advantages, mask, params, "grpo")
    return _ppo_with_penalty(k3(logp, ref_logp), s, logp, old_logp, ref_logp, mask, params, totals, token_weights)


@member("grpo_is")
def grpo_is(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals: BatchTotals | None = None,
            token_weights=None) -> LossOutput:
    """GRPO with the importance-weighted KL: per token  max(-w A, -clip(w) A) + beta * w * k3(pi_ref/pi_theta)."""
    s, logp, old_logp, ref_logp = _token_samples(logp, old_logp, ref_logp, advantages, mask, params, "grpo_is")
    return _ppo_with_penalty(s.w * k3(logp, ref_logp), s, logp, old_logp, ref_logp, mask, params, totals, token_weights)


@member("ppo")
def ppo_clip(logp, old_logp, ref_logp, advantages, mask, params: LossParams, totals: BatchTotals | None = None,
             token_weights=None) -> LossOutput:
    """PPO (dual-)clip, per token  max(-w A, -clip(w) A) [min -c A for A < 0] + beta * k_X(logp, ref).

    Used by dapo (no KL, clip-higher (0.2, 0.28), token-mean) and reinforce_pp / reinforce_pp_baseline
    (k1 in the loss with beta = 1e-4 against ref = old).  k_X from params.kl_estimator (None = no KL term).
    """
    s, logp, old_logp, ref_logp = _token_samples(logp, old_logp, ref_logp, advantages, mask, params, "ppo_clip")
    if params.kl_coef > 0 and params.kl_estimator is None:
        raise ValueError("ppo_clip with kl_coef > 0 needs kl_estimator (k1, k2 or k3); or set kl_coef=0")
    penalty = None
    if params.kl_estimator is not None and params.kl_coef > 0:
        penalty = KL_ESTIMATORS[params.kl_estimator](logp, ref_logp)
    return _ppo_with_penalty(penalty, s, logp, old_logp, ref_logp, mask, params, totals, token_weights)
