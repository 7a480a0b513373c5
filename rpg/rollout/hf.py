"""Rollouts with transformers' ``generate``: on the training model itself (local backend; nothing to sync), or
on a full copy kept by each rank (FSDP backend; synced from the gathered weights after every update)."""

from __future__ import annotations

import logging

import torch
from transformers import GenerationConfig

from rpg.rollout.base import Generations, InProcessEngine, SamplingParams, decoded_responses, eval_mode, prompt_rows

log = logging.getLogger("rpg.rollout")
#: generation_config fields that do not change which tokens are sampled
_NO_EFFECT = {"pad_token_id", "eos_token_id", "bos_token_id", "transformers_version", "_from_model_config",
              "use_cache", "output_attentions", "output_hidden_states", "return_dict_in_generate"}


def neutral_generation_config(model) -> None:
    """Replace ``model.generation_config`` by one that keeps only the special tokens.

    ``generate`` merges a checkpoint's ``generation_config.json`` into every call, even one that passes its
    own GenerationConfig (e.g. Qwen2.5-7B-Instruct ships repetition_penalty 1.05, top_k 20): tokens would
    come from a distribution other than the softmax(logits / T) that the trainer scores as pi_old.
    """
    old = model.generation_config
    neutral = GenerationConfig(pad_token_id=old.pad_token_id, eos_token_id=old.eos_token_id,
                               bos_token_id=old.bos_token_id)
    changed = sorted(k for k, v in old.to_diff_dict().items() if k not in _NO_EFFECT and getattr(neutral, k, None) != v)
    if changed:
        log.info("rollouts ignore the checkpoint's generation_config settings %s: sampling is softmax(logits / "
                 "rollout.temperature) with rollout.top_p", changed)
    model.generation_config = neutral


class HFEngine(InProcessEngine):
    def __init__(self, model, tokenizer, batch_size: int = 512):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        neutral_generation_config(model)

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> Generations:
        tok = self.tokenizer
        ids, mask = prompt_rows(prompt_token_ids, sampling.n, tok.pad_token_id)
        greedy = sampling.temperature == 0
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, do_sample=not greedy)
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        device = next(self.model.parameters()).device
        outs = []
        with eval_mode(self.model):
            for s in range(0, ids.shape[0], self.batch_size):
                out = self.model.generate(input_ids=ids[s:s + self.batch_size].to(device),
                                          attention_mask=mask[s:s + self.batch_size].to(device), **kwargs)
                cont = out[:, ids.shape[1]:].cpu()
                pad = torch.full((cont.shape[0], sampling.max_new_tokens - cont.shape[1]), tok.pad_token_id,
                                 dtype=cont.dtype)
                outs.append(torch.cat([cont, pad], 1))
        resp, resp_mask, truncated, texts = decoded_responses(torch.cat(outs), tok)
        return Generations(ids, mask, resp, resp_mask, texts, truncated)

