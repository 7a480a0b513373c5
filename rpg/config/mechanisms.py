"""Which declared mechanisms a configuration makes inert, said before a run starts.

A clip, a KL term or a reference schedule that can never act is not an error (an on-policy baseline is a
legitimate run), but a user who set it expects it to matter: each note names the setting, why it cannot
act with the rest of the configuration, and what to change.
"""

from __future__ import annotations

from rpg.config import ESTIMATOR_LOSSES


def optimizer_steps_per_rl_step(cfg) -> int:
    batch = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    return cfg.ppo.epochs * -(-batch // cfg.ppo.mini_batch_size)


def inert_mechanisms(cfg) -> list[str]:
    """One sentence per mechanism that cannot act under ``cfg`` (empty when everything set can act)."""
    a = cfg.algo
    batch = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    steps = optimizer_steps_per_rl_step(cfg)
    off_policy_fix = (f"set ppo.mini_batch_size below the batch ({batch} responses; the paper takes 16 "
                      "optimizer steps per RL step) or ppo.epochs > 1")
    notes = []
    kl_on = a.kl_coef > 0 and (a.loss not in ESTIMATOR_LOSSES or a.kl_estimator is not None)
    if steps == 1:
        if a.clip_low is not None or a.clip_high is not None or a.dual_clip_c is not None:
            notes.append("the clip (algo.clip_low / clip_high / dual_clip_c) never acts: each RL step is one "
                         f"optimizer step at the sampling parameters, so w = 1; {off_policy_fix}")
        if kl_on and a.ref_update == "every_step":
            notes.append(f"the KL term (algo.kl_coef={a.kl_coef}) is evaluated at pi_theta = pi_ref = pi_old "
                         "only (algo.ref_update=every_step, one on-policy optimizer step): its value is 0 and it "
                         f"adds at most a constant to each sample's weight; {off_policy_fix}, or set "
                         "algo.ref_update=never / every_k / kl_threshold")
    if a.kl_coef == 0 and a.ref_update != "every_step":
        notes.append(f"algo.ref_update={a.ref_update} keeps and scores a reference model, but algo.kl_coef=0: "
                     "nothing uses it; set algo.ref_update=every_step (no second model) or a kl_coef > 0")
    if a.ref_update == "every_k" and cfg.steps and a.ref_update_k > steps * cfg.steps:
        notes.append(f"algo.ref_update_k={a.ref_update_k} optimizer steps exceeds the run's {steps * cfg.steps} "
                     "(steps x optimizer steps per RL step): the reference never refreshes; set a smaller algo.ref_update_k")
    if a.overlong_buffer_frac > 0 and a.overlong_penalty == 0:
        notes.append("algo.overlong_buffer_frac > 0 with algo.overlong_penalty=0 shapes nothing; set a penalty > 0")
    return notes
