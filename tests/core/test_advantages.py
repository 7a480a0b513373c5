"""Advantage estimators: hand values for every registered name, and zero advantage for constant rewards.

Batch (group ids deliberately unsorted and non-contiguous):
  rewards  1 0 0 | 2 2 2 | 5 3 | 4
  group    7 7 7 | 3 3 3 | 9 9 | 1
group 7: mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std = 0.577350269189626
group 3: constant;  group 9: mean 4, unbiased var (1 + 1) / 1 = 2, std = 1.414213562373095;  group 1: one response
"""

from __future__ import annotations

import pytest
import torch

from rpg.core.advantages import ADVANTAGES, GROUP_ADVANTAGES

F64 = torch.float64
R = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 5.0, 3.0, 4.0], dtype=F64)
G = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9, 1])
MASK = torch.ones(9, 4, dtype=F64)
S7, S9, EPS = 0.577350269189626, 1.414213562373095, 1e-6

HAND = {
    "group_zscore": [(2 / 3) / (S7 + EPS), (-1 / 3) / (S7 + EPS), (-1 / 3) / (S7 + EPS), 0, 0, 0,
                     1 / (S9 + EPS), -1 / (S9 + EPS), 0],  # singleton: std 0 -> 0 / (0 + eps) = 0
    "group_mean": [2 / 3, -1 / 3, -1 / 3, 0, 0, 0, 1, -1, 0],
    "batch_mean": [r - 19 / 9 for r in (1, 0, 0, 2, 2, 2, 5, 3, 4)],  # batch mean 19 / 9
    # R_i minus the mean of the others in its group: 1 - 0, 0 - (1 + 0)/2, ...; 5 - 3, 3 - 5; singleton -> 0
    "rloo": [1, -0.5, -0.5, 0, 0, 0, 2, -2, 0],
}
# REINFORCE++ whitening over valid tokens weights a response by its length.
# reinforce_pp: rewards [1, 0], lengths [3, 1] -> tokens 1 1 1 0: mean .75, unbiased var
#   (3 * .0625 + .5625) / 3 = .25, std .5 -> [.25 / (.5 + eps), -.75 / (.5 + eps)]
# reinforce_pp_baseline: rewards [1, 0, 3, 3], groups [0, 0, 1, 1], lengths [3, 1, 2, 2] -> R - mean_G = [.5, -.5, 0, 0]
#   tokens .5 x3, -.5, 0 x4: mean .125, squares 3 * .375^2 + .625^2 + 4 * .125^2 = .875, var .875 / 7 = .125,
#   std = 0.353553390593274 -> [.375, -.625, -.125, -.125] / (std + eps)
S_PP = 0.353553390593274
LENGTH_CASES = {
    "reinforce_pp": ([1.0, 0.0], [0, 1], [3, 1], [0.25 / (0.5 + EPS), -0.75 / (0.5 + EPS)]),
    "reinforce_pp_baseline": ([1.0, 0.0, 3.0, 3.0], [0, 0, 1, 1], [3, 1, 2, 2],
                              [x / (S_PP + EPS) for x in (0.375, -0.625, -0.125, -0.125)]),
}
GROUP_BASED = {"group_zscore": True, "group_mean": True, "rloo": True, "reinforce_pp_baseline": True,
               "batch_mean": False, "reinforce_pp": False}


def _mask(lengths, t=4):
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_hand_values(name):
    assert name in HAND or name in LENGTH_CASES, f"no hand value for advantage {name!r}"
    if name in HAND:
        got = ADVANTAGES[name](R, G, MASK)
        torch.testing.assert_close(got, torch.tensor(HAND[name], dtype=F64), atol=1e-12, rtol=0)
        assert got.dtype == F64 and got.shape == R.shape
    if name in LENGTH_CASES:
        rewards, groups, lengths, want = LENGTH_CASES[name]
        got = ADVANTAGES[name](torch.tensor(rewards, dtype=F64), torch.tensor(groups), _mask(lengths))
        torch.testing.assert_close(got, torch.tensor(want, dtype=F64), atol=1e-12, rtol=0)
        # the same rewards with equal lengths give a different answer: the length weighting is real
        equal = ADVANTAGES[name](torch.tensor(rewards, dtype=F64), torch.tensor(groups), _mask([2] * len(lengths)))
        assert (equal - got).abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_constant_rewards_give_zero_advantage(name):
    assert name in GROUP_BASED, f"declare whether {name!r} is group-based in GROUP_BASED"
    per_group = torch.tensor([3.0, 3.0, 3.0, -1.0, -1.0, 0.5], dtype=F64)
    groups, mask = torch.tensor([0, 0, 0, 1, 1, 2]), _mask([4, 2, 1, 3, 4, 2])
    got = ADVANTAGES[name](per_group, groups, mask)
    if GROUP_BASED[name]:
        torch.testing.assert_close(got, torch.zeros(6, dtype=F64), atol=1e-12, rtol=0)
    else:
        assert got.abs().max() > 0.1
    everywhere = ADVANTAGES[name](torch.full((6,), 2.5, dtype=F64), groups, mask)
    torch.testing.assert_close(everywhere, torch.zeros(6, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_constant_float32_rewards_give_exactly_zero_advantage(name):
    """Rounding must not turn a constant group into a signal: 16 rewards of -1.4 in float32 (whose sum is
    not exactly 16 x -1.4) once gave group_zscore advantages of -0.19 each."""
    rewards = torch.full((32,), -1.4)
    rewards[16:] = 0.7
    groups, mask = torch.arange(32) // 16, _mask([3] * 32)
    got = ADVANTAGES[name](rewards, groups, mask)
    assert got.dtype == torch.float32
    if GROUP_BASED[name]:
        assert torch.equal(got, torch.zeros(32)), got
    everywhere = ADVANTAGES[name](torch.full((32,), -1.4), groups, mask)
    assert torch.equal(everywhere, torch.zeros(32)), everywhere


def test_group_zscore_uses_the_unbiased_std():
    """A group of two: std = sqrt(((10 - 5)^2 + (0 - 5)^2) / (2 - 1)) = sqrt(50), z = +-5 / sqrt(50) = +-1/sqrt(2)
    (the biased std, sqrt(25) = 5, would give +-1)."""
    got = ADVANTAGES["group_zscore"](torch.tensor([10.0, 0.0], dtype=F64), torch.tensor([0, 0]), _mask([1, 1]))
    s = 50.0 ** 0.5
    torch.testing.assert_close(got, torch.tensor([5 / (s + EPS), -5 / (s + EPS)], dtype=F64), atol=1e-14, rtol=0)
    assert abs(float(got[0]) - 2 ** -0.5) < 1e-6


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_group_estimators_are_declared_as_such(name):
    # GROUP_ADVANTAGES (what config validation requires groups of >= 2 for) is exactly the set of
    # estimators whose value depends on how responses are grouped
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25], dtype=F64)
    mask = torch.ones(6, 3, dtype=F64)
    by_two = ADVANTAGES[name](rewards, torch.tensor([0, 0, 1, 1, 2, 2]), mask)
    by_three = ADVANTAGES[name](rewards, torch.tensor([0, 0, 0, 1, 1, 1]), mask)
    assert (not torch.allclose(by_two, by_three)) == (name in GROUP_ADVANTAGES)
