"""The policy losses under the names users type (``algo.loss``), registered in one place.

``POLICY_LOSSES[name](logp, old_logp, ref_logp, advantages, mask, params)``; every entry computes in
float32 or wider whatever its inputs' dtype.  To add a loss: write its function (rpg/core/rpg_losses.py
or rpg/core/baseline_losses.py), register it below and give it a ``conf/algo/<name>.yaml``.
"""

from rpg.core.baseline_losses import grpo, grpo_is, ppo_clip
from rpg.core.registry import Registry
from rpg.core.rpg_losses import (
    fully_differentiable_loss,
    reinforce_loss,
    rpg_fkl,
    rpg_rf_fkl,
    rpg_rf_rkl,
    rpg_rf_ufkl,
    rpg_rf_urkl,
    rpg_rkl,
    rpg_ufkl,
    rpg_urkl,
)
from rpg.core.samples import at_least_float32
from rpg.core.types import BatchTotals, LossOutput, LossParams

POLICY_LOSSES = Registry("policy loss", wrap=at_least_float32)
for _fn in (rpg_fkl, rpg_rkl, rpg_ufkl, rpg_urkl,  # fully differentiable (Tables 1, 4)
            rpg_rf_fkl, rpg_rf_rkl, rpg_rf_ufkl, rpg_rf_urkl,  # REINFORCE-style (Table 2)
            grpo, grpo_is):  # GRPO and the paper's importance-weighted correction
    POLICY_LOSSES.register(_fn.__name__)(_fn)
POLICY_LOSSES.register("ppo_clip", "dapo", "reinforce_pp", "reinforce_pp_baseline")(ppo_clip)  # one function

__all__ = ["POLICY_LOSSES", "LossParams", "LossOutput", "BatchTotals", "fully_differentiable_loss", "reinforce_loss"]
