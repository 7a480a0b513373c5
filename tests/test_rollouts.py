"""Batch collection with the real HF engine and the warm-started tiny model: dynamic sampling."""

from __future__ import annotations

import torch

from rpg.train.build import build_data, build_policy
from rpg.rewards import get_reward_fn
from rpg.rollout import make_engine
from rpg.train.rollouts import PromptSampler, collect


def test_dynamic_sampling_keeps_groups_of_mixed_accuracy_only(make_cfg):
    # dapo: overlong penalty on (buffer 0.25 x 20 tokens), so all-wrong groups of different lengths have
    # different scores; only accuracy tells a group with a learning signal
    cfg = make_cfg("algo=dapo", "rollout.prompts_per_step=16", "rollout.samples_per_prompt=8")
    model, tokenizer, _ = build_policy(cfg)
    train, _ = build_data(cfg)
    engine = make_engine("hf", model, tokenizer)
    batch = collect(engine, tokenizer, train, PromptSampler(len(train), cfg.seed), cfg, get_reward_fn(cfg.data.reward))
    acc, scores = batch.acc.view(16, 8), batch.scores.view(16, 8)
    assert all(0 < row.sum() < 8 for row in acc), acc.sum(-1)
    assert batch.stats["rollout/groups_dropped"] > 0  # the filter had something to do
    assert (scores != scores[:, :1]).any(-1).all()  # a kept group of mixed accuracy has mixed scores too


def test_hf_rollouts_ignore_the_checkpoints_generation_config():
    """A checkpoint's repetition penalty / top_k would change the sampler away from softmax(logits / T)."""
    from rpg.models.tiny import build_char_tokenizer, build_tiny_model
    from rpg.rollout.base import SamplingParams

    tok = build_char_tokenizer()
    model = build_tiny_model(seed=0, tokenizer=tok)
    prompt = tok.encode("12+34=")
    ids = torch.tensor([prompt])
    manual = ids
    with torch.no_grad():
        for _ in range(8):  # greedy by hand: argmax of the logits
            manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], 1)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.top_k = 1
    engine = make_engine("hf", model, tok)
    greedy = engine.generate([prompt], SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
    width = int(greedy.response_mask[0].sum())
    assert width > 0 and torch.equal(greedy.response_ids[0, :width], manual[0, len(prompt):len(prompt) + width])
    torch.manual_seed(0)
    sampled = engine.generate([prompt], SamplingParams(n=8, temperature=1.0, max_new_tokens=8))
    assert len({tuple(r.tolist()) for r in sampled.response_ids}) > 1  # top_k = 1 would make all 8 equal
