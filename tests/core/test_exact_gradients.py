"""Way 3 of house rule 4: the expected loss gradient equals the exact gradient of the declared objective.

On an enumerable policy (tests/core/conftest.py) the expected gradient of a loss under samples from
pi_old is the finite sum  E_old[grad L] = sum_x pi_old(x) grad_theta L(x).  It is computed exactly: the
loss is called once on the batch of all K outcomes with BatchTotals(1, 1), so that it returns
sum_x L(x) and its gradient w.r.t. logp row x is grad L(x) (samples do not interact); the chain rule
through theta then weights row x by pi_old(x).  The declared objective J = E_{pi_theta}[R] - beta D is
also an exact finite sum, differentiated by autograd; the test asserts E_old[grad L] = -grad J.
The losses use A = R - b with a baseline b = 0.7, the objective uses R: the baseline changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES, BatchTotals

from .conftest import OneToken, TwoStep, seq_logp
from .helpers import CLIP, LOSS_NAMES, aggs, beta_for, case, params_for

ATOL = RTOL = 1e-10
BETA, BASELINE = 0.4, 0.7


def declared(name: str, est):
    """(D of the declared objective E[R] - beta D, or None for E[R] alone; whether the claim needs
    pi_old = pi_theta).  Facts from docs/algorithms.md sections 2-4."""
    c = case(name)
    if c.family in ("fd", "rf"):
        return c.kl, False  # any pi_old, any anchor
    if c.family == "grpo_is":
        return "rkl", False  # w_t k3: the URKL gradient for any pi_old (Section 2.2)
    if c.family == "grpo":
        return "fkl", True  # k3 without w: forward KL, on-policy only
    if c.family == "ppo":  # on-policy: k1 zero KL gradient, k2 reverse, k3 forward; no KL: any pi_old
        return {None: None, "k1": None, "k2": "rkl", "k3": "fkl"}[est], est is not None
    pytest.fail(f"no declared objective for {name!r}")


def objective_grad(policy, theta, ref_theta, rewards, beta, div):
    """-grad J, J = E_{pi_theta}[R] - beta D, all sums exact."""
    lp, lq = seq_logp(policy, theta), seq_logp(policy, ref_theta).detach()
    p, q = lp.exp(), lq.exp()
    torch.testing.assert_close(p.sum().detach(), torch.tensor(1.0, dtype=p.dtype), atol=1e-14, rtol=0)
    kl_fwd, kl_rev = (q * (lq - lp)).sum(), (p * (lp - lq)).sum()
    d = {None: 0.0, "fkl": kl_fwd, "rkl": kl_rev,
         "ufkl": kl_fwd + p.sum() - q.sum(), "urkl": kl_rev - p.sum() + q.sum()}[div]
    (g,) = torch.autograd.grad((p * rewards).sum() - beta * d, theta)
    return -g


def expected_loss_grad(name, params, policy, theta, old_theta, ref_theta, adv):
    """sum_x pi_old(x) grad_theta L(x), exactly."""
    logp = policy.logps(theta)
    old, ref = policy.logps(old_theta).detach(), policy.logps(ref_theta).detach()
    leaf = logp.detach().requires_grad_()
    total = POLICY_LOSSES[name](leaf, old, ref, adv, policy.mask, params, BatchTotals(1.0, 1.0)).loss
    (per_sample,) = torch.autograd.grad(total, leaf)  # row x: d L(x) / d logp(x)
    p_old = seq_logp(policy, old_theta).exp()
    (g,) = torch.autograd.grad((p_old[:, None] * per_sample * logp).sum(), theta)
    return g


def regimes(on_policy_only: bool):
    """(label, pi_old = pi_theta?, anchor: "general" (ref != old) or "iterative" (ref = old), clip)."""
    out = [("on-policy", True, "general", None), ("on-policy-clipped", True, "general", CLIP)]
    if not on_policy_only:
        out += [("off-policy", False, "general", None), ("off-policy-iterative-ref", False, "iterative", None)]
    return out


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_expected_gradient_is_declared_objective_gradient(name, draws):
    c = case(name)
    n_checked = 0
    for level in c.levels:
        for policy in ([OneToken()] if level == "token" else [OneToken(), TwoStep()]):
            for est in c.estimators:
                div, on_policy_only = declared(name, est)
                beta = beta_for(name, est, BETA)
                theta, old_theta, ref_theta, rewards = draws(policy, seed=11)
                for label, on_policy, anchor, clip in regimes(on_policy_only):
                    old = theta.detach() if on_policy else old_theta
                    ref = old if anchor == "iterative" else ref_theta
                    want = objective_grad(policy, theta, ref, rewards, beta, div)
                    for agg in aggs(level):
                        got = expected_loss_grad(name, params_for(level, agg, est, clip, beta), policy,
                                                 theta, old, ref, rewards - BASELINE)
                        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL,
                                                   msg=lambda m: f"{name} {level} {policy.name} {est} {label} {agg}: {m}")
                        n_checked += 1
    assert n_checked >= 6


def test_harness_matches_a_per_sample_loop(draws):
    """The batched expectation equals sum_x pi_old(x) grad L(x) with one call per outcome."""
    policy = TwoStep()
    theta, old_theta, ref_theta, rewards = draws(policy, seed=3)
    params = params_for("sequence", "seq-mean", None, CLIP, BETA)
    got = expected_loss_grad("rpg_rf_urkl", params, policy, theta, old_theta, ref_theta, rewards)
    logp, old, ref = policy.logps(theta), policy.logps(old_theta), policy.logps(ref_theta)
    p_old = seq_logp(policy, old_theta).exp()
    total = sum(p_old[k] * POLICY_LOSSES["rpg_rf_urkl"](logp[k:k + 1], old[k:k + 1], ref[k:k + 1], rewards[k:k + 1],
                                                         policy.mask[k:k + 1], params).loss for k in range(7))
    (want,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)


def _far(a, b, min_gap=1e-3):
    return (a - b).abs().max() > min_gap


def test_grpo_kl_is_forward_on_policy_and_neither_off_policy(one_token_policy, draws):
    """grpo's k3 without importance weight: on-policy the gradient of KL(ref || theta), not of the
    KL(theta || ref) GRPO names; off-policy neither.  grpo_is is the reverse KL for any pi_old."""
    pol = one_token_policy
    theta, old_theta, ref_theta, rewards = draws(pol, seed=5)
    params = params_for("token", "token-mean", None, None, BETA)
    fwd = lambda: objective_grad(pol, theta, ref_theta, rewards, BETA, "fkl")
    rev = lambda: objective_grad(pol, theta, ref_theta, rewards, BETA, "rkl")
    on = expected_loss_grad("grpo", params, pol, theta, theta.detach(), ref_theta, rewards)
    torch.testing.assert_close(on, fwd(), atol=ATOL, rtol=RTOL)
    assert _far(on, rev())
    off = expected_loss_grad("grpo", params, pol, theta, old_theta, ref_theta, rewards)
    assert _far(off, fwd()) and _far(off, rev())
    off_is = expected_loss_grad("grpo_is", params, pol, theta, old_theta, ref_theta, rewards)
    torch.testing.assert_close(off_is, rev(), atol=ATOL, rtol=RTOL)
    assert _far(off_is, fwd())


def test_ppo_clip_kl_estimators_on_policy(one_token_policy, draws):
    """On-policy: k1 adds no expected gradient, k2 gives the reverse KL's, k3 the forward KL's (and not
    the other one's); off-policy k1 does add a (spurious) gradient."""
    pol = one_token_policy
    theta, old_theta, ref_theta, rewards = draws(pol, seed=6)
    want = {div: objective_grad(pol, theta, ref_theta, rewards, BETA, div) for div in (None, "fkl", "rkl")}
    got = {est: expected_loss_grad("ppo_clip", params_for("token", "token-mean", est, None, BETA), pol,
                                   theta, theta.detach(), ref_theta, rewards) for est in ("k1", "k2", "k3")}
    for est, div, other in (("k1", None, "rkl"), ("k2", "rkl", "fkl"), ("k3", "fkl", "rkl")):
        torch.testing.assert_close(got[est], want[div], atol=ATOL, rtol=RTOL)
        assert _far(got[est], want[other])
    off_k1 = expected_loss_grad("ppo_clip", params_for("token", "token-mean", "k1", None, BETA), pol,
                                theta, old_theta, ref_theta, rewards)
    assert _far(off_k1, want[None])


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_baseline_changes_no_expected_gradient_but_changes_samples(name, draws):
    """Unclipped, A = R - b for b in {0, 0.7, -2}: identical expected gradients, for any pi_old;
    the per-sample gradients do change (so the assertion can fail)."""
    c = case(name)
    est = c.estimators[-1]
    beta = beta_for(name, est, BETA)
    for level in c.levels:
        pol = TwoStep() if level == "sequence" else OneToken()
        theta, old_theta, ref_theta, rewards = draws(pol, seed=8)
        params = params_for(level, aggs(level)[0], est, None, beta)
        grads = [expected_loss_grad(name, params, pol, theta, old_theta, ref_theta, rewards - b) for b in (0.0, 0.7, -2.0)]
        for g in grads[1:]:
            torch.testing.assert_close(g, grads[0], atol=ATOL, rtol=RTOL)
        old, ref = pol.logps(old_theta), pol.logps(ref_theta)
        one_batch = [torch.autograd.grad(POLICY_LOSSES[name](pol.logps(theta), old, ref, rewards - b, pol.mask,
                                                             params).loss, theta)[0] for b in (0.0, 0.7)]
        assert _far(one_batch[0], one_batch[1])
