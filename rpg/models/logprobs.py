"""Per-token log-probabilities and entropy of responses, chunked so [B, T, V] logits never exist at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each sequence's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0, chunk_tokens: int = 1024, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) for the response part of ``input_ids`` (and the entropy of pi there).

    input_ids, attention_mask: [B, P + R], prompts left-padded to P, responses right-padded to R.
    Logits are divided by ``temperature`` so the log-probs are those of the sampling distribution.
    The vocabulary projection runs on ``chunk_tokens`` positions at a time (float32 or wider); with gradients on
    and a vocabulary larger than 4 x hidden, each chunk runs under activation checkpointing, so at most one
    chunk's logits exist at a time in backward too (peak memory does not grow with response length x vocabulary).
    Returns logp [B, R] (with grad if enabled) and entropy [B, R] (detached) or None.
    ``model`` may also be a :class:`ResponseScorer` (the FSDP backend's training module).
    """
    if isinstance(model, ResponseScorer):
        return model(input_ids, attention_mask, prompt_len, temperature, chunk_tokens, with_entropy)
    return _response_logprobs(model, input_ids, attention_mask, prompt_len, temperature, chunk_tokens, with_entropy)


def _response_logprobs(model, input_ids, attention_mask, prompt_len, temperature, chunk_tokens, with_entropy):
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
    head = model.get_output_embeddings()
    b, r = input_ids.shape[0], input_ids.shape[1] - prompt_len
    states = hidden[:, prompt_len - 1 : -1].reshape(b * r, -1)  # position t predicts token t + 1
    targets = input_ids[:, prompt_len:].reshape(b * r)
    # with gradients on, a large vocabulary's chunk runs under checkpointing: backward recomputes its logits
    # instead of keeping [chunk, V] alive; a small one (V <= 4 x hidden, under one MLP's activations per
    # token) is cheaper kept
    save_memory = torch.is_grad_enabled() and head.weight.shape[0] > 4 * head.weight.shape[1]
    logps, ents = [], []
    for start in range(0, b * r, chunk_tokens):
        st, tgt = states[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if save_memory:
            lp, ent = checkpoint(_chunk_logp, head, st, tgt, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logp(head, st, tgt, temperature, with_entropy)
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(b, r)
    entropy = torch.cat(ents).view(b, r) if with_entropy else None
    return logp, entropy


def _chunk_logp(head, states, targets, temperature, with_entropy):
    """log-probs of ``targets`` [N] (and the entropy, detached, or None) from hidden ``states`` [N, H]."""
    logits = _at_least_float32(head(states)) / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, logz - (F.softmax(logits, dim=-1) * logits).sum(-1)


@torch.no_grad()
def response_kl(model, reference, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                chunk_tokens: int = 1024):
    """Exact per-token KLs between ``model`` and ``reference`` at every response position, and both models'
    log-probs of the response tokens: (reverse, forward, logp, ref_logp), each [B, R].

    The full-vocabulary distributions (softmax of logits / temperature) are formed ``chunk_tokens``
    positions at a time, so [B, R, V] never exists (rpg.core.divergences.exact_kl for the formulas).
    """
    from rpg.core.divergences import exact_kl

    positions = position_ids_from_mask(attention_mask)
    b, r = input_ids.shape[0], input_ids.shape[1] - prompt_len
    states = [m.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
              .last_hidden_state[:, prompt_len - 1 : -1].reshape(b * r, -1) for m in (model, reference)]
    heads = [m.get_output_embeddings() for m in (model, reference)]
    targets = input_ids[:, prompt_len:].reshape(b * r)
    parts = []
    for start in range(0, b * r, chunk_tokens):
        tgt = targets[start : start + chunk_tokens, None]
        lp, ref = (torch.log_softmax(_at_least_float32(h(s[start : start + chunk_tokens])) / temperature, -1)
                   for h, s in zip(heads, states))
        parts.append((*exact_kl(lp, ref), lp.gather(-1, tgt).squeeze(-1), ref.gather(-1, tgt).squeeze(-1)))
    return tuple(torch.cat([p[i] for p in parts]).view(b, r) for i in range(4))


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are normalised in float32; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class ResponseScorer(torch.nn.Module):
    """The policy as a module whose forward is :func:`response_logprobs`.

    FSDP2 gathers a module's own (non-sub-unit) parameters around its ``forward``; wrapping the causal LM
    this way lets the embedding, final norm and (tied) output head be gathered once for the decoder
    call and the chunked head projection together.  Its state dict names are ``lm.<model's names>``.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                chunk_tokens: int = 1024, with_entropy: bool = False):
        logp, entropy = _response_logprobs(self.lm, input_ids, attention_mask, prompt_len, temperature,
                                           chunk_tokens, with_entropy)
        return logp.clone(), entropy  # not a view: FSDP2 hooks its pre-backward on this output
