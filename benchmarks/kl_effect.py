"""How much the KL term changes one RL step of the default run, per KL coefficient beta.

From the warm start, one batch is sampled once; then for each beta the same RL step (every optimizer step
of it, the same mini-batch order) is taken from the same parameters, and the parameter change Delta_beta
is compared with the change at beta = 0:  ||Delta_beta - Delta_0|| / ||Delta_0||.  Also printed: the mean
token k3 to the reference and the share of tokens the clip froze, as the loss reports them.

    python benchmarks/kl_effect.py                                  # the default run's first RL step
    python benchmarks/kl_effect.py --betas 0,1e-4,0.1 -- algo=grpo ppo.mini_batch_size=128
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rpg.backend.local import LocalBackend  # noqa: E402
from rpg.train.build import build_data, build_optimizer, build_policy  # noqa: E402
from rpg.config import register_configs  # noqa: E402
from rpg.train.learner import Learner  # noqa: E402
from rpg.main import CONF_DIR  # noqa: E402
from rpg.train.reference import Reference, needs_model  # noqa: E402
from rpg.rewards import get_reward_fn  # noqa: E402
from rpg.rollout import make_engine  # noqa: E402
from rpg.train.rollouts import PromptSampler, collect  # noqa: E402


def one_step(cfg, model, batch) -> tuple[torch.Tensor, dict]:
    """The flattened parameter change of one RL step from ``model``'s weights, and the step's metrics."""
    model = copy.deepcopy(model)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer, scheduler = build_optimizer(cfg, model)
    a = cfg.algo
    ref = copy.deepcopy(model).eval() if needs_model(a.ref_update) else None
    reference = Reference(ref, a.ref_update, a.ref_update_k, a.ref_kl_threshold, a.ref_kl_ema)
    learner = Learner(model, optimizer, scheduler, reference, cfg, LocalBackend(), torch.Generator().manual_seed(cfg.seed))
    metrics = learner.step(batch)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before, metrics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--betas", default="0,1e-4,1e-3,1e-2,0.1,1.0", help="comma-separated KL coefficients")
    p.add_argument("overrides", nargs="*", help="rpg.main overrides (after --)")
    args = p.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["tracking.enabled=false", *args.overrides])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.engine.torch_threads or torch.get_num_threads())
    model, tokenizer, _ = build_policy(cfg)
    train_set, _ = build_data(cfg)
    engine = make_engine(cfg.engine.rollout, model, tokenizer)
    batch = collect(engine, tokenizer, train_set, PromptSampler(len(train_set), cfg.seed), cfg,
                    get_reward_fn(cfg.data.reward))
    u, b = cfg.ppo, cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    print(f"algo={cfg.algo.name}: {u.epochs * b // u.mini_batch_size} optimizer steps per RL step "
          f"({b} responses, mini-batches of {u.mini_batch_size}), ref_update={cfg.algo.ref_update}")
    base = None
    print(f"| beta | relative change of the update vs beta = 0 | kl/k3 | clip/frac_zero_grad |\n|---|---|---|---|")
    for beta in [float(x) for x in args.betas.split(",")]:
        cfg.algo.kl_coef = beta
        delta, metrics = one_step(cfg, model, batch)
        base = delta if base is None and beta == 0 else base
        change = "(reference)" if beta == 0 else ("n/a: put 0 first" if base is None else
                                                  f"{((delta - base).norm() / base.norm()).item():.2e}")
        print(f"| {beta:g} | {change} | {metrics.get('kl/k3', float('nan')):.2e} | "
              f"{metrics.get('clip/frac_zero_grad', float('nan')):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
