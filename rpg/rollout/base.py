"""The rollout-engine interface shared by the HF and vLLM engines."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt (the group size G)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 16


@dataclass
class Generations:
    """B = prompts x n rows, sample j of prompt i at row i * n + j.

    prompt_ids/prompt_mask: [B, P] left-padded.  response_ids/response_mask: [B, R] right-padded; the
    mask covers the tokens up to and including EOS.  truncated: [B] bool, no EOS within max_new_tokens.
    sampler_logp: [B, R] the engine's own log-probs of the sampled tokens, if it reports them;
    sampler_entropy: [B, R] the entropy of its distribution at each response position, if it reports it.
    policy_lag: how many updates the weights that sampled are behind the trained policy (rollout.overlap).
    ref_logp: [B, R] the frozen reference's log-probs of the responses, if the engine scored them.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor
    sampler_logp: Optional[torch.Tensor] = None
    sampler_entropy: Optional[torch.Tensor] = None
    policy_lag: int = 0
    ref_logp: Optional[torch.Tensor] = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


class RolloutEngine(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generations: ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from ``model``'s current weights (anything with ``state_dict()``)."""

    def sleep(self) -> None:
        """Release accelerator memory for the training phase, if the engine can; sync_weights wakes it."""

    def close(self) -> None: ...


@torch.no_grad()
def copy_weights(own_model, model) -> None:
    """Copy ``model``'s weights into ``own_model`` (a full copy kept by a sampler); nothing if they are one."""
    if model is own_model:
        return
    own = own_model.state_dict(keep_vars=True)
    for name, t in model.state_dict().items():  # FSDP: DTensors, gathered one at a time on every rank
        own[name].copy_(t.full_tensor() if hasattr(t, "full_tensor") else t)


class InProcessEngine:
    """The engine methods of a sampler that runs ``self.model`` in this process (a full copy under FSDP)."""

    model: torch.nn.Module

    def sync_weights(self, model) -> None:
        copy_weights(self.model, model)

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode for the block, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def prompt_rows(prompts: list[list[int]], n: int, pad_id: int):
    """Left-padded prompt ids and mask [B = len(prompts) x n, P], sample j of prompt i at row i * n + j."""
    ids, mask = left_pad(prompts, pad_id)
    return ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)


def decoded_responses(sequences: torch.Tensor, tokenizer):
    """Sampled continuations [B, R] cut at the first EOS and trimmed to the longest response:
    ids, mask, truncated and the decoded texts."""
    resp, mask, truncated = finish_responses(sequences, tokenizer.eos_token_id, tokenizer.pad_token_id)
    width = max(int(mask.sum(-1).max()), 1)
    resp, mask = resp[:, :width], mask[:, :width]
    texts = tokenizer.batch_decode(torch.where(mask.bool(), resp, tokenizer.pad_token_id), skip_special_tokens=True)
    return resp, mask, truncated, texts


def finish_responses(sequences: torch.Tensor, eos_id: int, pad_id: int):
    """Cut sampled continuations [B, R] at the first EOS (kept): returns ids, mask, truncated."""
    is_eos = sequences == eos_id
    seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    mask = ~seen_before
    ids = torch.where(mask, sequences, torch.full_like(sequences, pad_id))
    return ids, mask.long(), ~is_eos.any(-1)


def left_pad(prompts: list[list[int]], pad_id: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids, mask


def concat_generations(parts: list[Generations]) -> Generations:
    """Stack generations (of several rounds or ranks), re-padding prompts (left) and responses (right)."""
    if len(parts) == 1:
        return parts[0]
    p = max(g.prompt_ids.shape[1] for g in parts)
    r = max(g.response_ids.shape[1] for g in parts)
    pad_l = lambda t, w: torch.nn.functional.pad(t, (w - t.shape[1], 0))
    pad_r = lambda t, w: torch.nn.functional.pad(t, (0, w - t.shape[1]))
    return Generations(
        torch.cat([pad_l(g.prompt_ids, p) for g in parts]), torch.cat([pad_l(g.prompt_mask, p) for g in parts]),
        torch.cat([pad_r(g.response_ids, r) for g in parts]), torch.cat([pad_r(g.response_mask, r) for g in parts]),
        sum((g.texts for g in parts), []), torch.cat([g.truncated for g in parts]),
        *(None if getattr(parts[0], k) is None else torch.cat([pad_r(getattr(g, k), r) for g in parts])
          for k in ("sampler_logp", "sampler_entropy")),
        max(g.policy_lag for g in parts),
        None if parts[0].ref_logp is None else torch.cat([pad_r(g.ref_logp, r) for g in parts]))
