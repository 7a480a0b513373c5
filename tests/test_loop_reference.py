"""The trainer's RL step against a plain re-implementation of the paper's update, for every algorithm.

The trainer side is rpg.train.learner.Learner as rpg.train.loop runs it: old and reference log-probs micro-batch by
micro-batch, advantages, epochs x mini-batches x micro-batches (rows trimmed per micro-batch, losses
normalised by mini-batch totals), gradient clipping, AdamW, the warm-up schedule stepped per RL step and
the reference schedule.  The plain side is written here from rpg.core's loss and advantage functions
only: one forward over each whole mini-batch, a hand-set learning rate, the anchor refreshed by hand.
Both run in float64 from the same weights on the same two fixed rollout batches (dynamic sampling
happens before a batch exists: tests/test_rollouts.py), so the parameters must agree to rounding.
"""

from __future__ import annotations

import copy
import glob
import itertools
from pathlib import Path

import pytest
import torch

from rpg.backend.local import LocalBackend, frozen_copy
from rpg.train.build import build_optimizer
from rpg.config import loss_params
from rpg.core.advantages import ADVANTAGES
from rpg.core.losses import POLICY_LOSSES
from rpg.train.learner import Learner
from rpg.models.tiny import build_char_tokenizer, build_tiny_model
from rpg.train.reference import Reference, needs_model
from rpg.rollout.base import Generations
from rpg.train.rollouts import ScoredBatch

REPO = Path(__file__).resolve().parents[1]
ALGOS = sorted(Path(p).stem for p in glob.glob(str(REPO / "conf" / "algo" / "*.yaml")))
RPG = [a for a in ALGOS if a.startswith("rpg_")]
#: several optimizer steps per RL step (16 responses / 4 x 2 epochs = 8), micro-batches of 2, warm-up
LOOP = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "ppo.mini_batch_size=4",
        "ppo.micro_batch_size=2", "ppo.epochs=2", "optim.lr=3e-3", "optim.warmup_steps=2",
        "optim.weight_decay=0.1", "optim.grad_clip=0.5", "rollout.temperature=0.9"]
TOL = dict(rtol=0.0, atol=1e-11)


def fixed_batch(seed: int, vocab: int) -> ScoredBatch:
    """4 prompts x 4 responses of random tokens: left-padded prompts, ragged responses, one constant group."""
    g = torch.Generator().manual_seed(seed)
    n, p, r = 16, 5, 7
    prompt_len = torch.randint(2, p + 1, (4,), generator=g).repeat_interleave(4)
    prompt_mask = (torch.arange(p)[None] >= p - prompt_len[:, None]).long()
    response_len = torch.randint(1, r + 1, (n,), generator=g)
    response_mask = (torch.arange(r)[None] < response_len[:, None]).long()
    ids = lambda mask: torch.randint(3, vocab, mask.shape, generator=g) * mask
    scores = torch.randint(0, 2, (n,), generator=g).double()
    scores[4:8] = 1.0  # a constant group: zero advantage under every group estimator
    gens = Generations(ids(prompt_mask), prompt_mask, ids(response_mask), response_mask, [""] * n,
                       torch.zeros(n, dtype=torch.bool))
    return ScoredBatch(gens, scores, scores.clone(), torch.arange(4).repeat_interleave(4), {})


def plain_logp(model, gens, temperature: float, rows=slice(None)) -> torch.Tensor:
    """log pi(y_t | x, y_<t) over the response positions, one forward, positions counted past left padding."""
    ids, attn, p = gens.input_ids[rows], gens.attention_mask[rows], gens.prompt_ids.shape[1]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits[:, p - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, ids[:, p:, None]).squeeze(-1)


def plain_update(cfg, model, batches) -> list[float]:
    """The paper's update, written out: per RL step, score with pi_old and pi_ref, advantages, then epochs x
    mini-batches of AdamW steps at the warmed-up rate, then move the anchor as algo.ref_update says.
    Returns the KL from the updated policy to the anchor after each RL step."""
    a, o, u, temp = cfg.algo, cfg.optim, cfg.ppo, cfg.rollout.temperature
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    loss_fn, params, advantage_fn = POLICY_LOSSES[a.loss], loss_params(a), ADVANTAGES[a.advantage]
    anchor = copy.deepcopy(model)  # the initial policy
    order = torch.Generator().manual_seed(cfg.seed)
    steps = last_refresh = 0
    kl_after = []
    for t, batch in enumerate(batches):
        for group in optimizer.param_groups:  # linear warm-up over optim.warmup_steps RL steps
            group["lr"] = o.lr * min(1.0, (t + 1) / (o.warmup_steps + 1))
        gens, mask = batch.gens, batch.gens.response_mask.double()
        with torch.no_grad():
            old = plain_logp(model, gens, temp)
            ref = old if a.ref_update == "every_step" else plain_logp(anchor, gens, temp)
        adv = advantage_fn(batch.scores, batch.group_ids, mask)
        for _ in range(u.epochs):
            for mini in torch.randperm(len(adv), generator=order).split(u.mini_batch_size):
                out = loss_fn(plain_logp(model, gens, temp, mini), old[mini], ref[mini], adv[mini], mask[mini], params)
                optimizer.zero_grad()
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                optimizer.step()
                steps += 1
        with torch.no_grad():  # KL(pi_new || pi_ref) = E_old[(pi_new / pi_old) k3(pi_ref / pi_new)]
            new = plain_logp(model, gens, temp)
            ratio = ref - new
            kl_after.append(((new - old).exp() * (ratio.exp() - 1 - ratio) * mask).sum().item() / mask.sum().item())
        if a.ref_update == "every_k" and steps - last_refresh >= a.ref_update_k:
            anchor.load_state_dict(model.state_dict())
            last_refresh = steps
    return kl_after


def trainer_update(cfg, model, batches) -> list[dict]:
    optimizer, scheduler = build_optimizer(cfg, model)
    a = cfg.algo
    anchor = frozen_copy(model) if needs_model(a.ref_update) else None
    reference = Reference(anchor, a.ref_update, a.ref_update_k, a.ref_kl_threshold, a.ref_kl_ema)
    learner = Learner(model, optimizer, scheduler, reference, cfg, LocalBackend(), torch.Generator().manual_seed(cfg.seed))
    history = [learner.step(batch, kl_after_update=True) for batch in batches]
    assert all(m["train/advantage_abs_mean"] > 0 for m in history) and learner.optimizer_steps == 16
    return history


@pytest.fixture(scope="module")
def start():
    tok = build_char_tokenizer()
    model = build_tiny_model(seed=0, tokenizer=tok).double().train()
    return model, [fixed_batch(s, len(tok)) for s in (1, 2)]


def trained(make_cfg, start, *overrides):
    model, batches = start
    cfg = make_cfg(*LOOP, *overrides)
    mine, plain = copy.deepcopy(model), copy.deepcopy(model)
    history = trainer_update(cfg, mine, batches)
    kl_after = plain_update(cfg, plain, batches)
    assert [m["kl/k3_iw_after_update"] for m in history] == pytest.approx(kl_after, rel=1e-9, abs=1e-15)
    return cfg, mine, plain


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("overrides", [[f"algo={a}"] for a in ALGOS] + [
    ["algo=rpg_rf_urkl", "algo.ref_update=every_k", "algo.ref_update_k=8"],  # refreshed after RL step 1
    ["algo=rpg_urkl", "algo.level=sequence", "algo.agg=seq-mean"],
])
def test_trainer_step_is_the_papers_update(make_cfg, start, overrides):
    cfg, mine, plain = trained(make_cfg, start, *overrides)
    initial = flat(start[0])
    assert (flat(plain) - initial).abs().max() > 1e-3, "the update barely moved: the comparison says little"
    torch.testing.assert_close(flat(mine), flat(plain), **TOL)


def test_distinct_objectives_end_distinct_and_equal_ones_equal(make_cfg, start):
    # Defaults (clipped, beta = data.kl_coef, off-policy steps): every algorithm's parameters differ.
    final = {a: flat(trained(make_cfg, start, f"algo={a}")[1]) for a in ALGOS}
    for x, y in itertools.combinations(ALGOS, 2):
        assert (final[x] - final[y]).abs().max() > 1e-6, f"{x} and {y} ended with the same parameters"
    # Unclipped, each REINFORCE-style variant has the gradient of its fully differentiable twin (Prop. 4.1).
    off = ["algo.clip_low=null", "algo.clip_high=null", "algo.dual_clip_c=null"]
    for kl in ("fkl", "rkl", "ufkl", "urkl"):
        fd = flat(trained(make_cfg, start, f"algo=rpg_{kl}", *off)[1])
        rf = flat(trained(make_cfg, start, f"algo=rpg_rf_{kl}", *off)[1])
        torch.testing.assert_close(rf, fd, rtol=0.0, atol=1e-9)
    # With beta = 0 the divergence is the only difference between the 8 RPG losses, clip included: the
    # REINFORCE-style branch follows the sign of psi = A (-log pi), that of A wherever there is a gradient.
    zero = {a: flat(trained(make_cfg, start, f"algo={a}", "algo.kl_coef=0")[1]) for a in RPG}
    for a in RPG[1:]:
        torch.testing.assert_close(zero[a], zero[RPG[0]], rtol=0.0, atol=1e-9)


#: one optimizer step per RL step (16 responses, one mini-batch, one epoch) in micro-batches of 4
ON_POLICY = [o for o in LOOP if not o.startswith("ppo.")] + [
    "ppo.mini_batch_size=16", "ppo.micro_batch_size=4", "ppo.epochs=1"]


@pytest.mark.parametrize("algo", ALGOS)
def test_an_on_policy_step_takes_pi_old_from_its_own_forward(make_cfg, start, algo):
    """With one optimizer step the update's forward is at the sampling weights: no separate pi_old forward,
    and still exactly the paper's update (whose pi_old is scored beforehand) with the same entropy."""
    model, batches = start
    cfg = make_cfg(*ON_POLICY, f"algo={algo}")
    mine, plain = copy.deepcopy(model), copy.deepcopy(model)
    optimizer, scheduler = build_optimizer(cfg, mine)
    a = cfg.algo
    reference = Reference(frozen_copy(mine) if needs_model(a.ref_update) else None, a.ref_update, a.ref_update_k,
                          a.ref_kl_threshold, a.ref_kl_ema)
    learner = Learner(mine, optimizer, scheduler, reference, cfg, LocalBackend(), torch.Generator().manual_seed(cfg.seed))
    forwards = []
    mine.model.register_forward_hook(lambda *_: forwards.append(1))
    history = [learner.step(batch, kl_after_update=True) for batch in batches]
    assert len(forwards) == 2 * (4 + 4)  # per RL step: 4 update micro-batches + 4 for the KL after it
    assert learner.optimizer_steps == 2
    gens, temp = batches[0].gens, cfg.rollout.temperature
    with torch.no_grad():  # the entropy of pi_old on the first batch, written out
        positions = (gens.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = plain(input_ids=gens.input_ids, attention_mask=gens.attention_mask, position_ids=positions).logits
        logp = (logits[:, gens.prompt_ids.shape[1] - 1 : -1] / temp).log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        mask = gens.response_mask.double()
    assert history[0]["train/entropy"] == pytest.approx(((entropy * mask).sum() / mask.sum()).item(), rel=1e-9)
    kl_after = plain_update(cfg, plain, batches)
    assert [m["kl/k3_iw_after_update"] for m in history] == pytest.approx(kl_after, rel=1e-9, abs=1e-15)
    assert (flat(plain) - flat(model)).abs().max() > 1e-4
    torch.testing.assert_close(flat(mine), flat(plain), **TOL)
