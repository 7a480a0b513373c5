"""The KL anchor pi_ref and its update policy (paper Section 5, "iterative reference"; docs/algorithms.md section 6).

every_step   ref = the policy that sampled the batch (ref_logp = old_logp; no second model)
every_k      ref <- policy at the end of each RL step by which K or more optimizer steps have passed since
             the last refresh (the anchor can only move between updates: with 16 optimizer steps per RL
             step and K <= 16 that is every RL step)
kl_threshold ref <- policy when the moving average of token KL (k3) to ref exceeds kappa; the average
             restarts after each refresh and is bias-corrected (an EMA started at 0 would otherwise
             under-read the KL for its first ~1/(1-ema) updates)
never        frozen initial policy (GRPO's default; the Figure 9 ablation)
"""

from __future__ import annotations

import torch


def needs_model(mode: str) -> bool:
    """Whether the anchor is a model of its own (every mode but every_step)."""
    return mode != "every_step"


class Reference:
    """``model``: a frozen copy of the initial policy (rpg.backend's reference_model), None for every_step."""

    def __init__(self, model, mode: str, k: int = 10, kl_threshold: float = 0.05, kl_ema: float = 0.9):
        if needs_model(mode) != (model is not None):
            raise ValueError(f"ref_update={mode} needs {'a' if needs_model(mode) else 'no'} reference model")
        self.mode, self.k, self.kl_threshold, self.kl_ema = mode, k, kl_threshold, kl_ema
        self.model = model
        self.refreshes = 0
        self._ema, self._updates = 0.0, 0  # raw EMA of the token KL and its updates since the last refresh
        self._last_refresh_step = 0  # optimizer steps at the last refresh

    @property
    def kl_avg(self) -> float:
        """Bias-corrected moving average of the token KL since the last refresh (0 right after one)."""
        return self._ema / (1 - self.kl_ema ** self._updates) if self._updates else 0.0

    def logprobs(self, compute, old_logp: torch.Tensor) -> torch.Tensor:
        """``compute(model)`` scores the batch with a model; with ref = old nothing is recomputed."""
        return old_logp if self.model is None else compute(self.model)

    def after_update(self, policy, optimizer_steps: int, token_kl: float) -> bool:
        """Refresh the anchor if the policy says so; returns whether it did.  ``optimizer_steps``: the total
        so far, ``token_kl``: the mean token KL to the anchor measured in this RL step."""
        if self.model is None:
            return False
        self._ema = self.kl_ema * self._ema + (1 - self.kl_ema) * token_kl
        self._updates += 1
        due = (self.mode == "every_k" and optimizer_steps - self._last_refresh_step >= self.k) or (
            self.mode == "kl_threshold" and self.kl_avg > self.kl_threshold)
        if due:
            self.model.load_state_dict(policy.state_dict())
            self._ema, self._updates = 0.0, 0
            self._last_refresh_step = optimizer_steps
            self.refreshes += 1
        return due

    def state_dict(self) -> dict:
        """The schedule's state; the model's weights are checkpointed by the backend."""
        return {"refreshes": self.refreshes, "ema": self._ema, "updates": self._updates,
                "last_refresh_step": self._last_refresh_step}

    def load_state_dict(self, state: dict) -> None:
        self.refreshes = state["refreshes"]
        # checkpoints written before these were kept: restart the average, count from step 0
        self._ema, self._updates = state.get("ema", 0.0), state.get("updates", 0)
        self._last_refresh_step = state.get("last_refresh_step", 0)
