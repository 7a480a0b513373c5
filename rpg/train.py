"""The RL loop, top to bottom: rollout -> reward -> old/ref log-probs -> advantages -> update -> reference -> log.

``run(cfg)`` is what ``python -m rpg.main`` calls for each run; it returns the final metrics.
"""

from __future__ import annotations

import copy
import json
import os
import logging
import time
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from rpg import checkpoint
from rpg.backend import make_backend
from rpg.backend.spawn import FINAL_METRICS, ranks_exist, spawn_ranks
from rpg.build import build_data, build_optimizer, build_policy
from rpg.config import ConfigError, loss_params, validate
from rpg.core.advantages import ADVANTAGES
from rpg.core.losses import POLICY_LOSSES
from rpg.evaluation import evaluate_policy
from rpg.logprobs import response_logprobs
from rpg.reference import Reference, needs_model
from rpg.rewards import get_reward_fn
from rpg.rollout import make_engine
from rpg.rollout.mismatch import mismatch_metrics, tis_weights
from rpg.rollout.sharded import ShardedEngine
from rpg.rollouts import PromptSampler, collect
from rpg.run_meta import Terminated, config_hash, git_state, raise_on_sigterm, resume_key, run_name
from rpg.tracking import MLflowTracker, NullTracker
from rpg.tracking_base import redact
from rpg.update import RolloutBatch, policy_update

log = logging.getLogger("rpg")


@torch.no_grad()
def score_logprobs(model, gens, cfg, backend, with_entropy=False):
    """Log-probs (and entropy) of the sampled responses under ``model``: each rank scores its share of the
    rows, micro-batch by micro-batch, and every rank gets all rows back."""
    was_training = model.training
    model.eval()
    logps, ents = [], []
    ids, attn, p = gens.input_ids, gens.attention_mask, gens.prompt_ids.shape[1]
    rows, mb = backend.local_rows(torch.arange(ids.shape[0])), cfg.ppo.micro_batch_size
    for s in range(0, len(rows), mb):
        r = rows[s:s + mb]
        lp, ent = response_logprobs(model, ids[r], attn[r], p, cfg.rollout.temperature, cfg.engine.logprob_chunk,
                                    with_entropy)
        logps.append(lp)
        ents.append(ent)
    model.train(was_training)
    logp = backend.gather_rows(torch.cat(logps))
    return logp, (backend.gather_rows(torch.cat(ents)) if with_entropy else None)


def tracking_uri(cfg) -> str | None:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else mlflow.db in the directory the command was run from
    (not Hydra's per-run directory, so all runs of a sweep share one store)."""
    if cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg.tracking.uri
    from hydra.core.hydra_config import HydraConfig

    launch_dir = Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()
    return f"sqlite:///{launch_dir / 'mlflow.db'}"


def loggable_config(cfg) -> dict:
    """The resolved config as the run's params and config.yaml record it: no password in any URI."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["tracking"]["uri"] = redact(resolved["tracking"]["uri"])
    return resolved


def run_summary(name: str, first: dict, last: dict, steps: int, out_dir: Path, run_id: str | None,
                store: str | None) -> str:
    """What a finished run found and where it is: held-out accuracy at the first and last evaluation
    (greedy where measured, else every mean@k), the MLflow run and the output folder."""
    evals = [k for k in sorted(last) if k.startswith("eval/") and k.endswith("/greedy_acc")]
    evals = evals or [k for k in sorted(last) if k.startswith("eval/") and "/mean_at_" in k]
    lines = [f"{name}: finished {steps} steps"]
    for k in evals:
        lines.append(f"  {k}: " + (f"{first[k]:.3f} (step 0) -> " if k in first else "") + f"{last[k]:.3f}")
    if run_id and store:
        browse = f"; browse with: mlflow ui --backend-store-uri {store}" if store.startswith("sqlite") else ""
        lines.append(f"  MLflow run {run_id} in {store}{browse}")
    lines.append(f"  outputs and checkpoints: {out_dir}")
    return "\n".join(lines)


def engine_options(cfg) -> dict:
    e = cfg.engine
    if e.rollout != "vllm":
        return {}
    options = {"dtype": e.dtype, "gpu_memory_utilization": e.vllm_gpu_memory_utilization,
               "kv_cache_memory_bytes": e.vllm_kv_cache_bytes, "seed": cfg.seed}
    if e.backend == "fsdp":  # the engine gets its own process, outside the trainer's process group
        options["in_process"] = False
    if e.device.startswith("cuda"):
        options["enable_sleep_mode"] = e.vllm_sleep
    return options


def run(cfg) -> dict[str, float]:
    validate(cfg)
    if cfg.engine.backend == "fsdp" and not ranks_exist():  # one command on one node: start the ranks
        out_dir = Path(cfg.out_dir or Path.cwd()).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        return spawn_ranks(cfg, out_dir, tracking_uri(cfg))
    backend = make_backend(cfg)
    out_dir = Path(backend.broadcast(str(Path(cfg.out_dir or Path.cwd()).resolve())))  # rank 0's directory
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    if cfg.engine.torch_threads:
        torch.set_num_threads(cfg.engine.torch_threads)

    model, tokenizer, info = backend.main_first(lambda: build_policy(cfg))
    train_set, eval_sets = backend.main_first(lambda: build_data(cfg))
    # every rank samples its share of the prompts with its own engine; HF generate needs a full copy under FSDP
    sampler_model = model if backend.world_size == 1 or cfg.engine.rollout == "vllm" else copy.deepcopy(model)
    engine = make_engine(cfg.engine.rollout, sampler_model, tokenizer, **engine_options(cfg))
    if backend.world_size > 1:
        engine = ShardedEngine(engine, backend)
    ref_model = backend.reference_model(model) if needs_model(cfg.algo.ref_update) else None
    module = backend.wrap(model)  # what the update trains and scores with
    optimizer, scheduler = build_optimizer(cfg, module)
    reference = Reference(ref_model, cfg.algo.ref_update, cfg.algo.ref_update_k, cfg.algo.ref_kl_threshold, cfg.algo.ref_kl_ema)
    sampler = PromptSampler(len(train_set), cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    loss_fn, advantage_fn = POLICY_LOSSES[cfg.algo.loss], ADVANTAGES[cfg.algo.advantage]
    params, reward_fn = loss_params(cfg.algo), get_reward_fn(cfg.data.reward)

    def sync_engine():
        engine.sync_weights(backend.full_weights(module))

    start_step, run_id, opt_steps = 0, None, 0
    state = backend.load(ckpt_dir, module, optimizer, ref_model) if cfg.resume == "auto" else None
    if state is not None:
        if state.get("resume_key", resume_key(cfg)) != resume_key(cfg):
            raise ConfigError(f"{ckpt_dir} holds checkpoints of a different configuration (only steps, eval_every "
                              "and save_every may change on resume): set out_dir to a new directory, or delete "
                              f"{ckpt_dir} to start this configuration over there")
        scheduler.load_state_dict(state["scheduler"])
        reference.load_state_dict(state["reference"])
        sampler.load_state_dict(state["sampler"])
        shuffle.set_state(state["shuffle"])
        checkpoint.set_rng_state(state["rng"])
        start_step, run_id, opt_steps = state["step"], state["run_id"], state["optimizer_steps"]
        sync_engine()
        log.info("resuming from %s at step %d", ckpt_dir, start_step)
    elif cfg.resume == "auto" and (out_dir / "run_id.txt").is_file():
        run_id = (out_dir / "run_id.txt").read_text().strip()  # crashed before its first checkpoint

    tracker = MLflowTracker(tracking_uri(cfg), output_dir=out_dir) if cfg.tracking.enabled and backend.is_main else NullTracker()
    if backend.is_main:
        sha, dirty = git_state()
        tags = {"algo": cfg.algo.name, "seed": cfg.seed, "model": cfg.model.name, "data": cfg.data.name,
                "sweep": cfg.sweep, "config_hash": config_hash(cfg), "git_sha": sha, "git_dirty": dirty,
                "hydra_sweep_dir": str(out_dir.parent), "run_name": run_name(cfg), "out_dir": str(out_dir),
                "world_size": backend.world_size}
        resolved = loggable_config(cfg)
        run_id = tracker.start(cfg.tracking.experiment, run_name(cfg), resolved, tags, run_id=run_id)
        (out_dir / "run_id.txt").write_text(run_id or "")
        tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        tracker.log_text(json.dumps(info, indent=2), "policy_info.json")

    def evaluate(step):  # on every rank (the engine is sharded); rank 0 logs
        with torch.random.fork_rng():  # evaluation never changes the training random stream
            torch.manual_seed(cfg.seed * 7919 + step)
            metrics, details = evaluate_policy(engine, tokenizer, eval_sets, cfg, seed=cfg.seed)
        tracker.log_metrics(metrics, step)
        tracker.log_text("\n".join(json.dumps(d) for d in details), f"eval/step_{step:06d}.jsonl")
        return metrics

    final: dict[str, float] = {}
    first_eval: dict[str, float] = {}
    raise_on_sigterm()
    try:
        if start_step == 0 and eval_sets:
            first_eval = evaluate(0)
            final.update(first_eval)
        bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=run_name(cfg),
                   dynamic_ncols=True, disable=not backend.is_main)
        for step in bar:
            t0 = time.perf_counter()
            batch = collect(engine, tokenizer, train_set, sampler, cfg, reward_fn)  # the same batch on every rank
            engine.sleep()  # vLLM on CUDA with engine.vllm_sleep: free its memory until the next sync
            t_rollout = time.perf_counter() - t0
            gens = batch.gens
            mask = gens.response_mask.float()
            old_logp, entropy = score_logprobs(module, gens, cfg, backend, with_entropy=True)
            ref_logp = reference.logprobs(lambda m: score_logprobs(m, gens, cfg, backend)[0], old_logp)
            advantages = advantage_fn(batch.scores, batch.group_ids, mask)
            tis = None
            if cfg.rollout.tis_cap and gens.sampler_logp is not None:
                tis = tis_weights(old_logp, gens.sampler_logp, mask, cfg.rollout.tis_cap)
            rb = RolloutBatch(gens.input_ids, gens.attention_mask, gens.response_mask, old_logp, ref_logp,
                              advantages, gens.prompt_ids.shape[1], tis)
            t1 = time.perf_counter()
            metrics = policy_update(module, optimizer, rb, loss_fn, params, epochs=cfg.ppo.epochs,
                                    mini_batch_size=cfg.ppo.mini_batch_size, micro_batch_size=cfg.ppo.micro_batch_size,
                                    grad_clip=cfg.optim.grad_clip, temperature=cfg.rollout.temperature,
                                    chunk_tokens=cfg.engine.logprob_chunk, generator=shuffle, backend=backend)
            scheduler.step()  # once per RL step: optim.warmup_steps counts RL steps, as the paper's
            opt_steps += int(metrics.pop("optim/steps"))
            refreshed = reference.after_update(module, opt_steps, metrics.get("kl/k3", 0.0))
            t_sync = time.perf_counter()
            sync_engine()
            t_end = time.perf_counter()
            lengths = mask.sum(-1)
            metrics.update(batch.stats)
            if gens.sampler_logp is not None:  # vLLM: how far the sampler is from the trainer
                metrics.update(mismatch_metrics(gens.sampler_logp, old_logp, mask))
            if tis is not None:
                metrics.update({"rollout/tis_weight_mean": (tis * mask).sum().item() / mask.sum().item(),
                                "rollout/tis_frac_capped": ((tis >= cfg.rollout.tis_cap) * mask).sum().item() / mask.sum().item()})
            metrics.update({
                "train/score_mean": batch.scores.mean().item(), "train/acc": batch.acc.mean().item(),
                "train/response_length_mean": lengths.mean().item(), "train/response_length_max": lengths.max().item(),
                "train/frac_truncated": gens.truncated.float().mean().item(),
                "train/entropy": (entropy * mask).sum().item() / mask.sum().item(),
                "train/advantage_abs_mean": advantages.abs().mean().item(),
                "ref/refreshed": float(refreshed), "ref/kl_avg": reference.kl_avg,
                "perf/step_time_s": t_end - t0, "perf/rollout_s": t_rollout, "perf/update_s": t_sync - t1,
                "perf/sync_s": t_end - t_sync,
                "perf/tokens_per_s": float(gens.attention_mask.sum()) / (t_end - t0),
            })
            done = step + 1
            tracker.log_metrics(metrics, done)
            final.update(metrics)
            if cfg.eval_every and eval_sets and (done % cfg.eval_every == 0 or done == cfg.steps):
                final.update(evaluate(done))  # logs its own metrics
            bar.set_postfix(acc=f"{metrics['train/acc']:.2f}", kl=f"{metrics.get('kl/k3', 0):.1e}")
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                backend.save(ckpt_dir, done, {
                    "scheduler": scheduler.state_dict(), "reference": reference.state_dict(),
                    "sampler": sampler.state_dict(), "shuffle": shuffle.get_state(), "rng": checkpoint.rng_state(),
                    "step": done, "run_id": run_id, "optimizer_steps": opt_steps, "resume_key": resume_key(cfg)},
                    module, optimizer, ref_model)
    except (KeyboardInterrupt, Terminated, SystemExit):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.log_text(traceback.format_exc(), "traceback.txt")
        tracker.end("FAILED")
        raise
    finally:
        engine.close()
        backend.close()
    tracker.end("FINISHED")
    if backend.is_main:
        (out_dir / FINAL_METRICS).write_text(json.dumps(final, indent=1))
        log.info("%s", run_summary(run_name(cfg), first_eval, final, cfg.steps, out_dir, run_id,
                                   getattr(tracker, "display_uri", None)))
    return final
