"""Public entry point of the policy losses: ``POLICY_LOSSES[name](logp, old_logp, ref_logp, advantages, mask, params)``.

Names are what users type as ``algo=``: rpg_fkl rpg_rkl rpg_ufkl rpg_urkl (fully differentiable),
rpg_rf_fkl rpg_rf_rkl rpg_rf_ufkl rpg_rf_urkl (REINFORCE-style), grpo, grpo_is, and ppo_clip
(also registered as dapo, reinforce_pp, reinforce_pp_baseline).
"""

from rpg.core import baseline_losses as _baseline_losses  # noqa: F401  (registers the baselines)
from rpg.core.rpg_losses import POLICY_LOSSES, fully_differentiable_loss, reinforce_loss
from rpg.core.types import BatchTotals, LossOutput, LossParams

__all__ = ["POLICY_LOSSES", "LossParams", "LossOutput", "BatchTotals", "fully_differentiable_loss", "reinforce_loss"]
