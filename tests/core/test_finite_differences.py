"""Way 2 of house rule 4: autograd gradients against central finite differences in float64.

Directional form (as gradcheck's fast mode): for 4 random directions u over all of logp, padding
included, grad . u must equal (L(logp + h u) - L(logp - h u)) / 2h; padded entries must get exactly 0.

Every registered loss, every level and agg it supports, clip off and on (the batch is drawn at least
1e-3 away from every clip boundary; padding holds finite garbage, whose finite-difference derivative
is 0).  The fully differentiable losses and the baselines are compared with differences of their own
value.  A REINFORCE-style loss's value carries stop-gradients, so its value's differences are not its
gradient by design; its gradient is compared with the differences of its fully differentiable twin
(unclipped; with RPG-Style Clip, on the samples Algorithm 2 keeps, and exactly 0 on the others).
"""

from __future__ import annotations

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES

from .helpers import beta_for, case, clip_margin, loss_configs, params_for, ragged_batch, ref_loss, sample_stats

H = 1e-6  # central-difference step: truncation ~H^2, round-off ~1e-16/H, both far below ATOL
ATOL, RTOL = 1e-8, 1e-7
DIRECTIONS = 4


def directions(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(DIRECTIONS, *x.shape, generator=g, dtype=x.dtype)


def central_differences(f, x: torch.Tensor) -> torch.Tensor:
    """[DIRECTIONS] directional derivatives of f at x along ``directions(x)``."""
    x = x.detach()
    return torch.stack([(f(x + H * u) - f(x - H * u)) / (2 * H) for u in directions(x)])


def along(grad: torch.Tensor) -> torch.Tensor:
    return (directions(grad) * grad).flatten(1).sum(-1)


def batch_away_from_boundaries(name, level, beta, clip):
    """The first seed whose samples all lie >= 1e-3 from a clip boundary (and A, A_reg >= 1e-3 from 0)."""
    for seed in range(100):
        b = ragged_batch(lengths=(4, 2, 1, 3, 0), t=4, seed=seed, spread=0.5, garbage=True)
        if clip is None or clip_margin(sample_stats(*b[:4], b[4], level, beta, case(name).kl), clip) >= 1e-3:
            return b
    raise AssertionError("no seed gives a batch away from the clip boundaries")


@pytest.mark.parametrize("name,level,agg,est,clip", loss_configs())
def test_gradient_matches_finite_differences(name, level, agg, est, clip):
    c = case(name)
    beta = beta_for(name, est, 0.5)
    logp, old, ref, adv, mask = batch_away_from_boundaries(name, level, beta, clip)
    params = params_for(level, agg, est, clip, beta)
    (grad,) = torch.autograd.grad(POLICY_LOSSES[name](logp, old, ref, adv, mask, params).loss, logp)
    assert torch.isfinite(grad).all()
    if c.family != "rf":
        numeric = central_differences(lambda x: POLICY_LOSSES[name](x, old, ref, adv, mask, params).loss, logp)
        expected = along(grad)
    else:
        twin = params_for(level, agg, est, None, beta)
        twin_grad = lambda x: torch.autograd.grad(POLICY_LOSSES[c.partner](x, old, ref, adv, mask, twin).loss, x)[0]
        numeric = central_differences(lambda x: POLICY_LOSSES[c.partner](x, old, ref, adv, mask, twin).loss, logp)
        torch.testing.assert_close(along(twin_grad(logp)), numeric, atol=ATOL, rtol=RTOL)
        expected = along(grad)
        if clip is not None:  # Algorithm 2 keeps exactly the samples whose reference gradient is nonzero
            kept = torch.tensor(ref_loss(name, est, logp, old, ref, adv, mask, level, agg, beta, clip)[1]) != 0
            assert 0 < int(kept.sum()) < int(mask.sum()) or level == "sequence"
            torch.testing.assert_close(grad[~kept], torch.zeros_like(grad[~kept]), atol=0, rtol=0)
            # on the kept samples the rf gradient is the twin's, whose differences were just checked
            numeric = along(torch.where(kept, twin_grad(logp), 0.0))
    assert numeric.abs().min() > 1e-3, "a test on a zero gradient could not fail"
    torch.testing.assert_close(expected, numeric, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grad[mask == 0], torch.zeros_like(grad[mask == 0]), atol=0, rtol=0)


def test_reinforce_value_is_not_its_own_potential():
    """Why the rf family is checked against its twin: differences of its value (which holds SG(Weight))
    differ from its gradient whenever beta or off-policy w is nonzero."""
    logp, old, ref, adv, mask = ragged_batch(seed=1)
    params = params_for("token", "token-mean", None, None, 0.5)
    f = lambda x: POLICY_LOSSES["rpg_rf_rkl"](x, old, ref, adv, mask, params).loss
    (grad,) = torch.autograd.grad(f(logp), logp)
    assert (along(grad) - central_differences(f, logp)).abs().max() > 1e-2
