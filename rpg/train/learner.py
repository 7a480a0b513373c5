"""One RL step on a scored batch, as the paper's update: old/ref log-probs -> advantages -> optimizer steps
-> learning-rate schedule -> reference schedule.  Sampling and logging stay with the caller (rpg.train.loop).
"""

from __future__ import annotations

import torch

from rpg.config import loss_params
from rpg.core.advantages import ADVANTAGES
from rpg.core.divergences import KL_ESTIMATORS, k3
from rpg.core.losses import POLICY_LOSSES
from rpg.models.logprobs import response_kl, response_logprobs
from rpg.rollout.mismatch import mismatch_metrics, tis_weights
from rpg.train.update import RolloutBatch, policy_update


@torch.no_grad()
def score_logprobs(model, gens, cfg, backend, with_entropy=False):
    """Log-probs (and entropy) of the sampled responses under ``model``: each rank scores its share of the
    rows, micro-batch by micro-batch, and every rank gets all rows back."""
    was_training = model.training
    model.eval()
    logps, ents = [], []
    ids, attn, p = gens.input_ids, gens.attention_mask, gens.prompt_ids.shape[1]
    rows, mb = backend.local_rows(torch.arange(ids.shape[0])), cfg.ppo.micro_batch_size
    for s in range(0, len(rows), mb):
        r = rows[s:s + mb]
        lp, ent = response_logprobs(model, ids[r], attn[r], p, cfg.rollout.temperature, cfg.engine.logprob_chunk,
                                    with_entropy)
        logps.append(lp)
        ents.append(ent)
    model.train(was_training)
    logp = backend.gather_rows(torch.cat(logps))
    return logp, (backend.gather_rows(torch.cat(ents)) if with_entropy else None)


def has_dropout(module: torch.nn.Module) -> bool:
    """Whether training-mode forwards of ``module`` are random (a Dropout layer or a config's attention dropout)."""
    config = getattr(module, "config", None) or getattr(getattr(module, "lm", None), "config", None)
    return float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0 or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def exact_kl_metrics(reverse, forward, logp, ref_logp, mask) -> dict[str, float]:
    """Exact token KLs (pi_old vs pi_ref, [B, R]) and each estimator's error at the sampled tokens: means
    over the batch's tokens (``mask``) and the standard deviation of the errors."""
    n = mask.sum()
    mean = lambda t: ((t * mask).sum() / n).item()
    std = lambda t: (((t - mean(t)) ** 2 * mask).sum() / n).sqrt().item()
    out = {"kl_exact/reverse": mean(reverse), "kl_exact/forward": mean(forward)}
    for name, estimator in KL_ESTIMATORS.items():
        error = estimator(logp, ref_logp) - reverse  # k1 and k3: zero mean at every prefix (unbiased)
        out[f"kl_exact/{name}_error_mean"], out[f"kl_exact/{name}_error_std"] = mean(error), std(error)
    return out


class Learner:
    """The policy's side of the loop: ``step(batch)`` runs one RL step and returns its metrics.

    ``module`` is what the update trains and scores with (the backend's wrapped policy); ``shuffle`` orders
    the mini-batches (the same generator on every rank); ``optimizer_steps`` counts steps over the run.
    """

    def __init__(self, module, optimizer, scheduler, reference, cfg, backend, shuffle: torch.Generator):
        self.module, self.optimizer, self.scheduler, self.reference = module, optimizer, scheduler, reference
        self.cfg, self.backend, self.shuffle = cfg, backend, shuffle
        self.loss_fn, self.advantage_fn = POLICY_LOSSES[cfg.algo.loss], ADVANTAGES[cfg.algo.advantage]
        self.params = loss_params(cfg.algo)
        self.optimizer_steps = 0
        self.dropout = has_dropout(module)  # fixed by the architecture: checked once

    def step(self, batch, kl_after_update: bool = False) -> dict[str, float]:
        """One RL step on ``batch``; ``kl_after_update`` also scores the batch under the updated policy
        (one more forward) for ``kl/k3_iw_after_update``."""
        cfg, gens = self.cfg, batch.gens
        mask = gens.response_mask.float()
        exact = None
        if cfg.tracking.exact_kl:  # before the update: the policy that sampled against the anchor
            exact = response_kl(self.module, self.reference.model, gens.input_ids, gens.attention_mask,
                                gens.prompt_ids.shape[1], cfg.rollout.temperature, cfg.engine.logprob_chunk)
        tis = None
        if gens.policy_lag:  # rollout.overlap: sampled by weights behind these; the sampler's log-probs are pi_old
            old_logp, entropy = gens.sampler_logp, gens.sampler_entropy
        elif self._update_is_on_policy(gens):  # the update's own forward gives pi_old (and the entropy)
            old_logp = entropy = None
        else:
            old_logp, entropy = score_logprobs(self.module, gens, cfg, self.backend, with_entropy=True)
            if cfg.rollout.tis_cap and gens.sampler_logp is not None:
                tis = tis_weights(old_logp, gens.sampler_logp, mask, cfg.rollout.tis_cap)
        if gens.ref_logp is not None:  # scored by the rollout worker (rollout.overlap, frozen reference)
            ref_logp = gens.ref_logp
        else:
            ref_logp = self.reference.logprobs(lambda m: score_logprobs(m, gens, cfg, self.backend)[0], old_logp)
        advantages = self.advantage_fn(batch.scores, batch.group_ids, mask)
        rb = RolloutBatch(gens.input_ids, gens.attention_mask, gens.response_mask, old_logp, ref_logp,
                          advantages, gens.prompt_ids.shape[1], tis)
        u = cfg.ppo
        metrics = policy_update(self.module, self.optimizer, rb, self.loss_fn, self.params, epochs=u.epochs,
                                mini_batch_size=u.mini_batch_size, micro_batch_size=u.micro_batch_size,
                                grad_clip=cfg.optim.grad_clip, temperature=cfg.rollout.temperature,
                                chunk_tokens=cfg.engine.logprob_chunk, generator=self.shuffle, backend=self.backend)
        old_logp, entropy = rb.old_logp, (entropy if entropy is not None else rb.entropy)
        ref_logp = old_logp if ref_logp is None else ref_logp
        self.scheduler.step()  # once per RL step: optim.warmup_steps counts RL steps, as the paper's
        self.optimizer_steps += int(metrics.pop("optim/steps"))
        tokens = mask.sum().item()
        if kl_after_update:  # KL(pi_new || pi_ref) on the batch, importance-weighted (tokens from pi_old),
            new_logp, _ = score_logprobs(self.module, gens, cfg, self.backend)  # before the anchor may move
            w_new = torch.exp((new_logp - old_logp).clamp(max=20.0))
            metrics["kl/k3_iw_after_update"] = (w_new * k3(new_logp, ref_logp) * mask).sum().item() / tokens
        refreshed = self.reference.after_update(self.module, self.optimizer_steps, metrics.get("kl/k3", 0.0))
        metrics.update({"train/entropy": (entropy * mask).sum().item() / tokens,
                        "train/advantage_abs_mean": advantages.abs().mean().item()})
        mode = self.reference.mode
        if mode in ("every_k", "kl_threshold"):  # the rules that refresh the anchor (every_step, never: never)
            metrics["ref/refreshed"] = float(refreshed)
        if mode == "kl_threshold":  # the only rule that reads the moving average
            metrics["ref/kl_avg"] = self.reference.kl_avg
        if self.reference.model is None:  # ref = old: rho = 1, never clamped
            metrics.pop("is/frac_rho_clamped", None)
        if exact is not None:
            metrics.update(exact_kl_metrics(*exact, mask))
        if cfg.rollout.overlap:  # 0 at the first step and right after a resume, 1 after
            metrics["rollout/policy_lag"] = float(gens.policy_lag)
        if not gens.policy_lag and gens.sampler_logp is not None:  # the sampler's numbers against the trainer's
            metrics.update(mismatch_metrics(gens.sampler_logp, old_logp, mask))
        if tis is not None:
            metrics.update({"rollout/tis_weight_mean": (tis * mask).sum().item() / tokens,
                            "rollout/tis_frac_capped": ((tis >= cfg.rollout.tis_cap) * mask).sum().item() / tokens})
        return metrics

    def _update_is_on_policy(self, gens) -> bool:
        """One optimizer step on weights that sampled the batch, with no dropout and no truncated IS: the
        update's first forward is pi_old itself, so scoring the batch beforehand would only repeat it."""
        u, rows = self.cfg.ppo, gens.response_ids.shape[0]
        one_step = u.epochs == 1 and u.mini_batch_size >= rows
        tis = self.cfg.rollout.tis_cap and gens.sampler_logp is not None
        return one_step and not tis and not self.dropout

    def state_dict(self) -> dict:
        """The schedule state a resume needs (the weights, optimizer and reference model: rpg.backend)."""
        return {"scheduler": self.scheduler.state_dict(), "reference": self.reference.state_dict(),
                "shuffle": self.shuffle.get_state(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.reference.load_state_dict(state["reference"])
        self.shuffle.set_state(state["shuffle"])
        self.optimizer_steps = state["optimizer_steps"]
