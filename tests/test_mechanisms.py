"""Settings the rest of a configuration makes inert are named, with the fix, before a run starts."""

from __future__ import annotations

import io
import logging

import pytest

from rpg.config.mechanisms import inert_mechanisms
from rpg.train.loop import run


def test_the_default_run_has_no_inert_mechanism(make_cfg):
    # the default as shipped (FAST's smaller batch aside): 16 optimizer steps per RL step
    assert inert_mechanisms(make_cfg("rollout.prompts_per_step=16", "rollout.samples_per_prompt=8",
                                     "ppo.mini_batch_size=8")) == []


@pytest.mark.parametrize("overrides, expected", [
    # one on-policy optimizer step per RL step (what the default was): clip and KL both inert
    (["ppo.mini_batch_size=16"], ["the clip (algo.clip_low", "the KL term (algo.kl_coef=0.1)"]),
    # a frozen reference keeps the KL alive on-policy (GRPO); its clip still cannot act
    (["algo=grpo", "ppo.mini_batch_size=16"], ["the clip (algo.clip_low"]),
    (["algo=grpo", "algo.kl_coef=0", "ppo.mini_batch_size=8"], ["algo.ref_update=never keeps and scores"]),
    (["algo.ref_update=every_k", "algo.ref_update_k=100", "ppo.mini_batch_size=8", "steps=2"],
     ["algo.ref_update_k=100 optimizer steps exceeds the run's 4"]),
    (["algo=dapo", "algo.overlong_penalty=0", "ppo.mini_batch_size=8"], ["algo.overlong_buffer_frac > 0 with"]),
])
def test_inert_mechanisms_are_named_with_the_fix(make_cfg, overrides, expected):
    notes = inert_mechanisms(make_cfg(*overrides))
    assert len(notes) == len(expected), notes
    for note, start in zip(notes, expected):
        assert start in note and "set " in note


def test_a_run_says_so_before_it_starts(make_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="rpg"):
        run(make_cfg("ppo.mini_batch_size=16", "steps=1", "eval_every=0"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the clip (algo.clip_low" in m and "ppo.mini_batch_size below the batch (16" in m for m in warned)


def test_the_dry_run_lists_them(make_cfg):
    from rpg.launch.plan import dry_run

    out = io.StringIO()
    dry_run(make_cfg("ppo.mini_batch_size=16", "dry_run=true"), out=out)
    assert "the KL term (algo.kl_coef=0.1)" in out.getvalue()
