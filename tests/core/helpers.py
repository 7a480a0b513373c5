"""Shared helpers of the rpg.core tests: what each registered loss is, random ragged batches, and a
plain-Python-float reference of docs/algorithms.md (written from the spec, independent of rpg.core)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from rpg.core.losses import POLICY_LOSSES, LossParams
from rpg.core.types import SEQUENCE_AGGS, TOKEN_AGGS

F64 = torch.float64
LOSS_NAMES = sorted(POLICY_LOSSES)
CLIP = (0.2, 0.28, 2.0)  # (eps_low, eps_high, c) used by the clip-on tests; c small so dual clip is hit


@dataclass(frozen=True)
class Case:
    """family: "fd" (rpg_X, section 3a), "rf" (rpg_rf_X, 3b), "grpo", "grpo_is" or "ppo" (section 4).
    kl: the RPG divergence (fkl/rkl/ufkl/urkl).  partner: the fully differentiable twin of an rf loss."""

    family: str
    kl: str | None = None
    partner: str | None = None

    @property
    def levels(self) -> tuple[str, ...]:
        return ("token", "sequence") if self.family in ("fd", "rf") else ("token",)

    @property
    def estimators(self) -> tuple[str | None, ...]:
        return (None, "k1", "k2", "k3") if self.family == "ppo" else (None,)


FAMILIES = ("fd", "rf", "grpo", "grpo_is", "ppo")
DIVERGENCES = ("fkl", "rkl", "ufkl", "urkl")  # those the reference below knows the formulas of


def case(name: str) -> Case:
    """What the tests need to know about a registered loss, from the family and divergence its function
    declares (rpg.core.registry.member): a new variant is tested the moment it is registered."""
    fn = POLICY_LOSSES[name]
    family, kl = getattr(fn, "family", None), getattr(fn, "divergence", None)
    if family not in FAMILIES or (family in ("fd", "rf")) != (kl in DIVERGENCES):
        pytest.fail(f"registered loss {name!r} declares family={family!r}, divergence={kl!r}: tag it with "
                    f"rpg.core.registry.member(family in {FAMILIES}, divergence in {DIVERGENCES} for fd/rf), "
                    "or teach tests/core/helpers.py its formula")
    partner = None
    if family == "rf":
        partner = next(n for n in sorted(POLICY_LOSSES)
                       if getattr(POLICY_LOSSES[n], "family", None) == "fd" and POLICY_LOSSES[n].divergence == kl)
    return Case(family, kl, partner)


def aggs(level: str) -> tuple[str, ...]:
    return TOKEN_AGGS if level == "token" else SEQUENCE_AGGS


def primary_name(name: str) -> str:
    """Names registered to the same function (ppo_clip = dapo = ...) share it; the first one alphabetically
    gets the full configuration sweep, the others one configuration each (they are the same code)."""
    return next(n for n in LOSS_NAMES if POLICY_LOSSES[n] is POLICY_LOSSES[name])


def loss_configs(clips=(None, CLIP)) -> list:
    """(name, level, agg, estimator, clip) for every registered name; an unknown name still yields one
    config so that its test runs and fails in ``case``."""
    out = []
    for name in LOSS_NAMES:
        c = case(name) if getattr(POLICY_LOSSES[name], "family", None) else Case("fd")
        full = primary_name(name) == name
        for level in c.levels:
            for agg in aggs(level) if full else aggs(level)[:1]:
                for est in c.estimators if full else c.estimators[-1:]:
                    for clip in clips if full else clips[-1:]:
                        out.append(pytest.param(name, level, agg, est, clip,
                                                id=f"{name}-{level}-{agg}-{est}-{'clip' if clip else 'noclip'}"))
    return out


def params_for(level, agg, est, clip, beta) -> LossParams:
    kw = dict(kl_coef=beta, level=level, agg=agg, kl_estimator=est)
    if clip is not None:
        kw.update(clip_low=clip[0], clip_high=clip[1], dual_clip_c=clip[2])
    return LossParams(**kw)


def beta_for(name: str, est, beta: float) -> float:
    """ppo_clip without a KL estimator must have kl_coef = 0."""
    return 0.0 if case(name).family == "ppo" and est is None else beta


def ragged_batch(lengths=(5, 3, 1, 4), t=5, seed=0, spread=0.3, garbage=False):
    """float64 log-probs of a ragged batch: logp (requires grad), old, ref [N, T], adv [N], mask [N, T].
    log w and log(pi/pi_ref) per token ~ N(0, spread^2); padding holds finite garbage when asked."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    old = -0.5 - 2.0 * torch.rand(n, t, generator=g, dtype=F64)
    logp = old + spread * torch.randn(n, t, generator=g, dtype=F64)
    ref = logp - spread * torch.randn(n, t, generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(F64)
    if garbage:
        pad = mask == 0
        for x in (logp, old, ref):
            x[pad] = 30.0 * (2 * torch.rand(int(pad.sum()), generator=g, dtype=F64) - 1)
    return logp.requires_grad_(), old, ref, adv, mask


# ---------------------------------------------------------------- plain-float reference of the spec

def kl_weight(kl, w, d, rho, beta):
    """C, the KL part of Weight_X (docs/algorithms.md section 2)."""
    return {"fkl": beta * rho, "rkl": -beta * w * (d + 1), "ufkl": -beta * (w - rho), "urkl": -beta * w * d}[kl]


def kl_term(kl, w, d, rho, logpi):
    """KL part of the fully differentiable per-sample loss (section 3a table, general anchor)."""
    return {"fkl": -rho * logpi, "rkl": w * d, "ufkl": w - rho * logpi, "urkl": w * d - w}[kl]


def ppo_term(w, a, clip):
    """max(-w A, -clip(w) A), and min(., -c A) for A < 0 (section 3a); returns (value, gradient flows)."""
    if clip is None:
        return -w * a, True
    assert a != 0, "reference needs A != 0 to tell the branches apart"
    el, eh, c = clip
    t = max(-w * a, -min(max(w, 1 - el), 1 + eh) * a)
    if a < 0 and c is not None:
        t = min(t, -c * a)
    return t, t == -w * a


def rf_sample(kl, w, d, rho, a, logpi, beta, clip):
    """Algorithm 2, line by line: (value, d value / d log pi)."""
    cc = kl_weight(kl, w, d, rho, beta)
    weight, l = w * a + cc, -logpi
    if clip is None:
        return weight * l, -weight
    el, eh, c = clip
    psi = (a + cc / w) * l
    if psi >= 0:
        return (psi * w, -weight) if w < 1 + eh else ((a + cc / (1 + eh)) * l * (1 + eh), 0.0)
    if w <= 1 - el:
        return (a + cc / (1 - el)) * l * (1 - el), 0.0
    if c is None or w < c:
        return psi * w, -weight
    return a * l * c + cc * l, 0.0


def ref_sample(name, est, w, d, rho, a, logpi, beta, clip):
    """(value, d value / d log pi) of one sample's loss, from docs/algorithms.md (w = exp(log w) etc.)."""
    c = case(name)
    if c.family == "rf":
        return rf_sample(c.kl, w, d, rho, a, logpi, beta, clip)
    pg, active = ppo_term(w, a, clip)
    g = -w * a if active else 0.0
    if c.family == "fd":
        return pg + beta * kl_term(c.kl, w, d, rho, logpi), g - kl_weight(c.kl, w, d, rho, beta)
    r = math.exp(-d)  # pi_ref / pi_theta
    k3v = r - 1 - math.log(r)
    if c.family == "grpo" or est == "k3":
        return pg + beta * k3v, g + beta * (1 - r)
    if c.family == "grpo_is":
        return pg + beta * w * k3v, g + beta * w * d
    if est == "k1":
        return pg + beta * d, g + beta
    if est == "k2":
        return pg + beta * 0.5 * d * d, g + beta * d
    return pg, g


def ref_loss(name, est, logp, old, ref, adv, mask, level, agg, beta, clip):
    """Reference scalar loss and its gradient w.r.t. logp ([N][T] lists) for a whole batch."""
    lp, o, r, m = (x.detach().tolist() for x in (logp, old, ref, mask))
    a = adv.tolist()
    n, t = len(lp), len(lp[0])
    grad = [[0.0] * t for _ in range(n)]
    lens = [sum(row) for row in m]
    nseq = sum(1 for x in lens if x > 0)
    total = 0.0
    if level == "token":
        ntok = sum(lens)
        for i in range(n):
            for j in range(t):
                if not m[i][j]:
                    continue
                v, g = ref_sample(name, est, math.exp(lp[i][j] - o[i][j]), lp[i][j] - r[i][j],
                                  math.exp(r[i][j] - o[i][j]), a[i], lp[i][j], beta, clip)
                scale = {"token-mean": 1 / ntok, "seq-mean-token-mean": 1 / (lens[i] * nseq),
                         "seq-mean-token-sum": 1 / nseq}[agg]
                total += v * scale
                grad[i][j] = g * scale
        return total, grad
    assert agg == "seq-mean"
    for i in range(n):
        if not lens[i]:
            continue
        s = lambda x: sum(x[i][j] for j in range(t) if m[i][j])
        logpi, logw = s(lp), s(lp) - s(o)
        v, g = ref_sample(name, est, math.exp(logw), logpi - s(r), math.exp(s(r) - s(o)), a[i], logpi, beta, clip)
        total += v / nseq
        for j in range(t):
            grad[i][j] = g / nseq if m[i][j] else 0.0
    return total, grad


def sample_stats(logp, old, ref, adv, mask, level, beta, kl):
    """Per-sample w, A and A_reg = A + C/w as float lists (for checking a batch's distance to clip boundaries)."""
    if level == "token":
        keep = mask > 0
        lw, dd, lr = (logp - old)[keep], (logp - ref)[keep], (ref - old)[keep]
        aa = adv[:, None].expand_as(mask)[keep]
    else:
        keep = mask.sum(-1) > 0
        lw, dd, lr = (((x * mask).sum(-1))[keep] for x in (logp - old, logp - ref, ref - old))
        aa = adv[keep]
    out = []
    for x, dv, y, a in zip(lw.tolist(), dd.tolist(), lr.tolist(), aa.tolist()):
        w = math.exp(x)
        areg = a + (kl_weight(kl, w, dv, math.exp(y), beta) / w if kl else 0.0)
        out.append((w, a, areg))
    return out


def clip_margin(stats, clip) -> float:
    """Smallest distance of any w to a clip boundary, and of A / A_reg to 0."""
    el, eh, c = clip
    return min(min(abs(w - 1 + el), abs(w - 1 - eh), abs(w - c), abs(a), abs(ar)) for w, a, ar in stats)
