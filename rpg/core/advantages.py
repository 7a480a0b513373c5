"""Advantage estimators: ``ADVANTAGES[name](rewards [N], group_ids [N], mask [N, T]) -> advantages [N]``.

group_ids: int tensor, responses to the same prompt share an id.  The returned advantage is one value
per response (it is broadcast over the response's tokens by the losses).
"""

from __future__ import annotations

import torch

from rpg.core.masked import masked_whiten
from rpg.core.registry import Registry

ADVANTAGES = Registry("advantage estimator")
#: estimators that compare a response with the other responses of its prompt: they need groups of >= 2
GROUP_ADVANTAGES = frozenset({"group_zscore", "group_mean", "rloo", "reinforce_pp_baseline"})

#: Numerical guard added to standard deviations (GRPO uses 1e-6).
STD_EPS = 1e-6


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per-response group mean, unbiased group std and group size, in ``rewards``' dtype.

    Sums run in float64 and are rounded once to the input dtype, so a constant group's mean is exactly its
    reward and its advantages exactly 0 (in float32, a sum of 16 x -1.4 divided by 16 is not -1.4).
    """
    r = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    k = int(inverse.max()) + 1
    count = r.new_zeros(k).index_add_(0, inverse, torch.ones_like(r))
    mean = (r.new_zeros(k).index_add_(0, inverse, r) / count)[inverse]
    sq = r.new_zeros(k).index_add_(0, inverse, (r - mean) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()[inverse]
    return mean.to(rewards.dtype), std.to(rewards.dtype), count[inverse].to(rewards.dtype)


def _check(rewards, group_ids, mask):
    if rewards.dim() != 1 or group_ids.shape != rewards.shape or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"rewards and group_ids must be [N] and mask [N, T]; got {tuple(rewards.shape)}, "
                         f"{tuple(group_ids.shape)}, {tuple(mask.shape)}")


@ADVANTAGES.register("group_zscore")
def group_zscore(rewards, group_ids, mask):
    """GRPO / DAPO: (R - mean_G) / (std_G + 1e-6), std unbiased over the group (Shao et al. 2024)."""
    _check(rewards, group_ids, mask)
    mean, std, _ = _group_stats(rewards, group_ids)
    return (rewards - mean) / (std + STD_EPS)


@ADVANTAGES.register("group_mean")
def group_mean(rewards, group_ids, mask):
    """RPG: R - mean_G, the group-mean baseline (no scaling)."""
    _check(rewards, group_ids, mask)
    return rewards - _group_stats(rewards, group_ids)[0]


@ADVANTAGES.register("batch_mean")
def batch_mean(rewards, group_ids, mask):
    """R - mean over the whole batch."""
    _check(rewards, group_ids, mask)
    return rewards - rewards.double().mean().to(rewards.dtype)  # float64 sum: a constant batch gives exactly 0


@ADVANTAGES.register("rloo")
def rloo(rewards, group_ids, mask):
    """REINFORCE leave-one-out: R_i - mean of the other responses of its group (0 for a group of one)."""
    _check(rewards, group_ids, mask)
    mean, _, count = (t.double() for t in _group_stats(rewards, group_ids))
    loo = ((mean * count - rewards.double()) / (count - 1).clamp(min=1)).to(rewards.dtype)
    return torch.where(count > 1, rewards - loo, torch.zeros_like(rewards))


def _whiten_over_tokens(values, mask):
    mask = mask.to(values.dtype)
    tokens = values[:, None].expand_as(mask)
    return masked_whiten(tokens, mask, STD_EPS)[:, 0]


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards, group_ids, mask):
    """REINFORCE++: R broadcast to tokens and whitened over all valid tokens of the batch (Hu 2025)."""
    _check(rewards, group_ids, mask)
    return _whiten_over_tokens(rewards, mask)


@ADVANTAGES.register("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards, group_ids, mask):
    """REINFORCE++-baseline: R - mean_G, then whitened over all valid tokens of the batch."""
    _check(rewards, group_ids, mask)
    return _whiten_over_tokens(rewards - _group_stats(rewards, group_ids)[0], mask)
