"""Enumerable policies for the exact-gradient tests of rpg.core.

A policy is given by a float64 parameter vector theta; ``logps(theta)`` returns the per-token
log-probabilities [K, T] of all K outcomes (padded with 0 where ``mask`` is 0), so that every
expectation over the policy is a finite sum.
"""

from __future__ import annotations

import pytest
import torch

from .helpers import F64


class OneToken:
    """A categorical over K = 5 outcomes (logits theta), each outcome a one-token response."""

    name, dim = "one-token", 5

    def __init__(self):
        self.mask = torch.ones(self.dim, 1, dtype=F64)

    def logps(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(theta, -1)[:, None]


class TwoStep:
    """An autoregressive policy over V = 3 tokens, token 0 ends the response, at most 2 tokens:
    outcomes [0], [a, b] for a in {1, 2}, b in {0, 1, 2} (7 ragged responses, T = 2).
    theta[:3] are the first-token logits, theta[3:] the 3 x 3 second-token logits given the first."""

    name, dim = "two-step", 12
    outcomes = [(0,)] + [(a, b) for a in (1, 2) for b in (0, 1, 2)]

    def __init__(self):
        self.mask = torch.tensor([[1.0, float(len(o) == 2)] for o in self.outcomes], dtype=F64)

    def logps(self, theta: torch.Tensor) -> torch.Tensor:
        first = torch.log_softmax(theta[:3], -1)
        second = torch.log_softmax(theta[3:].view(3, 3), -1)
        zero = theta.new_zeros(())
        return torch.stack([torch.stack([first[o[0]], second[o[0], o[1]] if len(o) == 2 else zero])
                            for o in self.outcomes])


def seq_logp(policy, theta: torch.Tensor) -> torch.Tensor:
    """log pi(x) of every outcome: [K]."""
    return (policy.logps(theta) * policy.mask).sum(-1)


@pytest.fixture
def one_token_policy():
    return OneToken()


@pytest.fixture
def draws():
    """theta, theta_old, theta_ref (independent N(0, 1) logits) and rewards R for a policy of size dim."""

    def make(policy, seed=0):
        g = torch.Generator().manual_seed(seed)
        theta, old, ref = (torch.randn(policy.dim, generator=g, dtype=F64) for _ in range(3))
        rewards = torch.randn(policy.mask.shape[0], generator=g, dtype=F64)
        return theta.requires_grad_(), old, ref, rewards

    return make
