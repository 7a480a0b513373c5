"""Per-token loss weights (truncated importance sampling against sampler/trainer mismatch).

At token level every sample's loss depends on its own token only, so a weighted loss must equal the
weighted sum of one-token losses computed with the same mini-batch totals, value and gradient; weights
of one reproduce the unweighted loss exactly. Sequence-level losses refuse per-token weights.
"""

from __future__ import annotations

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES
from rpg.core.types import BatchTotals

from .helpers import CLIP, F64, beta_for, params_for, ragged_batch

TOKEN_SUM_AGGS = ("token-mean", "seq-mean-token-sum")  # linear in each token's loss for fixed totals


@pytest.mark.parametrize("agg", TOKEN_SUM_AGGS)
@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_weighted_loss_is_the_weighted_sum_of_token_losses(name, clip, agg):
    est = "k3" if name in ("ppo_clip", "dapo", "reinforce_pp", "reinforce_pp_baseline") else None
    params = params_for("token", agg, est, clip, beta_for(name, est, 0.3))
    logp, old, ref, adv, mask = ragged_batch(spread=0.4)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    totals = BatchTotals.of(mask)
    loss_fn = POLICY_LOSSES[name]

    weighted = loss_fn(logp, old, ref, adv, mask, params, totals, token_weights=weights).loss
    (grad_weighted,) = torch.autograd.grad(weighted, logp)

    expected, grad_expected = torch.zeros((), dtype=F64), torch.zeros_like(logp)
    for i, j in (mask > 0).nonzero().tolist():
        only = torch.zeros_like(mask)
        only[i, j] = 1.0
        one = loss_fn(logp, old, ref, adv, only, params, totals).loss
        (g,) = torch.autograd.grad(one, logp)
        expected = expected + weights[i, j] * one.detach()
        grad_expected += weights[i, j] * g
    torch.testing.assert_close(weighted.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_weighted, grad_expected, rtol=1e-12, atol=1e-12)
    assert grad_weighted.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_unit_weights_change_nothing_and_zero_weights_stop_the_gradient(name):
    est = "k1" if name in ("ppo_clip", "dapo", "reinforce_pp", "reinforce_pp_baseline") else None
    params = params_for("token", "seq-mean-token-mean", est, CLIP, beta_for(name, est, 0.3))
    logp, old, ref, adv, mask = ragged_batch(spread=0.4)
    plain = POLICY_LOSSES[name](logp, old, ref, adv, mask, params).loss
    ones = POLICY_LOSSES[name](logp, old, ref, adv, mask, params, token_weights=torch.ones_like(mask)).loss
    assert torch.equal(plain, ones)
    zero = POLICY_LOSSES[name](logp, old, ref, adv, mask, params, token_weights=torch.zeros_like(mask)).loss
    (g,) = torch.autograd.grad(zero, logp)
    assert zero.item() == 0.0 and g.abs().max().item() == 0.0


def test_sequence_level_refuses_token_weights():
    logp, old, ref, adv, mask = ragged_batch()
    params = params_for("sequence", "seq-mean", None, None, 0.1)
    with pytest.raises(ValueError, match="level=token"):
        POLICY_LOSSES["rpg_rf_urkl"](logp, old, ref, adv, mask, params, token_weights=torch.ones_like(mask))
