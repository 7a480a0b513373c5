"""One policy update on a rollout batch: epochs x mini-batches (optimizer steps) x micro-batches (accumulation).

The loss of each micro-batch is normalised by the totals of its whole mini-batch (BatchTotals), so the
accumulated gradient is exactly the mini-batch gradient for every aggregation mode.  With several ranks
(rpg.backend) each rank runs its share of every mini-batch's rows and the gradients are summed over ranks,
so the totals stay those of the whole mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rpg.backend.local import LocalBackend
from rpg.core.losses import BatchTotals, LossParams
from rpg.models.logprobs import response_logprobs


class NonFiniteLossError(RuntimeError):
    """Raised instead of taking a step on a nan/inf loss or gradient."""


@dataclass
class RolloutBatch:
    """Everything the update needs; rows are responses.  input_ids/attention_mask [B, P + R];
    response_mask, old_logp, ref_logp, token_weights, entropy [B, R]; advantages [B].

    old_logp None: the update is on-policy by construction (one optimizer step, no dropout), so its own
    forward at the sampling weights gives pi_old; policy_update then fills ``old_logp`` and ``entropy``.
    ref_logp None: the anchor is pi_old (ref = old).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor
    prompt_len: int
    token_weights: torch.Tensor | None = None  # [B, R] per-token loss factors (truncated IS), or None
    entropy: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> "RolloutBatch":
        """A subset of rows, trimmed to the longest response it holds."""
        width = max(int(self.response_mask[idx].sum(-1).max()), 1)
        p = self.prompt_len
        cut = lambda t: None if t is None else t[idx, :width]
        return RolloutBatch(self.input_ids[idx, : p + width], self.attention_mask[idx, : p + width],
                            self.response_mask[idx, :width], cut(self.old_logp), cut(self.ref_logp),
                            self.advantages[idx], p, cut(self.token_weights))


_MAX_METRICS = ("is/weight_max",)
_SHARES = "loss/"


def policy_update(model, optimizer, batch: RolloutBatch, loss_fn: Callable, params: LossParams, *,
                  epochs: int, mini_batch_size: int, micro_batch_size: int, grad_clip: float,
                  temperature: float, chunk_tokens: int, generator: torch.Generator,
                  backend=None) -> dict[str, float]:
    """Run the optimizer steps of one RL step at the optimizer's current learning rate (the caller's scheduler
    steps once per RL step, the paper's unit of warm-up); returns averaged metrics (max for maxima).

    ``micro_batch_size`` is responses per forward on one rank; every rank must see the same ``generator``.
    """
    backend = backend or LocalBackend()  # one process unless told
    model.train()
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    grad_norms: list[torch.Tensor] = []
    n = batch.input_ids.shape[0]
    record = batch.old_logp is None  # on-policy: this forward's log-probs are pi_old's
    if record and (epochs != 1 or mini_batch_size < n):
        raise ValueError("old_logp=None needs one optimizer step (ppo.epochs=1, ppo.mini_batch_size >= batch)")
    recorded: list[tuple] = []
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, mini_batch_size):
            mini = order[start : start + mini_batch_size]
            totals = BatchTotals.of(batch.response_mask[mini].float())
            mine = backend.local_rows(mini)
            for m_start in range(0, len(mine), micro_batch_size):
                micro = batch.rows(mine[m_start : m_start + micro_batch_size])
                logp, entropy = response_logprobs(model, micro.input_ids, micro.attention_mask, micro.prompt_len,
                                                  temperature, chunk_tokens, with_entropy=record)
                if record:
                    micro.old_logp = logp.detach()
                    recorded.append((mine[m_start : m_start + micro_batch_size], micro.old_logp, entropy))
                ref_logp = micro.old_logp if micro.ref_logp is None else micro.ref_logp
                out = loss_fn(logp, micro.old_logp, ref_logp, micro.advantages,
                              micro.response_mask.float(), params, totals, token_weights=micro.token_weights)
                if not backend.all_finite(bool(torch.isfinite(out.loss))):
                    raise NonFiniteLossError(non_finite_message(out, micro, steps, optimizer, temperature))
                out.loss.backward()
                tokens = float(micro.response_mask.sum())
                samples = tokens if params.level == "token" else float(micro.response_mask.any(-1).sum())
                _accumulate(sums, weights, out.metrics, tokens, samples)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor replicated on every rank
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                raise NonFiniteLossError(f"gradient norm is {grad_norm.item()} at optimizer step {steps}; lower optim.lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            grad_norms.append(grad_norm.detach())
    if record:
        batch.old_logp, batch.entropy = _assemble(recorded, n, batch.response_mask.shape[1], backend)
    sums = {k: float(v) for k, v in zip(sums, torch.stack(list(sums.values())).tolist())} if sums else {}
    sums, weights = backend.reduce_metrics(sums, weights, _MAX_METRICS)
    metrics = {k: v if k in _MAX_METRICS else v / steps if k.startswith(_SHARES) else v / weights[k]
               for k, v in sums.items()}
    metrics["optim/grad_norm"] = torch.stack(grad_norms).mean().item()
    metrics["optim/steps"] = steps
    metrics["optim/lr"] = optimizer.param_groups[0]["lr"]
    return metrics


def non_finite_message(out, micro: RolloutBatch, steps: int, optimizer, temperature: float) -> str:
    """Why a loss is nan/inf, as far as the batch tells: the rewards, the sampling, or a diverged update."""
    lr = optimizer.param_groups[0]["lr"]
    metrics = {k: round(float(v), 4) for k, v in out.metrics.items()}
    if not bool(torch.isfinite(micro.advantages).all()):
        cause = "the advantages are not finite: the reward function (data.reward) returned nan/inf"
    elif not bool(torch.isfinite(micro.old_logp[micro.response_mask.bool()]).all()):
        cause = (f"the sampling policy's log-probabilities are not finite (rollout.temperature={temperature}): "
                 "the weights diverged in an earlier step; lower optim.lr")
    elif steps > 0:
        cause = f"the policy diverged within this RL step's {steps} optimizer steps: lower optim.lr (now {lr:g})"
    else:
        cause = (f"the loss is not finite at the sampling parameters: lower optim.lr (now {lr:g}), or use "
                 "algo.level=token (sequence-level ratios overflow first)")
    return f"loss is {out.loss.item()} at optimizer step {steps}; {cause}. Loss metrics: {metrics}"


def _assemble(recorded: list[tuple], n: int, width: int, backend):
    """The recorded (rows, old_logp, entropy) of this rank's micro-batches as [n, width] tensors of all rows."""
    rows = torch.cat([r for r, _, _ in recorded])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
    parts = [backend.gather_rows(torch.cat([pad(t[i]) for t in recorded]))
             for i in (1, 2)]
    order = backend.gather_rows(rows[:, None])[:, 0]
    full = [torch.empty_like(p) for p in parts]
    for f, p in zip(full, parts):
        f[order] = p
    return full[0], full[1]


def _accumulate(sums: dict, weights: dict, metrics: dict, tokens: float, samples: float) -> None:
    """Loss terms are shares of their mini-batch's loss (normalised by its totals): summed.  Means over a
    micro-batch are weighted by its tokens (kl/*) or samples (the rest), so the result is the mean over
    the whole mini-batch whatever the micro-batch and rank split.  Values stay tensors (one host sync at the
    end of the update)."""
    for k, v in metrics.items():
        v = torch.as_tensor(v, dtype=torch.float64).detach()
        if k in _MAX_METRICS:
            sums[k] = torch.maximum(sums[k], v) if k in sums else v
            continue
        w = 1.0 if k.startswith(_SHARES) else tokens if k.startswith("kl/") else samples
        sums[k] = sums.get(k, 0.0) + v * w
        weights[k] = weights.get(k, 0.0) + w
