"""Trust-region clipping shared by the losses: which samples lose their gradient, and at what value.

PPO clip with optional dual clip (Schulman et al. 2017; Ye et al. 2020), in the branch form of the
paper's RPG-Style Clip (Section 4.1, Algorithm 2):
  positive signal (A >= 0): gradient iff w < 1 + eps_high, else constant at w = 1 + eps_high  ("high")
  negative signal (A <  0): constant at w = 1 - eps_low if w <= 1 - eps_low                   ("low")
                            constant at w = c           if w >= c (dual clip)                   ("dual")
                            gradient otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rpg.core.masked import masked_mean
from rpg.core.types import LossParams


@dataclass
class ClipBranches:
    high: torch.Tensor  # bool, positive signal above the trust region
    low: torch.Tensor  # bool, negative signal below the trust region
    dual: torch.Tensor  # bool, negative signal at or above the dual-clip bound c
    bound: torch.Tensor  # the importance weight a clipped sample is frozen at (detached)
    has_dual: bool = False  # a dual-clip bound c is configured (else ``dual`` is all False)

    @property
    def active(self) -> torch.Tensor:
        """True where the sample keeps its gradient."""
        return ~(self.high | self.low | self.dual)


def clip_branches(w: torch.Tensor, positive: torch.Tensor, params: LossParams) -> ClipBranches:
    """Branches of every sample given its weight w and the sign of its learning signal."""
    w = w.detach()
    if not params.clipped:
        none = torch.zeros_like(w, dtype=torch.bool)
        return ClipBranches(none, none, none, w)
    high = positive & (w >= 1.0 + params.clip_high)
    low = ~positive & (w <= 1.0 - params.clip_low)
    c = params.dual_clip_c
    dual = ~positive & ~low & (w >= c) if c is not None else torch.zeros_like(high)
    bound = torch.where(high, 1.0 + params.clip_high, torch.where(low, 1.0 - params.clip_low, w))
    if c is not None:
        bound = torch.where(dual, torch.full_like(w, c), bound)
    return ClipBranches(high, low, dual, bound, has_dual=c is not None)


def clipped_pg_term(w: torch.Tensor, adv: torch.Tensor, params: LossParams) -> tuple[torch.Tensor, ClipBranches]:
    """PPO (dual-)clip surrogate of the reward part, per sample: -w A inside the region, a constant outside.

    Equals max(-w A, -clip(w, 1-eps_low, 1+eps_high) A), and min(that, -c A) for A < 0, with exactly
    the gradient -A grad w inside and none outside.  w, adv: same shape ([N, T] or [N]).
    """
    branches = clip_branches(w, adv >= 0, params)
    term = torch.where(branches.active, -w * adv, -branches.bound * adv)
    return term, branches


def clip_metrics(branches: ClipBranches, valid: torch.Tensor, signal: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shares of valid samples in each branch.  A sample whose learning signal (A, or psi for RPG-Style
    Clip) is 0 has no gradient on either side of a bound, so it never counts as clipped (as verl's
    clipfrac, which counts where the clipped loss differs from the unclipped one).  ``clip/frac_dual`` only
    with a dual-clip bound: without one it is 0 by construction."""
    f = lambda b: masked_mean((b & (signal != 0)).to(valid.dtype), valid).detach()
    metrics = {"clip/frac_high": f(branches.high), "clip/frac_low": f(branches.low)}
    if branches.has_dual:
        metrics["clip/frac_dual"] = f(branches.dual)
    metrics["clip/frac_zero_grad"] = f(~branches.active)
    return metrics
