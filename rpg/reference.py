"""The KL anchor pi_ref and its update policy (paper Section 5, "iterative reference"; ALGORITHMS.md section 6).

every_step   ref = the policy that sampled the batch (ref_logp = old_logp; no second model)
every_k      ref <- policy every K optimizer steps
kl_threshold ref <- policy when a moving average of token KL (k3) to ref exceeds kappa
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
        self.kl_avg = 0.0
        self.refreshes = 0

    def logprobs(self, compute, old_logp: torch.Tensor) -> torch.Tensor:
        """``compute(model)`` scores the batch with a model; with ref = old nothing is recomputed."""
        return old_logp if self.model is None else compute(self.model)

    def after_update(self, policy, optimizer_steps: int, token_kl: float) -> bool:
        """Refresh the anchor if the policy says so; returns whether it did."""
        if self.model is None:
            return False
        self.kl_avg = self.kl_ema * self.kl_avg + (1 - self.kl_ema) * token_kl
        due = (self.mode == "every_k" and optimizer_steps % self.k == 0) or (
            self.mode == "kl_threshold" and self.kl_avg > self.kl_threshold)
        if due:
            self.model.load_state_dict(policy.state_dict())
            self.kl_avg = 0.0
            self.refreshes += 1
        return due

    def state_dict(self) -> dict:
        """The schedule's state; the model's weights are checkpointed by the backend."""
        return {"kl_avg": self.kl_avg, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.kl_avg, self.refreshes = state["kl_avg"], state["refreshes"]
