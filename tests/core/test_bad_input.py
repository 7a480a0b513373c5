"""Bad input gets a clear error that says what to set."""

from __future__ import annotations

import pytest
import torch

from rpg.core.advantages import ADVANTAGES
from rpg.core.losses import POLICY_LOSSES, LossParams
from rpg.core.registry import Registry

from .helpers import F64, LOSS_NAMES, case, ragged_batch


@pytest.mark.parametrize("registry", [POLICY_LOSSES, ADVANTAGES], ids=["loss", "advantage"])
def test_unknown_name_lists_the_valid_ones(registry):
    with pytest.raises(KeyError) as err:
        registry["rpg_klf"]
    for name in registry:
        assert name in str(err.value)
    assert "rpg_klf" not in registry  # `in` does not raise


def test_registering_a_name_twice_fails():
    reg = Registry("thing")
    reg.register("a")(len)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(len)


def _default_params(name):
    return LossParams(kl_coef=0.0 if case(name).family == "ppo" else 0.1)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mismatched_shapes(name):
    logp, old, ref, adv, mask = ragged_batch()
    p = _default_params(name)
    bad = {
        "old_logp": (logp, old[:, :-1], ref, adv, mask),
        "ref_logp": (logp, old, ref[:-1], adv, mask),
        "mask": (logp, old, ref, adv, mask.T),
        "advantages": (logp, old, ref, adv[:, None], mask),
        "logp must be": (logp[0], old[0], ref[0], adv, mask[0]),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError, match=what):
            POLICY_LOSSES[name](*args, p)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mask_without_valid_token(name):
    logp, old, ref, adv, mask = ragged_batch()
    with pytest.raises(ValueError, match="no valid token"):
        POLICY_LOSSES[name](logp, old, ref, adv, torch.zeros_like(mask), _default_params(name))


@pytest.mark.parametrize("kwargs,match", [
    (dict(clip_low=1.0, clip_high=0.2), "clip_low must be in"),
    (dict(clip_low=-0.1, clip_high=0.2), "clip_low must be in"),
    (dict(clip_low=float("nan"), clip_high=0.2), "clip_low must be in"),
    (dict(clip_low=0.2, clip_high=-0.1), "clip_high must be >= 0"),
    (dict(clip_low=0.2), "set both clip_low and clip_high"),
    (dict(clip_high=0.2), "set both clip_low and clip_high"),
    (dict(clip_low=0.2, clip_high=0.2, dual_clip_c=1.0), "dual_clip_c must be > 1"),
    (dict(dual_clip_c=10.0), "dual_clip_c needs clip_low"),
    (dict(kl_coef=-0.1), "kl_coef must be >= 0"),
    (dict(max_log_ratio=0.0), "max_log_ratio must be > 0"),
    (dict(level="seq"), "level must be one of"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(agg="mean"), "does not fit level"),
    (dict(level="sequence", agg="token-mean"), "does not fit level='sequence'"),
    (dict(level="sequence", agg="seq-mean-token-mean"), "does not fit level='sequence'"),
    (dict(level="token", agg="seq-mean"), "does not fit level='token'"),
])
def test_loss_params_reject(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossParams(**kwargs)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_token_only_losses_reject_sequence_level(name):
    logp, old, ref, adv, mask = ragged_batch()
    params = LossParams(kl_coef=0.0, level="sequence", agg="seq-mean")
    if "sequence" in case(name).levels:
        assert torch.isfinite(POLICY_LOSSES[name](logp, old, ref, adv, mask, params).loss)
    else:
        with pytest.raises(ValueError, match="set level=token"):
            POLICY_LOSSES[name](logp, old, ref, adv, mask, params)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if case(n).family == "ppo"])
def test_ppo_clip_kl_coef_needs_an_estimator(name):
    logp, old, ref, adv, mask = ragged_batch()
    with pytest.raises(ValueError, match="needs kl_estimator"):
        POLICY_LOSSES[name](logp, old, ref, adv, mask, LossParams(kl_coef=1e-4))


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_advantage_shapes(name):
    r, g, m = torch.zeros(4, dtype=F64), torch.zeros(4, dtype=torch.long), torch.ones(4, 3, dtype=F64)
    for args in ((r[:, None], g, m), (r, g[:3], m), (r, g, m[:3])):
        with pytest.raises(ValueError, match=r"must be \[N\]"):
            ADVANTAGES[name](*args)


def test_inf_and_nan_in_padding_never_reach_the_gradient():
    """Padded log-probs of -inf/nan (as a model may produce) leave every gradient finite."""
    from rpg.core.losses import POLICY_LOSSES, LossParams

    for name in POLICY_LOSSES:
        logp = torch.tensor([[-0.5, -float("inf")]], dtype=torch.float64, requires_grad=True)
        old = torch.tensor([[-0.6, float("nan")]], dtype=torch.float64)
        ref = torch.tensor([[-0.4, -float("inf")]], dtype=torch.float64)
        estimator = "k3" if name in ("ppo_clip", "dapo", "reinforce_pp", "reinforce_pp_baseline") else None
        out = POLICY_LOSSES[name](logp, old, ref, torch.tensor([1.0], dtype=torch.float64),
                                  torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                                  LossParams(kl_coef=0.1, kl_estimator=estimator))
        out.loss.backward()
        assert torch.isfinite(out.loss), name
        assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0, name
