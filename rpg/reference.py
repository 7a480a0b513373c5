"""The KL anchor pi_ref and its update policy (paper Section 5, "iterative reference"; ALGORITHMS.md section 6).

every_step   ref = the policy that sampled the batch (ref_logp = old_logp; no second model)
every_k      ref <- policy every K optimizer steps
kl_threshold ref <- policy when a moving average of token KL (k3) to ref exceeds kappa
never        frozen initial policy (GRPO's default; the Figure 9 ablation)
"""

from __future__ import annotations

import copy

import torch


class Reference:
    def __init__(self, policy, mode: str, k: int = 10, kl_threshold: float = 0.05, kl_ema: float = 0.9):
        self.mode, self.k, self.kl_threshold, self.kl_ema = mode, k, kl_threshold, kl_ema
        self.model = None if mode == "every_step" else _frozen_copy(policy)
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
        return {"model": None if self.model is None else self.model.state_dict(),
                "kl_avg": self.kl_avg, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        if self.model is not None and state["model"] is not None:
            self.model.load_state_dict(state["model"])
        self.kl_avg, self.refreshes = state["kl_avg"], state["refreshes"]


def _frozen_copy(policy):
    ref = copy.deepcopy(policy).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
