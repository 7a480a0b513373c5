"""Masked reductions and the loss aggregation modes (docs/algorithms.md section 5)."""

from __future__ import annotations

import torch

from rpg.core.types import BatchTotals


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of x where mask > 0; padded entries are dropped, not multiplied (inf/nan there cannot leak into the value)."""
    x = torch.where(mask > 0, x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over entries where mask is 1 (mask has at least one valid entry)."""
    return masked_sum(x, mask) / mask.sum()


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, x, torch.full_like(x, -torch.inf)).max()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) with the mean and (unbiased) std over valid entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + eps)


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, totals: BatchTotals | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-sample losses to the scalar loss.

    values: [N, T] per-token losses (token modes) or [N] per-response losses ("seq-mean").
    mask: [N, T] float 0/1.
    totals: normalisers of the whole mini-batch; None = this batch is the whole mini-batch.
      token-mean          sum_{i,t} m l / num_tokens                     (DAPO, Dr.GRPO-style)
      seq-mean-token-mean sum_i [sum_t m l / |y_i|] / num_seqs           (original GRPO)
      seq-mean-token-sum  sum_i [sum_t m l] / num_seqs
      seq-mean            sum_i l_i / num_seqs                            (the paper's (1/N) sum_i)
    Summing the outputs of the micro-batches of one mini-batch, each called with the mini-batch's
    ``totals``, gives exactly the output on the whole mini-batch.
    weights: optional per-token factors [N, T] (no grad) multiplying ``values`` (token modes only), e.g.
      truncated importance weights for sampler/trainer mismatch; normalisers are unchanged.
    """
    if weights is not None:
        if weights.shape != values.shape:
            raise ValueError(f"weights has shape {tuple(weights.shape)} but values has {tuple(values.shape)}; "
                             "per-token weights need a token-level loss (level=token, not agg=seq-mean)")
        values = values * weights.detach()
    totals = totals or BatchTotals.of(mask)
    lengths = mask.sum(-1)
    has_tokens = (lengths > 0).to(mask.dtype)
    if agg == "token-mean":
        return masked_sum(values, mask) / totals.num_tokens
    if agg == "seq-mean-token-mean":
        per_seq = masked_sum(values, mask, dim=-1) / lengths.clamp(min=1)
        return per_seq.sum() / totals.num_seqs
    if agg == "seq-mean-token-sum":
        return masked_sum(values, mask, dim=-1).sum() / totals.num_seqs
    if agg == "seq-mean":
        if values.dim() != 1:
            raise ValueError(f"agg='seq-mean' needs one value per response ([N]), got shape {tuple(values.shape)}")
        return masked_sum(values, has_tokens) / totals.num_seqs
    raise ValueError(f"unknown agg {agg!r}; use token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean")
