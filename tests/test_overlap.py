"""rollout.overlap: the next batch samples in a second process while the current one trains.

The importance weights of the update must be those of the policy that sampled: the worker's weights are the
ones of the last sync before the request, its log-probs are pi_old, and the learner uses them as such.
"""

from __future__ import annotations

import copy
import multiprocessing

import pytest
import torch

from rpg.backend.local import LocalBackend
from rpg.config import ConfigError, loss_params, validate
from rpg.core.advantages import ADVANTAGES
from rpg.core.losses import POLICY_LOSSES
from rpg.models.logprobs import response_logprobs
from rpg.models.tiny import build_char_tokenizer, build_tiny_model
from rpg.rollout.background import BackgroundEngine
from rpg.rollout.base import Generations, SamplingParams
from rpg.train.build import build_optimizer
from rpg.train.learner import Learner
from rpg.train.reference import Reference
from rpg.train.rollouts import PromptSampler, ScoredBatch
from rpg.train.update import RolloutBatch, policy_update


def _logp(model, gens, temperature):
    return response_logprobs(model, gens.input_ids, gens.attention_mask, gens.prompt_ids.shape[1], temperature)[0]


@torch.no_grad()
def _nudge(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def test_the_worker_samples_with_the_weights_of_the_last_sync_before_the_request():
    """... and scores the batch under the frozen reference."""
    tok = build_char_tokenizer()
    model = build_tiny_model(seed=0, tokenizer=tok)
    reference = build_tiny_model(seed=5, tokenizer=tok)  # a frozen anchor the worker scores each batch under
    engine = BackgroundEngine(model, tok, reference=reference, score=lambda m, g: _logp(m, g, 1.0))
    try:
        prompts, sampling = [tok.encode("12+3="), tok.encode("4+56=")], SamplingParams(n=8, max_new_tokens=10)
        before = copy.deepcopy(model)
        engine.submit(prompts, sampling)
        _nudge(model)  # the update that runs while the worker samples
        engine.sync_weights(model)
        gens = engine.generate(prompts, sampling)
        m = gens.response_mask.bool()
        assert gens.policy_lag == 1 and m.sum() > 40
        with torch.no_grad():
            behind, now = _logp(before, gens, 1.0), _logp(model, gens, 1.0)
        assert torch.allclose(gens.sampler_logp[m], behind[m], atol=1e-4)
        assert (gens.sampler_logp[m] - now[m]).abs().max() > 1e-2  # the nudge is visible: the test can fail
        with torch.no_grad():
            anchor = _logp(reference, gens, 1.0)
        torch.testing.assert_close(gens.ref_logp, anchor, rtol=0, atol=1e-6)
        fresh = engine.generate(prompts, sampling)  # nothing in flight: sampled now, from the synced weights
        with torch.no_grad():
            now = _logp(model, fresh, 1.0)
        assert fresh.policy_lag == 0
        assert torch.allclose(fresh.sampler_logp[fresh.response_mask.bool()], now[fresh.response_mask.bool()], atol=1e-4)
    finally:
        engine.close()
    assert not engine.worker.is_alive()


def test_a_stale_batchs_pi_old_is_the_samplers(make_cfg):
    """The update on a batch sampled one update behind is the loss with pi_old = the sampler's log-probs."""
    cfg = make_cfg("algo=rpg_fkl", "ppo.mini_batch_size=16", "ppo.micro_batch_size=16", "ppo.epochs=1",
                   "rollout.overlap=true")
    tok = build_char_tokenizer()
    model = build_tiny_model(seed=0, tokenizer=tok).double()
    behind = copy.deepcopy(model)
    _nudge(model, 0.02)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 90, (16, 10), generator=g)
    gens = Generations(ids[:, :4], torch.ones(16, 4, dtype=torch.long), ids[:, 4:], torch.ones(16, 6, dtype=torch.long),
                       [""] * 16, torch.zeros(16, dtype=torch.bool), policy_lag=1)
    with torch.no_grad():
        gens.sampler_logp = _logp(behind, gens, cfg.rollout.temperature)
    gens.sampler_entropy = torch.zeros_like(gens.sampler_logp)
    scores = torch.randint(0, 2, (16,), generator=g).double()
    batch = ScoredBatch(gens, scores, scores, torch.arange(4).repeat_interleave(4), {})
    mine, plain = copy.deepcopy(model), copy.deepcopy(model)
    optimizer, scheduler = build_optimizer(cfg, mine)
    learner = Learner(mine, optimizer, scheduler, Reference(None, "every_step"), cfg, LocalBackend(),
                      torch.Generator().manual_seed(0))
    forwards = []
    mine.model.register_forward_hook(lambda *_: forwards.append(1))
    metrics = learner.step(batch)
    assert len(forwards) == 1 and metrics["rollout/policy_lag"] == 1.0  # no pi_old forward: the sampler's
    # the plain side: the same update with old = ref = the sampler's log-probs, written as a RolloutBatch
    plain_opt, _ = build_optimizer(cfg, plain)
    mask = gens.response_mask.double()
    adv = ADVANTAGES[cfg.algo.advantage](scores, batch.group_ids, mask)
    rb = RolloutBatch(gens.input_ids, gens.attention_mask, gens.response_mask, gens.sampler_logp, gens.sampler_logp,
                      adv, 4)
    policy_update(plain, plain_opt, rb, POLICY_LOSSES[cfg.algo.loss], loss_params(cfg.algo), epochs=1,
                  mini_batch_size=16, micro_batch_size=16, grad_clip=cfg.optim.grad_clip,
                  temperature=cfg.rollout.temperature, chunk_tokens=1024, generator=torch.Generator().manual_seed(0))
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.testing.assert_close(flat(mine), flat(plain), rtol=0, atol=1e-12)
    assert metrics["is/weight_max"] > 1.001  # the ratio to the sampler is not 1: the staleness is in the loss


def test_an_overlapped_run_trains_one_update_behind_and_leaves_no_process(make_cfg):
    import rpg.train.loop as loop

    cfg = make_cfg("rollout.overlap=true", "algo.ref_update=never", "steps=3", "eval_every=0")  # worker scores ref
    logged = []

    class Recorder(loop.NullTracker):
        def log_metrics(self, metrics, step):
            logged.append((step, metrics.get("rollout/policy_lag")))

    original, loop.NullTracker = loop.NullTracker, Recorder
    try:
        loop.run(cfg)
    finally:
        loop.NullTracker = original
    assert [lag for step, lag in logged if step >= 1] == [0.0, 1.0, 1.0]
    assert not multiprocessing.active_children()


def test_overlap_needs_the_lean_engine_in_one_process(make_cfg):
    with pytest.raises(ConfigError, match="engine.rollout=lean"):
        validate(make_cfg("rollout.overlap=true", "engine.rollout=hf"))


def test_prompts_drawn_ahead_survive_a_checkpoint():
    s = PromptSampler(50, seed=2)
    s.next(4)
    ahead = s.draw_ahead(4)
    resumed = PromptSampler(50, seed=2)
    resumed.load_state_dict(s.state_dict())
    assert resumed.next(4) == ahead == s.next(4)
    assert resumed.next(4) == s.next(4)


def test_the_reference_is_scored_where_it_shortens_the_step():
    tok = build_char_tokenizer()
    model = build_tiny_model(seed=0, tokenizer=tok)
    engine = BackgroundEngine(model, tok, reference=copy.deepcopy(model), score=lambda m, g: _logp(m, g, 1.0))
    try:
        assert engine.score_in_worker
        engine._place_reference(trainer_s=0.070, sample_s=0.040, reference_s=0.020)  # 16 x 8: the update is slower
        assert engine.score_in_worker
        engine._place_reference(trainer_s=0.012, sample_s=0.017, reference_s=0.004)  # 2 x 8: sampling is slower
        assert not engine.score_in_worker
        engine._place_reference(trainer_s=0.016, sample_s=0.017, reference_s=0.0)  # the trainer scored it: stays
        assert not engine.score_in_worker
        engine._place_reference(trainer_s=0.090, sample_s=0.040, reference_s=0.0)  # the update grew: back
        assert engine.score_in_worker
    finally:
        engine.close()
