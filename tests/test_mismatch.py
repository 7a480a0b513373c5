"""Rollout/trainer mismatch metrics and truncated-IS weights (rpg/rollout/mismatch.py)."""

import math

import pytest
import torch

from rpg.rollout.mismatch import mismatch_metrics, tis_weights

TOL = dict(rtol=0, atol=1e-12)


def _approx(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), **TOL)


def test_metrics_hand_values_ignore_masked_positions():
    sampler = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]], dtype=torch.float64)
    trainer = torch.tensor([[-1.5, -2.0, -1.0], [-0.25, 50.0, -50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = mismatch_metrics(sampler, trainer, mask)
    deltas = [-0.5, 0.0, 2.0, 0.25]  # trainer - sampler on the 4 unmasked tokens
    _approx(out["rollout/logp_absdiff_max"], 2.0)
    _approx(out["rollout/logp_absdiff_mean"], sum(abs(d) for d in deltas) / 4)
    _approx(out["rollout/sampler_trainer_kl"], sum(math.expm1(d) - d for d in deltas) / 4)
    assert set(out) == {"rollout/logp_absdiff_max", "rollout/logp_absdiff_mean", "rollout/sampler_trainer_kl"}


def test_identical_logps_give_zero_and_empty_mask_is_safe():
    lp = torch.log_softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), -1)
    out = mismatch_metrics(lp, lp.clone(), torch.ones(4, 6))
    assert out == {"rollout/logp_absdiff_max": 0.0, "rollout/logp_absdiff_mean": 0.0,
                   "rollout/sampler_trainer_kl": 0.0}
    empty = mismatch_metrics(lp, lp + 1, torch.zeros(4, 6))
    assert all(v == 0.0 for v in empty.values())


def test_kl_estimate_matches_exact_kl_on_average():
    """k3 over tokens drawn from the sampler is an unbiased estimate of KL(sampler || trainer)."""
    g = torch.Generator().manual_seed(1)
    p_s = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), -1)
    p_t = torch.softmax(torch.log(p_s) + 0.3 * torch.randn(8, generator=g, dtype=torch.float64), -1)
    exact = float((p_s * (p_s.log() - p_t.log())).sum())
    tokens = torch.multinomial(p_s, 200_000, replacement=True, generator=g).view(1, -1)
    out = mismatch_metrics(p_s.log()[tokens], p_t.log()[tokens], torch.ones_like(tokens))
    assert exact > 1e-3
    assert abs(out["rollout/sampler_trainer_kl"] - exact) < 0.05 * exact


def test_tis_weights_cap_mask_and_no_grad():
    old = torch.tensor([[-1.0, -1.0, -5.0, 0.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -2.0, -1.0, -900.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = tis_weights(old, sampler, mask, cap=2.0)
    expected = torch.tensor([[1.0, 2.0, math.exp(-4.0), 0.0]])  # e^1 > 2 is capped; masked -> 0
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)
    assert not w.requires_grad
    huge = tis_weights(torch.zeros(1, 2), torch.full((1, 2), -1e4), torch.ones(1, 2), cap=3.0)
    torch.testing.assert_close(huge, torch.full((1, 2), 3.0), rtol=0, atol=1e-6)  # no overflow to inf


def test_tis_weights_bad_input_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(x, x, x, cap=0.0)
    with pytest.raises(ValueError, match="shapes"):
        tis_weights(x, torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="shapes"):
        mismatch_metrics(x, x, torch.ones(3, 2))
