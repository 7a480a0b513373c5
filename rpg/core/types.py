"""Parameters and outputs shared by every policy loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from rpg.core.divergences import KL_ESTIMATORS

LEVELS = ("token", "sequence")
TOKEN_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
SEQUENCE_AGGS = ("seq-mean",)


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of a policy loss.

    kl_coef: beta, the KL strength (>= 0).
    clip_low, clip_high: eps_low, eps_high of the trust region [1 - eps_low, 1 + eps_high]; None = no clip.
    dual_clip_c: c > 1 of dual clip (caps the loss of negative-advantage samples with w >= c); None = off.
    level: "token" (per-token ratios, each token a sample) or "sequence" (the paper's sequence ratio).
    agg: how per-sample losses become a scalar (see rpg.core.masked.aggregate).
    kl_estimator: KL penalty of the PPO-clip baselines (dapo, reinforce_pp*): "k1", "k2", "k3" or None.
    max_log_ratio: numerical guard; log importance ratios are clamped to [-max_log_ratio, max_log_ratio]
        before exp (no gradient flows through a clamped ratio; the fraction is reported as
        ``is/frac_ratio_clamped``). 20 means w <= 4.9e8; it matters only for sequence-level ratios.
    """

    kl_coef: float = 0.0
    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip_c: float | None = None
    level: Literal["token", "sequence"] = "token"
    agg: str = "token-mean"
    kl_estimator: str | None = None
    max_log_ratio: float = 20.0

    def __post_init__(self):
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if (self.clip_low is None) != (self.clip_high is None):
            raise ValueError("set both clip_low and clip_high, or neither (None = no clipping)")
        if self.clip_low is not None and not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high is not None and not self.clip_high >= 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip_c is not None:
            if self.dual_clip_c <= 1.0:
                raise ValueError(f"dual_clip_c must be > 1 (e.g. 10), got {self.dual_clip_c}")
            if self.clip_low is None:
                raise ValueError("dual_clip_c needs clip_low/clip_high to be set")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        aggs = TOKEN_AGGS if self.level == "token" else SEQUENCE_AGGS
        if self.agg not in aggs:
            raise ValueError(f"agg={self.agg!r} does not fit level={self.level!r}; use one of {aggs}")
        if self.kl_estimator is not None and self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)} or None, got {self.kl_estimator!r}")
        if self.max_log_ratio <= 0:
            raise ValueError(f"max_log_ratio must be > 0, got {self.max_log_ratio}")

    @property
    def clipped(self) -> bool:
        return self.clip_low is not None


@dataclass(frozen=True)
class BatchTotals:
    """Normalisers of the whole mini-batch (all micro-batches, all ranks).

    Pass them to a loss computed on one micro-batch so that the micro-batch losses *sum* to the
    mini-batch loss exactly. ``num_tokens``: valid tokens; ``num_seqs``: responses with >= 1 token.
    """

    num_tokens: float
    num_seqs: float

    @staticmethod
    def of(mask: torch.Tensor) -> "BatchTotals":
        return BatchTotals(float(mask.sum()), float((mask.sum(-1) > 0).sum()))


@dataclass
class LossOutput:
    """``loss``: scalar with gradient; ``metrics``: detached scalar tensors with namespaced keys."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
