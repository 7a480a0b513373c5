"""Aggregation (docs/algorithms.md section 5): hand values of every mode, and for every loss and mode: micro-batches
with the mini-batch's BatchTotals sum to the mini-batch loss and gradient, empty responses and padding
contents change nothing, and a bool mask equals a float one."""

from __future__ import annotations

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES, BatchTotals
from rpg.core.masked import aggregate

from .helpers import F64, beta_for, loss_configs, params_for, ragged_batch

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=F64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)  # lengths 2, 1, 0


@pytest.mark.parametrize("agg,want", [
    ("token-mean", 7 / 3),  # (1 + 2 + 4) / 3 valid tokens
    ("seq-mean-token-mean", 2.75),  # ((1 + 2) / 2 + 4 / 1) / 2 non-empty responses
    ("seq-mean-token-sum", 3.5),  # ((1 + 2) + 4) / 2
])
def test_token_aggregations_by_hand(agg, want):
    torch.testing.assert_close(aggregate(VALUES, MASK, agg), torch.tensor(want, dtype=F64), atol=1e-15, rtol=0)
    # with the totals of a larger mini-batch (9 tokens, 4 responses) the normaliser is the mini-batch's
    big = {"token-mean": 7 / 9, "seq-mean-token-mean": 5.5 / 4, "seq-mean-token-sum": 7 / 4}[agg]
    torch.testing.assert_close(aggregate(VALUES, MASK, agg, BatchTotals(9.0, 4.0)), torch.tensor(big, dtype=F64),
                               atol=1e-15, rtol=0)


def test_seq_mean_by_hand():
    # one value per response; the empty third response is ignored: (10 + 20) / 2
    out = aggregate(torch.tensor([10.0, 20.0, 99.0], dtype=F64), MASK, "seq-mean")
    torch.testing.assert_close(out, torch.tensor(15.0, dtype=F64), atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="one value per response"):
        aggregate(VALUES, MASK, "seq-mean")


def test_batch_totals_of_mask():
    assert BatchTotals.of(MASK) == BatchTotals(3.0, 2.0)


LENGTHS = (5, 3, 0, 1, 4, 2)
SPLITS = [slice(0, 2), slice(2, 4), slice(4, 6)]  # the empty response sits inside a micro-batch


def _run(name, est, level, agg, clip, logp, old, ref, adv, mask, totals=None):
    params = params_for(level, agg, est, clip, beta_for(name, est, 0.5))
    return POLICY_LOSSES[name](logp, old, ref, adv, mask, params, totals).loss


@pytest.mark.parametrize("name,level,agg,est,clip", loss_configs())
def test_micro_batches_sum_to_the_mini_batch(name, level, agg, est, clip):
    logp, old, ref, adv, mask = ragged_batch(lengths=LENGTHS, seed=5, spread=0.4)
    full = _run(name, est, level, agg, clip, logp, old, ref, adv, mask)
    (g_full,) = torch.autograd.grad(full, logp)
    totals = BatchTotals.of(mask)
    leaves = [logp.detach()[s].clone().requires_grad_() for s in SPLITS]
    parts = [_run(name, est, level, agg, clip, x, old[s], ref[s], adv[s], mask[s], totals) for x, s in zip(leaves, SPLITS)]
    g_parts = torch.cat(torch.autograd.grad(sum(parts), leaves))
    torch.testing.assert_close(sum(parts).detach(), full.detach(), atol=1e-13, rtol=0)
    torch.testing.assert_close(g_parts, g_full, atol=1e-13, rtol=0)
    # each micro-batch normalised by itself gives a different (wrong) sum: the totals matter
    alone = sum(_run(name, est, level, agg, clip, logp[s], old[s], ref[s], adv[s], mask[s]) for s in SPLITS)
    assert (alone - full).abs() > 1e-3


@pytest.mark.parametrize("name,level,agg,est,clip", loss_configs())
def test_empty_response_padding_and_bool_mask_change_nothing(name, level, agg, est, clip):
    logp, old, ref, adv, mask = ragged_batch(lengths=(5, 3, 1, 4), seed=6, spread=0.4)
    base = _run(name, est, level, agg, clip, logp, old, ref, adv, mask)
    (g_base,) = torch.autograd.grad(base, logp)
    # finite garbage in the padding
    gl, go, gr, _, _ = ragged_batch(lengths=(5, 3, 1, 4), seed=6, spread=0.4, garbage=True)
    assert (gl.detach() != logp.detach()).any()
    out = _run(name, est, level, agg, clip, gl, go, gr, adv, mask)
    torch.testing.assert_close(out.detach(), base.detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(out, gl)[0], g_base, atol=1e-14, rtol=0)
    # an extra empty response
    pad = lambda x, v: torch.cat([x, torch.full_like(x[:1], v)])
    lp2 = pad(logp.detach(), -1.0).requires_grad_()
    out = _run(name, est, level, agg, clip, lp2, pad(old, -2.0), pad(ref, -3.0), torch.cat([adv, adv.new_ones(1)]),
               pad(mask, 0.0))
    torch.testing.assert_close(out.detach(), base.detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(out, lp2)[0][:-1], g_base, atol=1e-14, rtol=0)
    # a bool mask
    out = _run(name, est, level, agg, clip, logp, old, ref, adv, mask.bool())
    torch.testing.assert_close(out.detach(), base.detach(), atol=1e-14, rtol=0)
