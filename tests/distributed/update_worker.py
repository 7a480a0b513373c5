"""One policy update (two optimizer steps) on a fixed batch, under the backend this process was started with.

    python tests/distributed/update_worker.py OUT LOSS AGG MICRO              # one process, local backend
    torchrun --nproc-per-node 2 tests/distributed/update_worker.py OUT ...    # FSDP2 over 2 gloo ranks
    ... OUT LOSS AGG MICRO checkpointing                                       # with activation checkpointing

Rank 0 saves the full weights after the update and the update's metrics to OUT (torch.save).
SGD with lr = 1 and no clipping, so the weight change is exactly minus the summed gradients.
"""

from __future__ import annotations

import os
import sys

import torch
from omegaconf import OmegaConf

from rpg.backend import make_backend
from rpg.config import EngineConfig, PPOConfig
from rpg.core.losses import POLICY_LOSSES, LossParams
from rpg.models.logprobs import response_logprobs
from rpg.models.tiny import build_char_tokenizer, build_tiny_model
from rpg.train.update import RolloutBatch, policy_update

ROWS, PROMPT, RESPONSE, MINI = 16, 6, 10, 8


def fixed_batch(lm) -> RolloutBatch:
    """16 responses of 1..10 tokens after 6-token prompts (some left padding), with old/ref log-probs
    near the model's own so that ratios and the KL term are non-trivial but moderate."""
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    ids = torch.randint(3, vocab, (ROWS, PROMPT + RESPONSE), generator=g)
    attn = torch.ones_like(ids)
    attn[::3, :2] = 0  # left-padded prompts
    lengths = torch.arange(ROWS) % RESPONSE + 1
    resp_mask = (torch.arange(RESPONSE)[None] < lengths[:, None]).long()
    attn[:, PROMPT:] = resp_mask
    with torch.no_grad():
        logp, _ = response_logprobs(lm, ids, attn, PROMPT)
    old = logp + 0.2 * torch.randn(logp.shape, generator=g)
    ref = logp + 0.3 * torch.randn(logp.shape, generator=g)
    adv = torch.randn(ROWS, generator=g)
    return RolloutBatch(ids, attn, resp_mask, old * resp_mask, ref * resp_mask, adv, PROMPT)


def main(out: str, loss: str, agg: str, micro: int, checkpointing: bool = False) -> None:
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    engine = EngineConfig(name="cpu", backend="fsdp" if distributed else "local")  # the schema's defaults: CPU, fp32
    cfg = OmegaConf.create({"engine": OmegaConf.structured(engine),
                            "ppo": OmegaConf.structured(PPOConfig(mini_batch_size=MINI, micro_batch_size=micro))})
    backend = make_backend(cfg)
    lm = build_tiny_model(seed=0, tokenizer=build_char_tokenizer())
    batch = fixed_batch(lm)
    if checkpointing:  # activation checkpointing as rpg.train.build enables it
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = backend.wrap(lm)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    params = LossParams(kl_coef=0.1, clip_low=0.2, clip_high=0.28, agg=agg)
    metrics = policy_update(module, optimizer, batch, POLICY_LOSSES[loss], params, epochs=1,
                            mini_batch_size=MINI, micro_batch_size=micro, grad_clip=1e9, temperature=1.0,
                            chunk_tokens=7, generator=torch.Generator().manual_seed(0), backend=backend)
    weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v  # every rank gathers, in order
               for k, v in backend.full_weights(module).state_dict().items()}
    if backend.is_main:
        torch.save({"weights": weights, "metrics": metrics}, out)
    backend.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:] == ["checkpointing"])
