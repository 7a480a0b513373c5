"""Batch collection with the real HF engine and the warm-started tiny model: dynamic sampling."""

from __future__ import annotations

from rpg.build import build_data, build_policy
from rpg.rewards import get_reward_fn
from rpg.rollout import make_engine
from rpg.rollouts import PromptSampler, collect


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
