"""Submitting runs with submitit: the only project module that imports it.

Resources come from the same files as Hydra's launchers: the structured defaults of
hydra-submitit-launcher, then ``conf/hydra/launcher/<kind>.yaml``, then the cluster profile
``conf/cluster/<profile>.yaml``; interpolations such as ``${engine.num_gpus}`` resolve against the run.

A run is a :class:`TrainJob` called with its resolved config. It is checkpointable: on SLURM's USR2
(time limit or ``scancel --signal USR2``) submitit resubmits the same call and requeues the job, and
the trainer resumes from ``<out_dir>/checkpoints`` into the same MLflow run (``resume=auto``).

``python -m rpg.launch server --profile NAME --address-file FILE`` runs an MLflow tracking server as a
SLURM job and prints its address once it is up (see slurm/README.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf
from submitit.helpers import Checkpointable

import rpg.config  # noqa: F401  (registers the resolvers the launcher configs use)
from rpg.tracking.identity import LOCK_FILE, PROJECT_ROOT

LAUNCHER_DIR = PROJECT_ROOT / "conf" / "hydra" / "launcher"
PROFILE_DIR = PROJECT_ROOT / "conf" / "cluster"
KINDS = ("slurm", "local")
JOBS_FILE = "jobs.jsonl"  # in each run's out_dir: one line per submission and per job start
FAILURE_FILE = "traceback.txt"  # in a failed run's out_dir: the traceback of its last failure
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")  # "pkg.SomeError: msg" in a trace

log = logging.getLogger("rpg.launch.submit")


#: The engine section of a job that is one CPU process (a tracking server; checking a profile).
ONE_PROCESS_ENGINE = {"num_gpus": 0, "nodes": 1, "backend": "local", "ranks_per_node": None}


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=16)
def _launcher_settings(kind: str, profile: str | None) -> str:
    """The merged, unresolved launcher settings as JSON (cached: a sweep asks once per run)."""
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    if kind not in KINDS:
        raise ValueError(f"launcher {kind!r}: use one of {KINDS}")
    base = OmegaConf.load(LAUNCHER_DIR / f"{kind}.yaml")
    base.pop("defaults", None)
    layers = [base]
    if profile:
        path = PROFILE_DIR / f"{profile}.yaml"
        if not path.is_file():
            raise ValueError(f"cluster profile {profile!r} not found: use one of {profile_names()} "
                             f"(files in {PROFILE_DIR})")
        if kind != "slurm":
            raise ValueError(f"--profile {profile} is a SLURM profile; use it with --launcher slurm")
        layers.append(OmegaConf.load(path))
    # unknown keys fail here, as in Hydra
    node = OmegaConf.merge(OmegaConf.structured(SlurmQueueConf if kind == "slurm" else LocalQueueConf), *layers)
    return json.dumps(OmegaConf.to_container(node, resolve=False))


def launcher_params(kind: str, profile: str | None = None, run_cfg: Any = None, folder: str | None = None,
                    name: str = "rpg") -> dict[str, Any]:
    """Launcher settings for ``kind`` (slurm | local) with ``profile`` applied, resolved against ``run_cfg``
    (a config or a plain dict; interpolations such as ``${engine.num_gpus}`` refer to it)."""
    raw = json.loads(_launcher_settings(kind, profile))
    raw["submitit_folder"] = folder or str(Path.cwd() / ".submitit" / "%j")
    raw["name"] = name
    sections = {}
    if run_cfg is not None:  # only the top-level sections the launcher refers to, to stay cheap
        plain = OmegaConf.to_container(run_cfg, resolve=True) if OmegaConf.is_config(run_cfg) else run_cfg
        used = set(re.findall(r"\$\{([A-Za-z_]\w*)", json.dumps(raw)))
        sections = {k: plain[k] for k in used if k in plain}
    params = OmegaConf.to_container(OmegaConf.create({**sections, "launcher": raw}).launcher, resolve=True)
    params.pop("_target_", None)
    return params


def make_executor(kind: str, params: dict[str, Any]) -> submitit.Executor:
    """An AutoExecutor with ``params``, mapped as hydra-submitit-launcher maps them."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(params)
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
    common = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(cluster=kind, **init)
    executor.update_parameters(**{k if k in common else f"{kind}_{k}": v for k, v in params.items()})
    return executor


def export_torch_distributed_env() -> None:
    """In a SLURM task started by submitit: set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.

    MASTER_ADDR defaults to the first node's name; a value already in the environment (e.g. exported by
    the cluster profile's setup lines where node names do not resolve) wins, as does MASTER_PORT. Every
    GPU stays visible to every task; each task uses the one of its LOCAL_RANK.
    """
    addr, port = os.environ.pop("MASTER_ADDR", None), os.environ.pop("MASTER_PORT", None)
    if port:
        os.environ["MASTER_PORT"] = port  # submitit reads it back as the port to use
    env = submitit.helpers.TorchDistributedEnvironment()
    os.environ.pop("MASTER_PORT", None)
    env.master_addr = addr or env.master_addr
    env.export(set_cuda_visible_devices=False)


def append_record(out_dir: str | os.PathLike, **record: Any) -> None:
    path = Path(out_dir) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def last_failure(out_dir: str | os.PathLike) -> dict | None:
    """The "failed" record of the run's latest submission, if its job failed (None: it did not, or it
    has not ended)."""
    records = read_records(out_dir)
    submitted = max((i for i, r in enumerate(records) if r.get("event") == "submitted"), default=-1)
    return next((r for r in records[submitted + 1:] if r.get("event") == "failed"), None)


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    path = Path(out_dir) / JOBS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _latest_step(out_dir: Path) -> int:
    latest = out_dir / "checkpoints" / "latest"
    try:
        return int(latest.read_text().strip().removeprefix("step_").removesuffix(".pt"))
    except (OSError, ValueError):
        return 0


class TrainJob(Checkpointable):
    """One training run: ``TrainJob()(config)`` starts it (rpg.launch.ranks.start) from the resolved config dict and
    records each start (with the checkpoint step it resumes from) in ``<out_dir>/jobs.jsonl``."""

    def __call__(self, config: dict) -> dict[str, float]:
        from rpg.config import RunConfig
        from rpg.launch.ranks import start

        lg = logging.getLogger("rpg")
        lg.setLevel(logging.INFO)
        if not lg.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            lg.addHandler(h)
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), config)
        out_dir = Path(cfg.out_dir)
        try:
            env = submitit.JobEnvironment()
            job_id, rank = env.job_id, env.global_rank  # FSDP runs: one task per GPU, rank 0 records
        except RuntimeError:  # not inside a submitit job
            job_id, rank = "inline", 0
        if rank == 0:
            append_record(out_dir, event="start", job_id=job_id, host=socket.gethostname(), pid=os.getpid(),
                          resume_step=_latest_step(out_dir))
        try:
            final = start(cfg)
        except Exception as exc:  # kept beside the run, also when it failed before its MLflow run existed
            if rank == 0:
                (out_dir / FAILURE_FILE).write_text(traceback.format_exc())
                append_record(out_dir, event="failed", job_id=job_id, error=f"{type(exc).__name__}: {exc}"[:500])
            raise
        if rank == 0:  # an earlier attempt's failure is history now
            (out_dir / FAILURE_FILE).unlink(missing_ok=True)
        return final

    def checkpoint(self, config: dict) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2, just before it requeues the job and exits: resubmit the same call.

        The requeue makes SLURM send SIGTERM next; it is ignored from here on so that the trainer's
        shutdown (MLflow flush, status KILLED) is not cut short. The checkpoint is the trainer's own.
        """
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        env = submitit.JobEnvironment()
        if env.global_rank == 0:
            append_record(config["out_dir"], event="preempted", job_id=env.job_id)
        return super().checkpoint(config)


def submit_array(kind: str, params: dict[str, Any], configs: list[dict]) -> list[submitit.Job]:
    """Submit one job array (SLURM) or one process per run (local); return the submitit jobs."""
    executor = make_executor(kind, params)
    jobs = executor.map_array(TrainJob(), configs)
    for job, config in zip(jobs, configs):
        append_record(config["out_dir"], event="submitted", launcher=kind, job_id=str(job.job_id),
                      host=socket.gethostname())
    return jobs


def abandoned(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a run whose process is gone: its folder lock (held by the trainer while it
    runs, released by the kernel even on SIGKILL) is free. A shared lock is probed, so a trainer taking the
    lock at that moment is not refused; where locks cannot be probed the answer is no."""
    import fcntl

    path = Path(out_dir) / LOCK_FILE
    if not path.is_file():
        return False
    try:
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:  # e.g. a file system without flock
        return False
    return True


def wait(jobs: list[submitit.Job]) -> list[str | None]:
    """Block until every job has ended; the error of each (None if it returned)."""
    errors = []
    for job in jobs:
        try:
            job.result()
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - report all, not the first
            raised = [ln for ln in str(exc).splitlines() if _RAISED.match(ln)]
            errors.append(f"job {job.job_id}: {raised[-1] if raised else type(exc).__name__}; log {job.paths.stderr}")
    return errors


def live_jobs(records: list[dict]) -> set[str]:
    """Job ids among ``records`` ("submitted" lines) that are still queued or running."""
    live: set[str] = set()
    slurm = {r["job_id"] for r in records if r.get("launcher") == "slurm"}
    if slurm and shutil.which("squeue"):
        proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            live |= slurm & set(proc.stdout.split())
        else:  # nothing of SLURM's is resubmitted unchecked
            log.warning("squeue failed (%s); SLURM jobs are taken as still queued", proc.stderr.strip())
            live |= slurm
    for r in records:  # a local job, or another sweep process running inline runs: a pid on this host
        mine = r.get("launcher") == "inline" and r["job_id"] == str(os.getpid())  # it runs nothing while it plans
        if r.get("launcher") in ("local", "inline") and r.get("host", socket.gethostname()) == socket.gethostname() \
                and not mine:
            try:
                os.kill(int(r["job_id"]), 0)
                live.add(r["job_id"])
            except (OSError, ValueError):
                pass
    return live


# ---------------------------------------------------------------------- tracking server as a job
def serve_tracking(address_file: str, backend_store_uri: str, port: int | None, workers: int) -> int:
    """Job body: run ``mlflow server`` on this node until the job ends; return its exit code."""
    import signal

    from rpg.tracking import server as ts

    handle = ts.start_server("0.0.0.0", port or ts.free_port("0.0.0.0"), backend_store_uri,
                             address_file=address_file, workers=workers)
    print(f"MLflow tracking server at {handle.url}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # scancel: stop cleanly
    try:
        while not stop and handle.proc.poll() is None:
            time.sleep(0.5)
    finally:  # the address goes first: SLURM may SIGKILL a few seconds after SIGTERM
        Path(address_file).unlink(missing_ok=True)
        handle.stop()
    return handle.proc.returncode or 0


def submit_tracking_server(profile: str | None, address_file: str, backend_store_uri: str,
                           port: int | None = None, hours: float = 72.0, workers: int = 4,
                           folder: str | None = None) -> submitit.Job:
    params = launcher_params("slurm", profile, {"engine": ONE_PROCESS_ENGINE}, name="rpg-mlflow",
                             folder=folder or str(Path(address_file).parent / ".submitit" / "%j"))
    params.update(gpus_per_node=0, timeout_min=int(hours * 60), max_num_timeout=0, cpus_per_task=min(workers, 4),
                  mem_gb=8)
    params["additional_parameters"] = {k: v for k, v in (params.get("additional_parameters") or {}).items()
                                       if k not in ("requeue", "exclusive")}
    Path(address_file).unlink(missing_ok=True)
    return make_executor("slurm", params).submit(serve_tracking, str(Path(address_file).resolve()),
                                                 backend_store_uri, port, workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpg.launch",
                                description="server: run an MLflow tracking server as a SLURM job")
    p.add_argument("command", choices=["server"])
    p.add_argument("--profile", default=None, help=f"cluster profile, one of {profile_names()}")
    p.add_argument("--address-file", required=True, help="receives http://HOST:PORT once the server is up")
    p.add_argument("--backend-store-uri", required=True, help="sqlite:////shared/path/mlflow.db or a database URL")
    p.add_argument("--port", type=int, default=None, help="default: a free port on the node")
    p.add_argument("--hours", type=float, default=72.0, help="time limit of the server job")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the address")
    args = p.parse_args(argv)
    job = submit_tracking_server(args.profile, args.address_file, args.backend_store_uri, args.port,
                                 args.hours, args.workers)
    print(f"submitted tracking server job {job.job_id}; waiting for {args.address_file}", flush=True)
    deadline = time.monotonic() + args.timeout
    while not Path(args.address_file).is_file():
        if job.done() or time.monotonic() > deadline:
            print(f"no address after {time.monotonic() - deadline + args.timeout:.0f} s; job state "
                  f"{job.state}; log: {job.paths.stdout}", file=sys.stderr)
            return 1
        time.sleep(1.0)
    url = Path(args.address_file).read_text().strip()
    print(f"MLflow tracking server at {url}\n  export MLFLOW_TRACKING_URI=$(cat {args.address_file})\n"
          f"  stop it with: scancel {job.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
