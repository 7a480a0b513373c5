"""Diagnostics every loss reports (detached)."""

from __future__ import annotations

import torch

from rpg.core.divergences import k1, k3
from rpg.core.masked import masked_max, masked_mean
from rpg.core.samples import Samples


def sample_metrics(s: Samples, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Importance-weight stats over samples and token-level KL estimates against pi_ref."""
    logp, mask = logp.detach(), mask.to(logp.dtype)
    return {
        "is/weight_mean": masked_mean(s.w.detach(), s.valid),
        "is/weight_max": masked_max(s.w.detach(), s.valid),
        "is/frac_ratio_clamped": masked_mean(s.clamped, s.valid),
        "kl/k1": masked_mean(k1(logp, ref_logp), mask),
        "kl/k3": masked_mean(k3(logp, ref_logp), mask),
    }
