"""A run's own state in its checkpoints, beside the weights, the optimizer and the reference model: one
definition that saving and resuming share."""

from __future__ import annotations

from dataclasses import dataclass, field

from rpg.backend import checkpoint
from rpg.tracking.identity import resume_key


@dataclass
class Progress:
    step: int = 0  # RL steps done
    run_id: str | None = None  # the MLflow run it logs to
    first_eval: dict[str, float] = field(default_factory=dict)  # held-out metrics at step 0
    final: dict[str, float] = field(default_factory=dict)  # the latest value of every metric


def checkpoint_state(progress: Progress, learner, sampler, cfg) -> dict:
    """What a checkpoint holds besides what the backend saves (weights, optimizer, reference)."""
    return {**learner.state_dict(), "sampler": sampler.state_dict(), "rng": checkpoint.rng_state(),
            "step": progress.step, "run_id": progress.run_id, "resume_key": resume_key(cfg),
            "first_eval": progress.first_eval, "final": progress.final}


def restore(state: dict, learner, sampler) -> Progress:
    """Put ``checkpoint_state``'s contents back into the learner, the prompt sampler and the RNGs."""
    learner.load_state_dict(state)
    sampler.load_state_dict(state["sampler"])
    checkpoint.set_rng_state(state["rng"])
    return Progress(state["step"], state["run_id"], dict(state.get("first_eval", {})), dict(state.get("final", {})))
