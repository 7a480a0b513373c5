"""Run identity: config hash, git state, run name, and how a run is stopped (signals)."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

from omegaconf import OmegaConf

from rpg.data import PROJECT_ROOT
#: what a finished run writes into its output folder (its last metrics; read back by whoever started its ranks)
FINAL_METRICS = "final_metrics.json"
LOCK_FILE = ".lock"  # in a run folder: held (flock) by the process that trains it
#: Keys that do not change what a run computes; left out of the config hash.
NON_SEMANTIC_KEYS = ("tracking", "resume", "out_dir", "sweep", "cache_dir", "dry_run", "name")


def config_hash(cfg) -> str:
    """Hash of the resolved config without NON_SEMANTIC_KEYS; ``cfg`` may be an already resolved dict."""
    d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    for k in NON_SEMANTIC_KEYS:
        d.pop(k, None)
    if isinstance(d.get("data"), dict):  # the task's beta acts only through the resolved algo.kl_coef
        d["data"] = {k: v for k, v in d["data"].items() if k != "kl_coef"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: Also allowed to change when a run resumes from its checkpoints (extending or re-scheduling it).
RESUMABLE_KEYS = ("steps", "eval_every", "save_every")


def resume_key(cfg) -> str:
    """What a checkpoint must match to be resumed: the config hash without RESUMABLE_KEYS."""
    d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return config_hash({k: v for k, v in d.items() if k not in RESUMABLE_KEYS})


def git_state() -> tuple[str, bool]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def run_name(cfg) -> str:
    """The run's one name -- in MLflow, its progress bar, its summary and a sweep's run folder: ``name``
    when set (rpg.launch.sweep sets the settings its runs vary, a ``-m`` multirun its overrides), else
    <algo>-<model>-<data>-s<seed>."""
    return cfg.get("name") or f"{cfg.algo.name}-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}"


_SIMPLE = re.compile(r"^[\w.:/+@-]*$")


def format_value(value: Any) -> str:
    """A value in Hydra's override syntax (also the run-name form)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if _SIMPLE.match(text) and text else "'" + text.replace("'", "\\'") + "'"


def settings_name(settings: dict[str, Any]) -> str:
    """``key=value,...`` of the settings that tell runs apart, usable as a folder name: a path value is
    shortened to its last part (``model.path=/models/qwen3`` -> ``model.path=qwen3``)."""
    def short(v):
        return PurePosixPath(v).name if isinstance(v, str) and "/" in v else v

    name = ",".join(f"{k}={format_value(short(v))}" for k, v in settings.items())
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"settings {settings} give no usable run name ({name!r}): no '/', no leading '.'")
    return name


class Terminated(BaseException):
    """SIGTERM arrived: the run stops, is marked KILLED, and can be resumed from its last checkpoint.

    A BaseException (like KeyboardInterrupt), so that job wrappers which catch ``Exception`` (submitit,
    Hydra's run_job) do not record an interruption as the job's error: a requeued job is not failed.
    """


def raise_on_sigterm() -> None:
    """SIGTERM raises :class:`Terminated`, unless the run is already stopping (a SystemExit,
    KeyboardInterrupt or Terminated is being handled): then the shutdown (MLflow flush, status) is left
    to finish. SLURM sends SIGTERM right after a job requeues itself on USR2 (submitit's SystemExit)."""

    def handler(signum, frame):
        if isinstance(sys.exc_info()[1], (SystemExit, KeyboardInterrupt, Terminated)):
            return
        raise Terminated(f"received signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals to the host
        pass
