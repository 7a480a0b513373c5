"""Every registered loss computes in float32 or wider whatever its inputs' dtype: bfloat16 log-probs give
the loss and gradient of the same (bf16-rounded) values computed in float64, to float32 precision."""

from __future__ import annotations

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES
from rpg.core.types import LossParams
from .helpers import F64, LOSS_NAMES, case



def long_responses(n=4, t=600, seed=0):
    """bf16 log-probs of long responses, near the sampler's (|log w| ~ 0.02 per token)."""
    g = torch.Generator().manual_seed(seed)
    old = (-0.5 - 1.5 * torch.rand(n, t, generator=g, dtype=F64)).bfloat16()
    logp = (old.double() + 0.02 * torch.randn(n, t, generator=g, dtype=F64)).bfloat16()
    ref = (logp.double() - 0.02 * torch.randn(n, t, generator=g, dtype=F64)).bfloat16()
    adv = torch.randn(n, generator=g, dtype=F64).bfloat16()
    mask = torch.ones(n, t, dtype=torch.bfloat16)
    mask[1, t // 2:] = 0
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bfloat16_inputs_are_computed_in_float32(name):
    level = case(name).levels[-1]  # sequence level where the loss has one: the sums are where bf16 fails
    params = LossParams(kl_coef=0.1 if case(name).family != "ppo" else 0.0, level=level,
                        agg="seq-mean" if level == "sequence" else "token-mean")
    logp, old, ref, adv, mask = long_responses()
    low = logp.clone().requires_grad_()
    out = POLICY_LOSSES[name](low, old, ref, adv, mask, params)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    high = logp.double().requires_grad_()
    exact = POLICY_LOSSES[name](high, old.double(), ref.double(), adv.double(), mask.double(), params)
    exact.loss.backward()
    assert exact.loss.dtype == F64  # float64 inputs stay float64
    assert out.loss.item() == pytest.approx(exact.loss.item(), rel=1e-5, abs=1e-6)
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.double(), high.grad.bfloat16().double(), rtol=0.02, atol=1e-6)
