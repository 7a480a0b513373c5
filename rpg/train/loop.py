"""The RL loop, top to bottom: rollout -> reward -> old/ref log-probs -> advantages -> update -> reference -> log.

``run(cfg)`` is what ``python -m rpg.main`` calls for each run; it returns the final metrics.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from rpg.backend import make_backend
from rpg.config import ConfigError, validate
from rpg.config.mechanisms import inert_mechanisms
from rpg.rewards import get_reward_fn
from rpg.tracking.base import NullTracker, redact, resolve_tracking_uri
from rpg.tracking.identity import (FINAL_METRICS, LOCK_FILE, Terminated, config_hash, git_state, raise_on_sigterm,
                                   resume_key, run_name)
from rpg.train.build import build_data, build_engine, build_optimizer, build_policy, build_train_engine, check_toy_split
from rpg.train.evaluation import evaluate_policy, headline
from rpg.train.learner import Learner
from rpg.train.reference import Reference, needs_model
from rpg.train.rollouts import PromptSampler, collect, submit_next
from rpg.train.state import Progress, checkpoint_state, restore

log = logging.getLogger("rpg")


def tracking_uri(cfg) -> str:
    """The store (rpg.tracking.base.resolve_tracking_uri), defaulting to mlflow.db in the directory the command
    was run from (not Hydra's per-run directory, so all runs of a sweep share one store)."""
    from hydra.core.hydra_config import HydraConfig

    launch_dir = Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()
    return resolve_tracking_uri(cfg.tracking.uri, launch_dir)


def loggable_config(cfg) -> dict:
    """The resolved config as the run's params and config.yaml record it: no password in any URI."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["tracking"]["uri"] = redact(resolved["tracking"]["uri"])
    return resolved


def writable_dir(path: Path) -> Path:
    """``path``, created, once a file could be written in it: refused before any run or checkpoint exists."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"out_dir={path} cannot be written ({exc.strerror or exc}): set out_dir to a writable "
                          "folder") from None
    return path


def run_summary(name: str, first: dict, last: dict, steps: int, out_dir: Path, run_id: str | None,
                store: str | None, finished_before: bool = False, ui_link: str | None = None,
                wall_s: float | None = None) -> str:
    """What a finished run found and where it is: per eval set, greedy accuracy, mean@k and pass@k at the
    first and last evaluation; steps and wall time; the MLflow run, how to open it, and the output folder.
    ``finished_before``: the command found its run already complete (it says so, and how to start afresh)."""
    took = f" in {wall_s:.1f} s" if wall_s is not None and not finished_before else ""
    lines = [f"{name}: finished {steps} steps{took}" + (" (already, in an earlier attempt: this command resumes "
                                                        "its run; resume=never starts a fresh one)" if finished_before else "")]
    for eval_set, keys in headline(last).items():
        lines.append(f"  held-out {eval_set}: " + ", ".join(
            f"{stat} " + (f"{first[k]:.3f} (step 0) -> " if k in first else "") + f"{last[k]:.3f}"
            for stat, k in keys.items()))
    if run_id and store:
        browse = f"; browse with: mlflow ui --backend-store-uri {store}" if store.startswith("sqlite") else ""
        lines.append(f"  MLflow run {run_id} in {store}{browse}")
        if ui_link:
            lines.append(f"  its experiment's runs in the MLflow UI (model-training view): {ui_link}")
    lines.append(f"  outputs and checkpoints: {out_dir}")
    return "\n".join(lines)


@contextmanager
def holding(out_dir: Path, hold: bool = True):
    """The run folder is this process's while it trains: a second copy of the same command (the same
    folder, checkpoints and MLflow run) is refused before any work. The lock goes with the process, even
    on SIGKILL."""
    if not hold:
        yield
        return
    with open(out_dir / LOCK_FILE, "a+") as f:
        try:
            _lock_within(f, seconds=3.0)  # a sweep checking whether the run is alive holds it for a moment
        except BlockingIOError:
            f.seek(0)
            raise ConfigError(f"out_dir={out_dir} is in use by another run of this configuration (pid "
                              f"{f.read().strip() or '?'}): wait for it to end, or start a fresh run with "
                              "resume=never (or another out_dir)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock_within(f, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run(cfg) -> dict[str, float]:
    """One run of ``cfg`` on this rank: checked, then trained or resumed in its folder (held alone for the
    duration); returns the final metrics."""
    t_start = time.perf_counter()
    validate(cfg)
    check_toy_split(cfg)
    backend = make_backend(cfg)
    for note in inert_mechanisms(cfg) if backend.is_main else []:
        log.warning("%s", note)
    out_dir = writable_dir(Path(backend.broadcast(str(Path(cfg.out_dir or Path.cwd()).resolve()))))  # rank 0's
    with holding(out_dir, backend.is_main):
        return train(cfg, backend, out_dir, t_start)


def train(cfg, backend, out_dir: Path, t_start: float) -> dict[str, float]:
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    if cfg.engine.torch_threads:
        torch.set_num_threads(cfg.engine.torch_threads)

    model, tokenizer, info = backend.main_first(lambda: build_policy(cfg))
    train_set, eval_sets = backend.main_first(lambda: build_data(cfg))
    engine = build_engine(cfg, model, tokenizer, backend)
    ref_model = backend.reference_model(model) if needs_model(cfg.algo.ref_update) else None
    train_engine = build_train_engine(cfg, model, tokenizer, engine, ref_model, backend)  # overlap: a 2nd process
    module = backend.wrap(model)  # what the update trains and scores with
    optimizer, scheduler = build_optimizer(cfg, module)
    reference = Reference(ref_model, cfg.algo.ref_update, cfg.algo.ref_update_k, cfg.algo.ref_kl_threshold, cfg.algo.ref_kl_ema)
    learner = Learner(module, optimizer, scheduler, reference, cfg, backend, torch.Generator().manual_seed(cfg.seed))
    sampler = PromptSampler(len(train_set), cfg.seed)
    reward_fn = get_reward_fn(cfg.data.reward)

    def sync_engine():
        weights = backend.full_weights(module)
        engine.sync_weights(weights)
        if train_engine is not engine:
            train_engine.sync_weights(weights)

    progress = Progress()
    state = backend.load(ckpt_dir, module, optimizer, ref_model) if cfg.resume == "auto" else None
    if state is not None:
        if state.get("resume_key", resume_key(cfg)) != resume_key(cfg):
            raise ConfigError(f"{ckpt_dir} holds checkpoints of a different configuration (only steps, eval_every "
                              "and save_every may change on resume): set out_dir to a new directory, or delete "
                              f"{ckpt_dir} to start this configuration over there")
        progress = restore(state, learner, sampler)
        sync_engine()
        log.info("resuming from %s at step %d", ckpt_dir, progress.step)
    elif cfg.resume == "auto" and (out_dir / "run_id.txt").is_file():
        progress.run_id = (out_dir / "run_id.txt").read_text().strip()  # crashed before its first checkpoint
    start_step, run_id, first_eval, final = progress.step, progress.run_id, progress.first_eval, progress.final
    # a finished run's MLflow run stays as it ended, unless metrics it saved while the store was away remain
    finished_before = (start_step >= cfg.steps and run_id is not None
                       and not list(out_dir.glob(f"unsent_metrics_{run_id}.jsonl")))

    starts = backend.is_main and not finished_before
    if cfg.tracking.enabled and starts:
        from rpg.tracking.tracker import MLflowTracker  # mlflow is imported only by runs that log to it

        tracker = MLflowTracker(tracking_uri(cfg), output_dir=out_dir)
    else:
        tracker = NullTracker()
    logged = {"train": -1, "eval": -1}  # steps already in the store (a resumed run)
    if starts:
        from rpg.tracking.ui import run_tags  # description and source, as the MLflow UI shows them

        sha, dirty = git_state()
        tags = {"algo": cfg.algo.name, "seed": cfg.seed, "model": cfg.model.name, "data": cfg.data.name,
                "sweep": cfg.sweep, "config_hash": config_hash(cfg), "git_sha": sha, "git_dirty": dirty,
                "hydra_sweep_dir": str(out_dir.parent), "run_name": run_name(cfg), "out_dir": str(out_dir),
                "world_size": backend.world_size, **run_tags(cfg, sha, dirty)}
        resolved = loggable_config(cfg)
        resumed = run_id is not None
        run_id = tracker.start(cfg.tracking.experiment, run_name(cfg), resolved, tags, run_id=run_id)
        if resumed:  # what an earlier attempt saved to disk goes first; the steps it logged are not re-logged
            tracker.upload_unsent_files()
            logged = {"train": tracker.logged_through("perf/"), "eval": tracker.logged_through("eval/")}
        (out_dir / "run_id.txt").write_text(run_id or "")
        tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        tracker.log_text(json.dumps(info, indent=2), "policy_info.json")

    def evaluate(step):  # on every rank (the engine is sharded); rank 0 logs
        with torch.random.fork_rng():  # evaluation never changes the training random stream
            torch.manual_seed(cfg.seed * 7919 + step)
            metrics, details = evaluate_policy(engine, tokenizer, eval_sets, cfg, seed=cfg.seed)
        if step > logged["eval"]:
            tracker.log_metrics(metrics, step)
            tracker.log_text("\n".join(json.dumps(d) for d in details), f"eval/step_{step:06d}.jsonl")
        return metrics

    raise_on_sigterm()
    try:
        if start_step == 0 and eval_sets:
            first_eval = evaluate(0)
            final.update(first_eval)
        bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=run_name(cfg),
                   dynamic_ncols=True, disable=not backend.is_main)
        for step in bar:
            t0 = time.perf_counter()
            batch = collect(train_engine, tokenizer, train_set, sampler, cfg, reward_fn)  # the same on every rank
            if cfg.rollout.overlap and step + 1 < cfg.steps:  # the next batch samples while this one trains
                submit_next(train_engine, tokenizer, train_set, sampler, cfg)
            engine.sleep()  # vLLM on CUDA with engine.vllm_sleep: free its memory until the next sync
            t_rollout = time.perf_counter() - t0
            t1 = time.perf_counter()
            evaluating = bool(cfg.eval_every and eval_sets and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps))
            metrics = learner.step(batch, kl_after_update=evaluating)  # perf/update_s: scoring + optimizer steps
            t_sync = time.perf_counter()
            sync_engine()
            t_end = time.perf_counter()
            gens, lengths = batch.gens, batch.gens.response_mask.sum(-1).float()
            metrics.update(batch.stats)
            metrics.update({
                "train/score_mean": batch.scores.mean().item(), "train/acc": batch.acc.mean().item(),
                "train/response_length_mean": lengths.mean().item(), "train/response_length_max": lengths.max().item(),
                "train/frac_truncated": gens.truncated.float().mean().item(),
                "perf/step_time_s": t_end - t0, "perf/rollout_s": t_rollout, "perf/update_s": t_sync - t1,
                "perf/sync_s": t_end - t_sync,
                "perf/tokens_per_s": float(gens.attention_mask.sum()) / (t_end - t0),
            })
            done = step + 1
            if done > logged["train"]:
                tracker.log_metrics(metrics, done)
            final.update(metrics)
            if evaluating:
                final.update(evaluate(done))  # logs its own metrics
            bar.set_postfix(batch_acc=f"{metrics['train/acc']:.2f}", kl=f"{metrics.get('kl/k3', 0):.1e}")  # training batch
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                tracker.persist()  # every metric so far is in the store or on disk before the checkpoint is
                backend.save(ckpt_dir, done, checkpoint_state(Progress(done, run_id, first_eval, final), learner,
                                                              sampler, cfg), module, optimizer, ref_model)
    except (KeyboardInterrupt, Terminated, SystemExit):
        tracker.end("KILLED", timeout_s=5.0)  # well inside SLURM's 30 s between SIGTERM and SIGKILL
        raise
    except BaseException:
        tracker.log_text(traceback.format_exc(), "traceback.txt")
        tracker.end("FAILED")
        raise
    finally:
        if train_engine is not engine:
            train_engine.close()
        engine.close()
        backend.close()
    tracker.end("FINISHED")
    if backend.is_main:
        (out_dir / FINAL_METRICS).write_text(json.dumps(final, indent=1))
        store = redact(tracking_uri(cfg)) if cfg.tracking.enabled else None
        log.info("%s", run_summary(run_name(cfg), first_eval, final, cfg.steps, out_dir, run_id, store,
                                   finished_before, getattr(tracker, "ui_link", None), time.perf_counter() - t_start))
    return final
