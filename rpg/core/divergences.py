"""KL integrands: the k1/k2/k3 estimators and the KL parts of the four RPG objectives.

With r = pi_ref / pi_theta = exp(ref - logp) at a sample x ~ pi_theta:
  k1 = log(pi_theta / pi_ref)                  unbiased for KL(pi_theta || pi_ref)
  k2 = 0.5 * log(pi_theta / pi_ref)^2          biased, low variance; grad on-policy = grad RKL
  k3 = r - 1 - log r                           unbiased for UKL(pi_theta || pi_ref), always >= 0
(Schulman's estimators; k3 as an unnormalised KL: Appendix D of the paper.)
All take log-probabilities of the same tokens, any matching shape, and return that shape.
"""

from __future__ import annotations

import torch

from rpg.core.registry import Registry


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_r = ref_logp - logp
    return torch.exp(log_r) - 1.0 - log_r


KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def exact_kl(logp_all: torch.Tensor, ref_logp_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact KLs between two next-token distributions given over the whole vocabulary.

    logp_all, ref_logp_all: [..., V] log-probabilities (log-softmax) of pi_theta and pi_ref at the same
    prefixes.  Returns (reverse, forward), each [...]:
      reverse = KL(pi_theta || pi_ref) = sum_v pi_theta(v) (log pi_theta(v) - log pi_ref(v)),
      forward = KL(pi_ref || pi_theta) = sum_v pi_ref(v) (log pi_ref(v) - log pi_theta(v)).
    E_{y ~ pi_theta}[k1(y)] = E[k3(y)] = reverse at each prefix, so k(y_t) - reverse_t measures the
    estimators' error token by token (paper Section 4; Schulman's estimators).
    """
    reverse = (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)
    forward = (ref_logp_all.exp() * (ref_logp_all - logp_all)).sum(-1)
    return reverse, forward


# The KL parts of the fully differentiable RPG losses (docs/algorithms.md section 3a, Tables 1 and 4).
# Arguments are per-sample quantities: w = pi_theta/pi_old (with grad), d = log pi_theta/pi_ref (with
# grad), rho = pi_ref/pi_old (no grad), logpi = log pi_theta(x) (with grad).  Each term T satisfies
#   grad T = -(C / beta) * grad logpi,
# where C is the KL part of Weight_X (section 2), given by the matching ``weight`` function below.
RPG_KL_TERMS = Registry("RPG KL term")


@RPG_KL_TERMS.register("fkl")
def fkl_term(w, d, rho, logpi):
    """KL(pi_ref || pi_theta): -rho * log pi_theta(x)."""
    return -rho * logpi


@RPG_KL_TERMS.register("rkl")
def rkl_term(w, d, rho, logpi):
    """KL(pi_theta || pi_ref): w * d  (= w log w when ref = old)."""
    return w * d


@RPG_KL_TERMS.register("ufkl")
def ufkl_term(w, d, rho, logpi):
    """UKL(pi_ref || pi_theta): w - rho * log pi_theta(x)  (= w - log w - 1 + const when ref = old)."""
    return w - rho * logpi


@RPG_KL_TERMS.register("urkl")
def urkl_term(w, d, rho, logpi):
    """UKL(pi_theta || pi_ref): w * d - w  (= w log w - w when ref = old)."""
    return w * d - w


# C / beta: the KL part of the gradient weight, Weight_X = w A + beta * kl_weight (section 2).
RPG_KL_WEIGHTS = Registry("RPG KL weight")
RPG_KL_WEIGHTS.register("fkl")(lambda w, d, rho: rho)
RPG_KL_WEIGHTS.register("rkl")(lambda w, d, rho: -w * (d + 1.0))
RPG_KL_WEIGHTS.register("ufkl")(lambda w, d, rho: -(w - rho))
RPG_KL_WEIGHTS.register("urkl")(lambda w, d, rho: -w * d)
