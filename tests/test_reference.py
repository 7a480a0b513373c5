"""The reference-policy schedules of rpg.train.reference on the real tiny model: when the anchor moves, and to what."""

from __future__ import annotations

import pytest
import torch

from rpg.backend.local import frozen_copy
from rpg.models.tiny import build_char_tokenizer, build_tiny_model
from rpg.train.reference import Reference


@pytest.fixture(scope="module")
def models():
    tok = build_char_tokenizer()
    return build_tiny_model(seed=0, tokenizer=tok), build_tiny_model(seed=1, tokenizer=tok)


def refresh_steps(ref: Reference, policy, per_rl_step: int, rl_steps: int, kl: float = 0.0) -> list[int]:
    """The RL steps (1-based) after which the anchor was refreshed."""
    return [s for s in range(1, rl_steps + 1) if ref.after_update(policy, s * per_rl_step, kl)]


@pytest.mark.parametrize("k,per_rl_step,expected", [
    (20, 16, [2, 4, 6, 8, 10]),  # 32 >= 20 optimizer steps since the last refresh, then again 32 later
    (10, 16, list(range(1, 11))),  # more optimizer steps per RL step than K: every RL step
    (16, 16, list(range(1, 11))),
    (3, 1, [3, 6, 9]),  # one optimizer step per RL step: exactly every K
])
def test_every_k_counts_optimizer_steps_since_the_last_refresh(models, k, per_rl_step, expected):
    policy, init = models
    ref = Reference(frozen_copy(init), "every_k", k=k)
    assert refresh_steps(ref, policy, per_rl_step, 10) == expected


def test_refresh_copies_the_policy_into_the_anchor(models):
    policy, init = models
    ref = Reference(frozen_copy(init), "every_k", k=1)
    assert not torch.equal(ref.model.lm_head.weight, policy.lm_head.weight)
    assert ref.after_update(policy, 1, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(), policy.state_dict().values()))
    assert not any(p.requires_grad for p in ref.model.parameters())


def test_kl_threshold_averages_without_the_ema_start_bias(models):
    policy, init = models
    above = Reference(frozen_copy(init), "kl_threshold", kl_threshold=0.05, kl_ema=0.9)
    assert refresh_steps(above, policy, 16, 1, kl=0.06) == [1]  # a KL of 0.06 every step is above 0.05
    below = Reference(frozen_copy(init), "kl_threshold", kl_threshold=0.05, kl_ema=0.9)
    assert refresh_steps(below, policy, 16, 50, kl=0.04) == []
    assert below.kl_avg == pytest.approx(0.04, rel=1e-12)


def test_kl_threshold_restarts_its_average_after_a_refresh(models):
    policy, init = models
    ref = Reference(frozen_copy(init), "kl_threshold", kl_threshold=0.05, kl_ema=0.5)
    kls = [0.2, 0.01, 0.01, 0.2, 0.01]
    fired = [ref.after_update(policy, 16 * (i + 1), kl) for i, kl in enumerate(kls)]
    # refresh at 0.2; the next average is 0.01 alone (not mixed with the old 0.2); 0.01, 0.01, 0.2 -> 0.119
    assert fired == [True, False, False, True, False] and ref.refreshes == 2
    assert ref.kl_avg == pytest.approx(0.01)


def test_schedule_state_survives_a_checkpoint(models):
    policy, init = models
    straight = refresh_steps(Reference(frozen_copy(init), "every_k", k=20), policy, 16, 6)
    interrupted = Reference(frozen_copy(init), "every_k", k=20)
    head = refresh_steps(interrupted, policy, 16, 3)
    resumed = Reference(frozen_copy(init), "every_k", k=20)
    resumed.load_state_dict(interrupted.state_dict())
    tail = [s for s in range(4, 7) if resumed.after_update(policy, s * 16, 0.0)]
    assert straight == head + tail == [2, 4, 6]
