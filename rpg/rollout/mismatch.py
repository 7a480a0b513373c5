"""Rollout/trainer mismatch: how far the engine's log-probs are from the trainer's, and the truncated
importance-sampling (TIS) weight that corrects for it.

With a separate inference engine (vLLM, other kernels, bf16) the tokens are sampled from pi_sampler,
not from the trainer's pi_old, even at identical weights. TIS (Yao et al., 2025, "Your efficient RL
framework secretly brings you off-policy RL training") multiplies each token's policy-gradient term by
min(pi_old / pi_sampler, cap). Only torch is needed here.
"""

from __future__ import annotations

import math

import torch


def mismatch_metrics(sampler_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Summaries over the response tokens where ``mask`` is 1 (tensors [B, R]); python floats.

    rollout/logp_absdiff_max, rollout/logp_absdiff_mean: |log pi_sampler - log pi_trainer| per token.
    rollout/sampler_trainer_kl: per-token KL(pi_sampler || pi_trainer) estimated on the sampled tokens
    with the non-negative k3 estimator r - 1 - log r, r = pi_trainer / pi_sampler (unbiased because
    the tokens were drawn from pi_sampler). All 0.0 when the mask is empty.
    """
    if sampler_logp.shape != trainer_logp.shape or sampler_logp.shape != mask.shape:
        raise ValueError(f"shapes differ: sampler {tuple(sampler_logp.shape)}, trainer "
                         f"{tuple(trainer_logp.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    if not m.any():
        return {"rollout/logp_absdiff_max": 0.0, "rollout/logp_absdiff_mean": 0.0,
                "rollout/sampler_trainer_kl": 0.0}
    delta = (trainer_logp.detach().double() - sampler_logp.detach().double())[m]
    k3 = torch.expm1(delta) - delta
    return {"rollout/logp_absdiff_max": float(delta.abs().max()),
            "rollout/logp_absdiff_mean": float(delta.abs().mean()),
            "rollout/sampler_trainer_kl": float(k3.mean())}


def tis_weights(trainer_old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                cap: float = 2.0) -> torch.Tensor:
    """Per-token truncated IS weight min(exp(old - sampler), cap), 0 where ``mask`` is 0; no grad.

    ``cap`` (> 0) bounds the variance; the log-ratio is clamped at log(cap) before ``exp`` so extreme
    mismatches never overflow.
    """
    if not cap > 0:
        raise ValueError(f"cap={cap}: the TIS cap must be > 0 (typical: 2)")
    if trainer_old_logp.shape != sampler_logp.shape or sampler_logp.shape != mask.shape:
        raise ValueError(f"shapes differ: trainer_old {tuple(trainer_old_logp.shape)}, sampler "
                         f"{tuple(sampler_logp.shape)}, mask {tuple(mask.shape)}")
    log_ratio = (trainer_old_logp.detach() - sampler_logp.detach()).clamp(max=math.log(cap))
    return torch.where(mask.bool(), torch.exp(log_ratio), torch.zeros_like(log_ratio))
