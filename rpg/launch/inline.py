"""Runs of a sweep on this machine (``--launcher inline``): one after another in this process, or several at a
time, each in a spawned process of its own (``--parallel N``)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

from rpg.launch.submit import TrainJob, append_record, last_failure

RUN_LOG = "run.log"  # a run's output when the sweep runs several at a time here

log = logging.getLogger("rpg.launch.inline")


def run_inline(configs: list[dict], parallel: int = 1) -> list[str | None]:
    """Run each config on this machine; the error of each (None if it finished).

    ``parallel=1``: one after another in this process. More: that many at a time, each in a fresh
    process whose output goes to ``<out_dir>/run.log``, with one line here per run that ends. Each run is
    recorded as submitted by this process (its pid), so a second sweep command sees it as queued while
    this one lives."""
    for config in configs:
        append_record(config["out_dir"], event="submitted", launcher="inline", job_id=str(os.getpid()),
                      host=socket.gethostname())
    if parallel > 1:
        return _run_in_processes(configs, parallel)
    return [_run_caught(config) for config in configs]


def _run_caught(config: dict) -> str | None:
    try:
        TrainJob()(config)
        return None
    except Exception as exc:  # noqa: BLE001 - one failed run does not stop the sweep
        log.error("run %s failed: %s", config["out_dir"], exc)
        return f"{type(exc).__name__}: {exc}"


def _run_logged(config: dict) -> None:
    """In a process of its own: the run, its stdout and stderr appended to ``<out_dir>/run.log``."""
    path = Path(config["out_dir"]) / RUN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        error = _run_caught(config)
    sys.exit(1 if error else 0)


def _run_in_processes(configs: list[dict], parallel: int) -> list[str | None]:
    """``parallel`` runs at a time, one spawned process each: a run that dies (killed, out of memory) fails
    alone; on Ctrl-C or SIGTERM the running ones are stopped (each saves and marks its MLflow run KILLED)
    and no other starts."""
    import multiprocessing
    from multiprocessing.connection import wait as wait_for

    ctx = multiprocessing.get_context("spawn")
    n, t0, errors = len(configs), time.perf_counter(), [None] * len(configs)
    pending, running, done = list(range(n)), {}, 0
    print(f"running {n} runs here, {parallel} at a time; each run's output goes to <its out_dir>/{RUN_LOG}",
          flush=True)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                proc = ctx.Process(target=_run_logged, args=(configs[pending[0]],))
                proc.start()
                running[proc.sentinel] = (pending.pop(0), proc)
            for sentinel in wait_for(list(running)):
                i, proc = running.pop(sentinel)
                proc.join()
                errors[i] = None if proc.exitcode == 0 else _exit_error(configs[i]["out_dir"], proc.exitcode)
                done += 1
                elapsed = time.perf_counter() - t0
                print(f"[{done}/{n}] {Path(configs[i]['out_dir']).name}: {errors[i] or 'finished'} ({elapsed / 60:.1f} "
                      f"min, about {elapsed / done * (n - done) / 60:.1f} min to go)", flush=True)
    except BaseException:
        print(f"stopping the {len(running)} running runs; {len(pending)} not started", flush=True)
        for _, proc in running.values():
            proc.terminate()
        for _, proc in running.values():
            proc.join(60)
        raise
    return errors


def _exit_error(out_dir: str, exitcode: int) -> str:
    failure = last_failure(out_dir)
    if failure:
        return failure["error"]
    if exitcode < 0:
        import signal

        return f"its process was killed by {signal.Signals(-exitcode).name}"
    return f"its process exited with code {exitcode}"
