"""tracking.exact_kl: the full-vocabulary token KLs against brute force on enumerable policies, the estimators'
errors they measure, and the diagnostics a run logs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rpg.config import ConfigError, validate
from rpg.core.divergences import KL_ESTIMATORS, exact_kl
from rpg.models.logprobs import response_kl, response_logprobs


def test_exact_kl_is_the_sum_over_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 4, 7, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(3, 4, 7, generator=g, dtype=torch.float64), -1)
    reverse, forward = exact_kl(logp, ref)
    for i in range(3):
        for j in range(4):
            p, q = logp[i, j].exp().tolist(), ref[i, j].exp().tolist()
            assert reverse[i, j].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-12)
            assert forward[i, j].item() == pytest.approx(sum(b * math.log(b / a) for a, b in zip(p, q)), rel=1e-12)
    assert (reverse > 0).all() and not torch.allclose(reverse, forward)


def _lm(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=5, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # distributions far from uniform, and far from each other
    return model


@torch.no_grad()
def test_response_kl_matches_a_forward_per_prefix():
    policy, reference = _lm(0), _lm(1)
    ids = torch.tensor([[0, 2, 3, 4, 1, 2, 0], [2, 2, 3, 1, 4, 0, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # left padding in row 0
    reverse, forward, logp, ref_logp = response_kl(policy, reference, ids, attn, 3, temperature=0.8, chunk_tokens=3)
    for row in range(2):
        start = int((attn[row] == 0).sum())
        for t in range(4):  # response position t predicts token 3 + t from the real tokens before it
            prefix = ids[row, start : 3 + t][None]
            p = torch.softmax(policy(prefix).logits[0, -1] / 0.8, -1).tolist()
            q = torch.softmax(reference(prefix).logits[0, -1] / 0.8, -1).tolist()
            assert reverse[row, t].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-9)
            assert forward[row, t].item() == pytest.approx(sum(b * math.log(b / a) for a, b in zip(p, q)), rel=1e-9)
    assert reverse.min() > 1e-3  # the two policies differ: the comparison says something
    torch.testing.assert_close(logp, response_logprobs(policy, ids, attn, 3, 0.8)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ref_logp, response_logprobs(reference, ids, attn, 3, 0.8)[0], rtol=0, atol=1e-12)


@torch.no_grad()
def test_k1_and_k3_are_unbiased_for_the_exact_reverse_kl_and_k2_is_not():
    policy, reference = _lm(0), _lm(1)
    prefix = torch.tensor([[2, 3, 4]])
    logp_all = torch.log_softmax(policy(prefix).logits[0, -1], -1)
    ref_all = torch.log_softmax(reference(prefix).logits[0, -1], -1)
    reverse, _ = exact_kl(logp_all, ref_all)
    tokens = torch.multinomial(logp_all.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for name, estimator in KL_ESTIMATORS.items():
        values = estimator(logp_all[tokens], ref_all[tokens])
        exact_mean = (logp_all.exp() * estimator(logp_all, ref_all)).sum()  # E_pi[k] by enumeration
        se = values.std() / len(values) ** 0.5
        assert abs(values.mean() - exact_mean) < 5 * se  # the sampling check agrees with the enumeration
        if name in ("k1", "k3"):
            assert exact_mean.item() == pytest.approx(reverse.item(), rel=1e-9)
        else:
            assert abs(exact_mean - reverse) > 1e-2 * reverse  # k2 is biased here


def test_a_run_logs_the_exact_kl_beside_the_estimators(make_cfg):
    import rpg.train.loop as loop

    cfg = make_cfg("algo=grpo", "tracking.exact_kl=true", "steps=3", "eval_every=0", "optim.lr=1e-2")
    logged = []

    class Recorder(loop.NullTracker):
        def log_metrics(self, metrics, step):
            logged.append(metrics)

    original, loop.NullTracker = loop.NullTracker, Recorder
    try:
        loop.run(cfg)
    finally:
        loop.NullTracker = original
    steps = [m for m in logged if "kl_exact/reverse" in m]
    assert len(steps) == 3
    assert steps[0]["kl_exact/reverse"] == 0.0  # step 1: the policy is still its frozen anchor
    last = steps[-1]
    assert last["kl_exact/reverse"] > 0 and last["kl_exact/forward"] > 0
    for name in KL_ESTIMATORS:
        assert math.isfinite(last[f"kl_exact/{name}_error_mean"]) and last[f"kl_exact/{name}_error_std"] > 0


@pytest.mark.parametrize("overrides", [["algo.ref_update=every_step"], ["rollout.overlap=true"]])
def test_exact_kl_needs_a_reference_model_and_the_sampler_in_process(make_cfg, overrides):
    with pytest.raises(ConfigError, match="tracking.exact_kl"):
        validate(make_cfg("algo=grpo", "tracking.exact_kl=true", *overrides))
