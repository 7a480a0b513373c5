"""Sweeps as data: expand a ``sweeps/*.yaml`` file, look each run up in MLflow, submit what is missing.

    python -m rpg.sweep sweeps/smoke.yaml --status                   # table of run states, no submission
    python -m rpg.sweep sweeps/main.yaml --launcher slurm --profile gpu8 [--dry-run] [--wait] [KEY=VALUE ...]

A sweep file holds ``name`` (the sweep: MLflow experiment and output folder), ``model``/``data``/``engine``,
``fixed`` overrides for every run, a ``grid`` (cartesian product in file order; a key ``"a,b"`` zips its
values: ``[[a1, b1], [a2, b2]]``) and optional explicit ``runs`` (mappings of overrides). A run's name lists
its varied keys (``algo=grpo,seed=2``): the grid keys, or an explicit run's own keys. Its out_dir is
``<runs root>/<sweep>/<run name>``. Trailing KEY=VALUE overrides apply to every run.

A run is identified by its config hash (``rpg.tracking.identity.config_hash``, tag ``config_hash``): FINISHED or
RUNNING in MLflow -> skipped, unless its folder lock is free (its process was SIGKILLed) -> stale, resubmitted;
FAILED or KILLED -> resubmitted into its out_dir (it resumes from its checkpoint into the same MLflow run);
absent -> submitted. A run whose last submitted job is still in the
scheduler's queue is ``queued`` and skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rpg.tracking.identity import PROJECT_ROOT, config_hash, format_value, settings_name

SWEEP_KEYS = ("name", "model", "data", "engine", "fixed", "grid", "runs", "launcher", "profile", "parallel")
LAUNCHERS = ("slurm", "local", "inline")
#: MLflow status -> (state, action)
STATES = {"FINISHED": ("finished", "skip"), "RUNNING": ("running", "skip"), "SCHEDULED": ("running", "skip"),
          "FAILED": ("failed", "resubmit"), "KILLED": ("killed", "resubmit"), None: ("missing", "submit")}
GROUPS = ("hydra",)  # config groups besides the folders of conf/


class SweepError(ValueError):
    """A sweep file or command line that cannot be expanded; the message says what to fix."""


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    base: dict[str, Any]  # model/data/engine, then `fixed`
    grid: list[tuple[tuple[str, ...], list[tuple]]]
    runs: list[dict[str, Any]]
    launcher: str = "slurm"
    profile: str | None = None
    command: str = ""  # the launch command from the file's first comment line
    parallel: int = 1  # inline launcher: runs at a time, each in its own process


@dataclass(frozen=True)
class Run:
    name: str
    varied: dict[str, Any]


@dataclass
class Planned:
    run: Run
    config: dict  # resolved config the job receives
    config_hash: str
    state: str
    action: str
    mlflow_run: str | None = None
    job: str | None = None
    records: list[dict] = field(default_factory=list)


def default_runs_root() -> Path:
    return Path(os.environ.get("RPG_RUNS_DIR") or PROJECT_ROOT / "multirun")


def load_sweep(path: str | os.PathLike) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found (sweep files live in {PROJECT_ROOT / 'sweeps'})")
    text = path.read_text()
    raw = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}  # YAML as OmegaConf reads it
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with keys {list(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}; a sweep file has {list(SWEEP_KEYS)}")
    for key in ("name", "model", "data", "engine"):
        if not raw.get(key):
            raise SweepError(f"{path}: set `{key}:` (every sweep names its {key})")
    if not re.match(r"^[\w.-]+$", str(raw["name"])):
        raise SweepError(f"{path}: name {raw['name']!r} may only hold letters, digits, _ . -")
    base = {k: raw[k] for k in ("model", "data", "engine")} | dict(raw.get("fixed") or {})
    grid = []
    for key, values in (raw.get("grid") or {}).items():
        keys = tuple(k.strip() for k in str(key).split(","))
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list")
        rows = [tuple(v) if len(keys) > 1 else (v,) for v in values]
        if any(len(r) != len(keys) for r in rows):
            raise SweepError(f"{path}: every value of grid.'{key}' must be a list of {len(keys)} items")
        grid.append((keys, rows))
    runs = raw.get("runs") or []
    if not isinstance(runs, list) or not all(isinstance(r, dict) and r for r in runs):
        raise SweepError(f"{path}: runs must be a list of non-empty mappings of overrides")
    launcher = raw.get("launcher", "slurm")
    if launcher not in LAUNCHERS:
        raise SweepError(f"{path}: launcher {launcher!r}; use one of {LAUNCHERS}")
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    command = first.lstrip("# ").strip() if first.startswith("#") else ""
    parallel = raw.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise SweepError(f"{path}: parallel={parallel!r}; set it to the number of runs at a time (>= 1)")
    return Sweep(str(raw["name"]), path, base, grid, runs, launcher, raw.get("profile"), command, parallel)


def expand(sweep: Sweep) -> list[Run]:
    """Every run of the sweep: the grid's cartesian product, then the explicit runs. Names are unique."""
    settings = [{k: v for (keys, _), row in zip(sweep.grid, combo) for k, v in zip(keys, row)}
                for combo in itertools.product(*(rows for _, rows in sweep.grid))] if sweep.grid else []
    try:
        runs = [Run(settings_name(varied), varied) for varied in settings + [dict(r) for r in sweep.runs]]
    except ValueError as exc:
        raise SweepError(f"{sweep.path}: {exc}") from None
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        raise SweepError(f"{sweep.path}: duplicate runs {dup}; give explicit runs a key that tells them apart")
    if not runs:
        raise SweepError(f"{sweep.path}: no runs; add a grid or runs")
    return runs


def _override_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = value
    return out


@dataclass(frozen=True)
class Composed:
    run: Run
    config: dict  # resolved
    config_hash: str


def compose_runs(sweep: Sweep, runs: list[Run], extra: list[str] = (), runs_root: str | os.PathLike | None = None,
                 check: bool = False) -> list[Composed]:
    """Each run's resolved config (base < varied keys < ``extra``; deterministic out_dir) and hash.

    Same result as ``hydra.compose`` with all overrides, but fast: Hydra composes once per distinct set
    of config-group choices and value-override keys, and each run's values are applied to that config by
    Hydra's own override step (unknown keys and wrong types fail as on the command line). Runs sharing
    the key set overwrite the same keys, so nothing carries over; overrides that merge or add/delete keys
    (``{...}`` values, ``+``/``~``) are part of the cache key. ``check`` also runs ``rpg.config.validate``.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rpg.config import register_configs, validate
    from rpg.config import CONF_DIR

    register_configs()
    root = Path(runs_root or default_runs_root()).resolve() / sweep.name
    extra_map = _override_map(list(extra))
    for key in ("sweep", "out_dir"):
        if key in extra_map:
            raise SweepError(f"{key} is set by the sweep (name: and the runs root); drop {key}= from the overrides")
    parser, cache, parsed, out = OverridesParser.create(), {}, {}, []
    is_group = lambda k: k.split("@")[0].lstrip("+~") in GROUPS or (Path(CONF_DIR) / k.lstrip("+~")).is_dir()  # noqa: E731
    structural = lambda k, v: k[0] in "+~" or v.startswith("{")  # noqa: E731
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for run in runs:
            ov = {k: format_value(v) for k, v in sweep.base.items()}
            ov |= {k: format_value(v) for k, v in run.varied.items()}
            ov |= extra_map | {"sweep": sweep.name, "out_dir": format_value(str(root / run.name)),
                               "name": format_value(run.name)}  # the run's MLflow name = its folder's
            groups = tuple(f"{k}={v}" for k, v in ov.items() if is_group(k))
            values = [f"{k}={v}" for k, v in ov.items() if not is_group(k)]
            key = (groups, tuple(f"{k}={v}" if structural(k, v) else k for k, v in ov.items() if not is_group(k)))
            try:
                if key not in cache:
                    cache[key] = compose(config_name="config", overrides=list(groups))
                cfg = cache[key]
                for v in values:  # parsing is the slow part: each distinct override once
                    if v not in parsed:
                        parsed[v] = parser.parse_overrides([v])[0]
                ConfigLoaderImpl._apply_overrides_to_config([parsed[v] for v in values], cfg)
                if check:
                    validate(cfg)
            except Exception as exc:  # noqa: BLE001 - the errors name the key; add the run
                raise SweepError(f"{sweep.path}: run {run.name}: {exc}") from exc
            config = OmegaConf.to_container(cfg, resolve=True)
            out.append(Composed(run, config, config_hash(config)))
    seen: dict[str, str] = {}
    for c in out:
        if c.config_hash in seen:
            raise SweepError(f"{sweep.path}: runs {seen[c.config_hash]} and {c.run.name} are the same config")
        seen[c.config_hash] = c.run.name
    return out


def _tracking(configs: list[dict]) -> tuple[str, str, bool]:
    """(tracking URI, experiment, whether the URI is the implicit default) shared by all runs."""
    from rpg.tracking.tracker import resolve_tracking_uri

    uris = {c["tracking"]["uri"] for c in configs}
    exps = {c["tracking"]["experiment"] for c in configs}
    if len(uris) != 1 or len(exps) != 1:
        raise SweepError(f"runs of one sweep must share tracking.uri and tracking.experiment; got {uris}, {exps}")
    uri = uris.pop()
    implicit = not uri and not os.environ.get("MLFLOW_TRACKING_URI")
    return resolve_tracking_uri(uri), exps.pop(), implicit


def plan(sweep: Sweep, extra: list[str] = (), runs_root=None, check_queue: bool = True,
         check: bool = False) -> tuple[list[Planned], str, str]:
    """Compose every run and decide what to do with it; returns (plans, tracking URI, experiment)."""
    from rpg.launch import submit as launch
    from rpg.tracking.tracker import find_runs

    composed = compose_runs(sweep, expand(sweep), extra, runs_root, check=check)
    uri, experiment, implicit = _tracking([c.config for c in composed])
    newest: dict[str, Any] = {}
    for info in find_runs(uri, experiment, {}):  # newest first: keep the first per hash
        newest.setdefault(info.tags.get("config_hash"), info)
    plans = []
    for c in composed:
        info, config = newest.get(c.config_hash), c.config
        state, action = STATES.get(info.status if info else None, ("running", "skip"))
        if state == "running" and launch.abandoned(info.tags.get("out_dir") or config["out_dir"]):
            state, action = "stale", "resubmit"  # its process was SIGKILLed: resume it
        if implicit:  # the job's working folder may differ: pin the store the lookup used
            config["tracking"]["uri"] = uri
        if action == "resubmit" and info.tags.get("out_dir") and Path(info.tags["out_dir"]).is_dir():
            config["out_dir"] = info.tags["out_dir"]  # resume in place, into the same MLflow run
        if info is None and launch.last_failure(config["out_dir"]):  # failed before its MLflow run existed
            state, action = "failed", "resubmit"
        records = [r for r in launch.read_records(config["out_dir"]) if r.get("event") == "submitted"]
        plans.append(Planned(c.run, config, c.config_hash, state, action, info.run_id if info else None,
                             records[-1]["job_id"] if records else None, records[-1:]))
    if check_queue:
        live = launch.live_jobs([r for p in plans for r in p.records])
        for p in plans:
            if p.action != "skip" and p.job in live:
                p.state, p.action = "queued", "skip"
    return plans, uri, experiment


def print_table(plans: list[Planned], out=None) -> None:
    out = out or sys.stdout
    w = max([len(p.run.name) for p in plans] + [3])
    out.write(f"{'RUN':<{w}}  {'STATE':<8}  {'ACTION':<8}  {'MLFLOW RUN':<10}  {'JOB':<10}  RESULT\n")
    for p in plans:
        out.write(f"{p.run.name:<{w}}  {p.state:<8}  {p.action:<8}  {(p.mlflow_run or '-')[:10]:<10}  "
                  f"{p.job or '-':<10}  {result(p)}\n")
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.state] = counts.get(p.state, 0) + 1
    todo = sum(p.action != "skip" for p in plans)
    out.write(f"{len(plans)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
              + f"; {todo} to submit\n")


def result(p: Planned) -> str:
    """A finished run's held-out numbers (greedy accuracy, mean@k, pass@k per eval set); a failed run's
    error and where its traceback is."""
    from rpg.launch import submit as launch
    from rpg.tracking.identity import FINAL_METRICS

    out_dir = Path(p.config["out_dir"])
    if p.state == "failed":
        failure = launch.last_failure(out_dir)
        where = out_dir / launch.FAILURE_FILE
        return (f"{failure['error']} ({where})" if failure else "see the MLflow run's traceback.txt")
    try:
        final = json.loads((out_dir / FINAL_METRICS).read_text())
    except (OSError, ValueError):
        return "-"
    from rpg.train.evaluation import headline

    return "; ".join(f"{eval_set} " + ", ".join(f"{stat} {final[k]:.3f}" for stat, k in keys.items())
                     for eval_set, keys in headline(final).items()) or "-"


def submit(plans: list[Planned], launcher: str, profile: str | None, runs_root, sweep: Sweep, dry_run=False,
           parallel: int = 1):
    """Submit the plans whose action is not skip: one job array per distinct resource set."""
    from rpg.launch import submit as launch

    todo = [p for p in plans if p.action != "skip"]
    if launcher == "inline":
        if dry_run:
            print(f"would run {len(todo)} runs here, {parallel} at a time")
            return []
        from rpg.launch.inline import run_inline

        return run_inline([p.config for p in todo], parallel)
    folder = str(Path(runs_root or default_runs_root()).resolve() / sweep.name / ".submitit" / "%j")
    groups: dict[str, tuple[dict, list[Planned]]] = {}
    for p in todo:
        params = launch.launcher_params(launcher, profile, p.config, folder, name=f"rpg-{sweep.name}")
        groups.setdefault(json.dumps(params, sort_keys=True), (params, []))[1].append(p)
    jobs = []
    for params, members in groups.values():
        shown = {k: v for k, v in params.items() if v not in (None, [], {})}
        if dry_run:
            print(f"would submit {len(members)} runs ({launcher}) with {shown}")
            continue
        t0 = time.perf_counter()
        group_jobs = launch.submit_array(launcher, params, [p.config for p in members])
        for p, j in zip(members, group_jobs):
            p.job = str(j.job_id)
        first = str(group_jobs[0].job_id).split("_")[0]
        print(f"submitted {len(members)} runs ({launcher}{', profile ' + profile if profile else ''}) "
              f"as {'job array ' if launcher == 'slurm' else 'jobs from '}{first} in {time.perf_counter() - t0:.2f} s; "
              f"logs in {folder.replace('%j', '<job id>')}", flush=True)
        jobs += group_jobs
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpg.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a sweeps/*.yaml file")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE for every run (changes their config hash)")
    p.add_argument("--launcher", choices=LAUNCHERS, default=None, help="default: the file's, else slurm")
    p.add_argument("--profile", default=None, help="cluster profile (conf/cluster/NAME.yaml) for slurm")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print each run's state; submit nothing")
    mode.add_argument("--dry-run", action="store_true",
                      help="--status plus each run's memory estimate and what would be submitted")
    p.add_argument("--wait", action="store_true", help="block until the submitted runs end")
    p.add_argument("--parallel", type=int, default=None,
                   help="inline launcher: runs at a time, each in its own process (default: the file's, else 1)")
    p.add_argument("--runs-root", default=None, help=f"default $RPG_RUNS_DIR or {default_runs_root()}")
    args = p.parse_intermixed_args(argv)
    try:
        t0 = time.perf_counter()
        sweep = load_sweep(args.sweep)
        launcher = args.launcher or sweep.launcher
        profile = args.profile or (sweep.profile if launcher == "slurm" else None)
        if args.profile and launcher != "slurm":
            raise SweepError(f"--profile {args.profile} is a SLURM cluster profile; add --launcher slurm")
        if launcher != "inline":
            from rpg.launch.submit import ONE_PROCESS_ENGINE, launcher_params

            launcher_params(launcher, profile, {"engine": ONE_PROCESS_ENGINE})  # unknown profile or key: fail now
        if launcher == "slurm" and not (args.status or shutil.which("sbatch")):
            raise SweepError("sbatch not found: run this on a SLURM login node (or export SLURM_CONF for the "
                             "local test cluster), or use --launcher local / inline")
        parallel = args.parallel if args.parallel is not None else sweep.parallel if launcher == "inline" else 1
        if parallel < 1 or (parallel > 1 and launcher != "inline"):
            raise SweepError(f"--parallel {parallel}: runs at a time (>= 1) with --launcher inline; SLURM and local "
                             "jobs are placed by their launcher")
        plans, uri, experiment = plan(sweep, args.overrides, args.runs_root, check=not args.status)
        t_plan = time.perf_counter() - t0
        print(f"sweep {sweep.name} ({sweep.path}): experiment {experiment!r} at {uri}; planned in {t_plan:.2f} s")
        print_table(plans)
        if args.status:
            return 0
        if args.dry_run:  # per-run size/memory estimate (rpg.launch.plan), as `python -m rpg.main dry_run=true`
            from rpg.launch.plan import sweep_estimates

            sweep_estimates([(pl.run.name, pl.config) for pl in plans])
        jobs = submit(plans, launcher, profile, args.runs_root, sweep, dry_run=args.dry_run, parallel=parallel)
        waits = args.wait or launcher == "inline"  # inline runs have ended when submit returns
        if args.dry_run or not waits or not any(pl.action != "skip" for pl in plans):
            return 0
        from rpg.launch.submit import wait

        errors = jobs if launcher == "inline" else wait(jobs)
        plans, _, _ = plan(sweep, args.overrides, args.runs_root, check_queue=False)
        print_table(plans)
        failed = [e for e in errors if e]
        for e in failed:
            print(f"error: {e}", file=sys.stderr)
        return 1 if failed or any(pl.state != "finished" for pl in plans) else 0
    except (SweepError, ValueError) as exc:  # ValueError: an unknown cluster profile or launcher key
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
