"""Diagnostics every loss reports (detached)."""

from __future__ import annotations

import torch

from rpg.core.divergences import k1, k3
from rpg.core.masked import masked_max, masked_mean
from rpg.core.samples import Samples


def sample_metrics(s: Samples, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                   mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Importance-weight stats over samples and per-token KL estimates against pi_ref.

    The tokens were sampled from pi_old, so (per token, given its prefix):
      kl/k1, kl/k3        plain means of k1 = log pi_theta/pi_ref and k3 = r - 1 - log r (r = pi_ref/pi_theta);
                          they estimate KL(pi_theta || pi_ref) only on-policy (pi_theta = pi_old).  With
                          ref = old, E_old[k1] = -KL(pi_old || pi_theta) <= 0.
      kl/k1_iw, kl/k3_iw  the same weighted by w_t = pi_theta/pi_old: unbiased for KL(pi_theta || pi_ref)
                          off-policy too.
    is/frac_ratio_clamped, is/frac_rho_clamped: shares of samples whose log w or log rho hit max_log_ratio.
    """
    logp, mask = logp.detach(), mask.to(logp.dtype)
    w_token = torch.exp((logp - old_logp.detach()).clamp(max=20.0))
    per_k1, per_k3 = k1(logp, ref_logp), k3(logp, ref_logp)
    return {
        "is/weight_mean": masked_mean(s.w.detach(), s.valid),
        "is/weight_max": masked_max(s.w.detach(), s.valid),
        "is/frac_ratio_clamped": masked_mean(s.clamped, s.valid),
        "is/frac_rho_clamped": masked_mean(s.rho_clamped, s.valid),
        "kl/k1": masked_mean(per_k1, mask),
        "kl/k3": masked_mean(per_k3, mask),
        "kl/k1_iw": masked_mean(w_token * per_k1, mask),
        "kl/k3_iw": masked_mean(w_token * per_k3, mask),
    }
