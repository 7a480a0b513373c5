"""Experiment tracking with MLflow: `MLflowTracker` (protocol, `NullTracker`, URI rule: rpg/tracking/base.py;
opening the store, retries, run queries: rpg/tracking/store.py; re-exported here). With rpg.tracking.store
the only importers of mlflow; explicit run ids, no global active run; log lines lose any URI password.
`log_metrics` only appends to a buffer; a background thread sends batches, retrying with backoff while
the store is down. `persist()` (each checkpoint) makes what was logged durable: sent, or appended to
`<output_dir>/unsent_metrics_<run_id>.jsonl`, as is whatever `end()` could not send; a resumed run sends
that file first (or: `python -m rpg.tracking upload PATH`). What the web UI shows (view, columns, the
link `ui_link`): rpg/tracking/ui.py.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from mlflow.entities import Metric, Param, RunTag

from rpg.tracking.base import (NullTracker, RunInfo, Tracker, TrackingError, flatten_params,  # noqa: F401
                               mlflow_key, redact, resolve_tracking_uri)
from rpg.tracking.store import (METRICS_PER_BATCH, find_runs, get_run_status, is_permanent,  # noqa: F401
                                open_experiment, open_store, retry, upload_unsent)
from rpg.tracking.ui import RunsView, prepare_experiment, runs_url

try:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
except ImportError:  # pragma: no cover - constants moved in another mlflow version
    MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH = 6000, 100

log = logging.getLogger("rpg.tracking.tracker")


class _Redact(logging.Filter):
    """No password of a URI reaches a log line (the store's own errors quote the URI they failed on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if redact(message) != message:
            record.msg, record.args = redact(message), ()
        return True


log.addFilter(_Redact())

STATUSES = ("FINISHED", "FAILED", "KILLED")
TRUNCATION_MARKER = "...[truncated; full value in artifact params_full_values.json]"
# MLflow's HTTP layer by default retries 7 times with growing backoff (minutes) and waits 120 s per
# request; the tracker retries by itself, so requests should fail fast. Values already set win.
# no MLflow retries (the tracker has its own) and no MLflow "View run" links (they open the GenAI view;
# a run prints its ui_link instead)
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                     "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _record(run_id, m: Metric) -> dict:
    return {"run_id": run_id, "key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}


class MLflowTracker:
    """MLflow-backed `Tracker`. Logging calls never raise and never wait on the network.

    Args:
        tracking_uri: see `resolve_tracking_uri`.
        output_dir: the run's output folder: staged text artifacts and unsent metrics go here.
        flush_interval_s: longest time a metric waits in the buffer while the store is up.
        max_buffer: bound on buffered metrics; past it the oldest half is written to the
            unsent-metrics JSONL with an error message (never dropped silently).
        end_timeout_s: how long `end()` waits for the backlog before writing it to disk.
        start_timeout_s: how long `start()` retries an unreachable store before raising.
        backoff_initial_s, backoff_max_s: retry delays while the store is unreachable.
    """

    def __init__(self, tracking_uri: str | None = None, output_dir: str | os.PathLike | None = None,
                 flush_interval_s: float = 1.0, max_buffer: int = 200_000,
                 end_timeout_s: float = 60.0, start_timeout_s: float = 60.0,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0):
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.display_uri = redact(self.tracking_uri)  # what messages show: never a password
        if self.display_uri != self.tracking_uri:  # MLflow would print its run link with the password
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.output_dir = Path(output_dir or Path.cwd()).resolve()
        self.client = open_store(self.tracking_uri)
        self.flush_interval_s, self.max_buffer = flush_interval_s, max_buffer
        self.end_timeout_s, self.start_timeout_s = end_timeout_s, start_timeout_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._cv = threading.Condition()
        self._buf: collections.deque[Metric] = collections.deque()
        self._inflight: list[Metric] = []  # the batch being sent, kept until the store accepts it
        self._ops: collections.deque[tuple[str, str | None]] = collections.deque()  # artifacts
        self._flush_gen = self._seen_gen = 0
        self._stopping = self._ended = False
        self._down_since: float | None = None
        self._renamed: set[str] = set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ run lifecycle
    def start(self, experiment: str, run_name: str, params: Mapping, tags: Mapping,
              run_id: str | None = None) -> str:
        """Create a run in `experiment` (created if missing), or resume `run_id` (same id, status
        back to RUNNING, only params it lacks are added). Returns the run id."""
        if self.run_id is not None:
            raise TrackingError("this tracker already has a run; use one tracker per run")
        tags = {str(k): redact(str(v)) for k, v in tags.items()}  # a command line may quote a tracking URI
        where = (f"at {self.display_uri} (is the store reachable? set tracking.uri or "
                 "MLFLOW_TRACKING_URI; a server starts with `python -m rpg.tracking.server`)")
        if run_id is None:
            exp_id = retry(lambda: open_experiment(self.client, self.tracking_uri, experiment),
                           self.start_timeout_s, f"opening experiment {experiment!r} {where}")
            run = retry(lambda: self.client.create_run(exp_id, tags=tags, run_name=run_name),
                         self.start_timeout_s, f"creating a run {where}")
            run_id, existing = run.info.run_id, {}
        else:
            run = retry(lambda: self.client.get_run(run_id), self.start_timeout_s,
                         f"resuming run {run_id} {where}")
            retry(lambda: self.client.update_run(run_id, status="RUNNING"), self.start_timeout_s,
                   f"marking run {run_id} RUNNING {where}")
            existing = dict(run.data.params)
            self._log_batched(run_id, "tags", [RunTag(k, v) for k, v in tags.items()])
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        prepare_experiment(self.client, self.experiment_id)
        self._view = RunsView(self.client, self.experiment_id)
        self._log_params(flatten_params(params), existing)
        self._thread = threading.Thread(target=self._sender, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        return run_id

    def end(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Flush (waiting at most `timeout_s`, default end_timeout_s), save what is left to disk, set the
        run status.  A killed run passes a few seconds: SLURM's grace after SIGTERM is 30 s."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self._ended or self.run_id is None:
            return
        self._ended = True
        atexit.unregister(self._atexit)
        wait = self.end_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait
        self.flush(timeout_s=wait)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._cv:
            metrics, ops = self._inflight + list(self._buf), list(self._ops)
        records = [_record(self.run_id, m) for m in metrics]
        records += [{"run_id": self.run_id, "artifact": p, "artifact_path": a} for p, a in ops]
        try:
            retry(lambda: self.client.set_terminated(self.run_id, status),
                   max(1.0, min(10.0, deadline - time.monotonic())), "setting the run status")
        except TrackingError as exc:
            log.error("could not set status %s on run %s: %s", status, self.run_id, exc)
            records.append({"run_id": self.run_id, "status": status, "end_time": _now_ms()})
        if records:
            path = self._write_unsent(records)
            log.error("tracking store %s unreachable at the end of run %s: %d metrics and %d "
                      "artifacts NOT sent, saved to %s. Send them later with: python -m "
                      "rpg.tracking upload %s", self.tracking_uri, self.run_id, len(metrics),
                      len(ops), path, path)

    def _atexit(self) -> None:
        log.warning("run %s was not ended by the program; ending it as KILLED", self.run_id)
        self.end("KILLED")

    # ------------------------------------------------------------------ logging (never raises)
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer `metrics` at `step` and return at once."""
        try:
            ts, step, batch = _now_ms(), int(step), []
            for key, value in metrics.items():
                name = mlflow_key(str(key))
                if name != key and key not in self._renamed:
                    self._renamed.add(key)
                    log.warning("metric %r is logged as %r (characters MLflow rejects)", key, name)
                try:
                    batch.append(Metric(name, float(value), ts, step))
                except (TypeError, ValueError):
                    log.error("metric %r has non-numeric value %r; not logged", key, value)
            with self._cv:
                self._buf.extend(batch)
                spilled = []
                if len(self._buf) > self.max_buffer:
                    spilled = [self._buf.popleft() for _ in range(len(self._buf) // 2)]
                if len(self._buf) >= METRICS_PER_BATCH:
                    self._cv.notify_all()
            if spilled:
                path = self._write_unsent([_record(self.run_id, m) for m in spilled])
                log.error("metric buffer full (%d; store %s unreachable): the oldest %d metrics "
                          "were written to %s. Send them later with: python -m rpg.tracking "
                          "upload %s", self.max_buffer, self.tracking_uri, len(spilled), path, path)
        except Exception:  # noqa: BLE001 - tracking must never break training
            log.exception("log_metrics failed at step %s", step)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save `text` under output_dir/tracking_staging and upload it as `artifact_file`."""
        try:
            local = self.output_dir / "tracking_staging" / str(self.run_id) / artifact_file
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(text)
            self.log_artifact(local, str(Path(artifact_file).parent) if "/" in artifact_file else None)
        except Exception:  # noqa: BLE001
            log.exception("log_text(%s) failed", artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or folder in the background; leave it in place until `flush()`."""
        with self._cv:
            self._ops.append((str(Path(local_path).resolve()), artifact_path))
            self._cv.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Ask for everything buffered to be sent and wait at most `timeout_s` (default
        end_timeout_s); True when nothing is left. Blocks, so call it at checkpoints, not per step."""
        with self._cv:
            self._flush_gen += 1
            self._cv.notify_all()
            thread = self._thread
            self._cv.wait_for(lambda: not self._has_work() or thread is None or not thread.is_alive(),
                              self.end_timeout_s if timeout_s is None else timeout_s)
            return not self._has_work()

    def persist(self, timeout_s: float = 2.0) -> None:
        """Make everything logged so far durable (call it before each checkpoint, so that a SIGKILL after
        the checkpoint loses nothing): sent to the store, or, if the store does not take it within
        `timeout_s`, appended to the run folder's unsent-metrics file.  The sender keeps retrying the
        batch it holds; the store ignores an exact duplicate, so uploading that file later is harmless."""
        if self.run_id is None or self.flush(timeout_s=timeout_s):
            return
        with self._cv:
            metrics = self._inflight + list(self._buf)
            self._buf.clear()
        if metrics:
            path = self._write_unsent([_record(self.run_id, m) for m in metrics])
            log.warning("tracking store %s unreachable at a checkpoint: %d metrics saved to %s (sent "
                        "when the run resumes, or with: python -m rpg.tracking upload %s)",
                        self.display_uri, len(metrics), path, path)

    def logged_through(self, prefix: str) -> int:
        """The last step by which the store holds every metric key of this run starting with `prefix`
        (-1 if none): a resumed run does not log the steps it re-runs a second time."""
        keys = [k for k in retry(lambda: self.client.get_run(self.run_id), self.start_timeout_s,
                                 "reading the run").data.metrics if k.startswith(prefix)]
        lasts = [max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1) for k in keys]
        return min(lasts, default=-1)

    @property
    def ui_link(self) -> str | None:
        """This run's experiment in the web UI: its runs, in the model-training view, with metric columns."""
        return runs_url(self.tracking_uri, self.experiment_id) if self.experiment_id else None

    def upload_unsent_files(self) -> int:
        """Send the unsent-metrics files a previous attempt of this run left in its folder."""
        sent = 0
        for path in sorted(self.output_dir.glob(f"unsent_metrics_{self.run_id}.jsonl")):
            sent += upload_unsent(path, self.tracking_uri)
            log.info("sent %d metrics that an earlier attempt of run %s had saved to %s", sent, self.run_id, path)
        return sent

    # ------------------------------------------------------------------ background sender
    def _has_work(self) -> bool:
        return bool(self._buf or self._inflight or self._ops)

    def _sender(self) -> None:
        backoff = self.backoff_initial_s
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or self._flush_gen != self._seen_gen
                                  or len(self._buf) >= METRICS_PER_BATCH, self.flush_interval_s)
                self._seen_gen = self._flush_gen
            try:
                ok = self._send_pending()
            except Exception:  # noqa: BLE001 - keep the sender alive whatever happens
                log.exception("tracking sender error")
                ok = False
            with self._cv:
                self._cv.notify_all()  # wake flush() waiters
                if self._stopping:
                    return
                if ok:
                    backoff = self.backoff_initial_s
                    continue
                gen = self._flush_gen  # a flush() call cuts the backoff short
                self._cv.wait_for(lambda: self._stopping or self._flush_gen != gen, backoff)
                backoff = min(2 * backoff, self.backoff_max_s)

    def _send_pending(self) -> bool:
        """Send queued artifacts, then metric batches; False at the first transient failure."""
        sent = 0
        while True:
            with self._cv:
                if not self._inflight and not self._ops:
                    self._inflight = [self._buf.popleft()
                                      for _ in range(min(len(self._buf), METRICS_PER_BATCH))]
                op, batch = (self._ops[0] if self._ops else None), list(self._inflight)
            if op is None and not batch:
                break
            try:
                if op is not None:
                    self.client.log_artifact(self.run_id, op[0], op[1])
                else:
                    self.client.log_batch(self.run_id, metrics=batch)
                    sent += len(batch)
                    self._view.add(m.key for m in batch)  # new headline metrics become columns of the UI's view
            except Exception as exc:  # noqa: BLE001
                if not is_permanent(exc):
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        log.warning("tracking store %s unreachable (%s); buffering metrics and "
                                    "retrying with backoff", self.tracking_uri, str(exc)[:200])
                    return False
                self._handle_rejected(op, batch, exc)
            with self._cv:
                if op is not None:
                    self._ops.popleft()
                else:
                    self._inflight = []
        if self._down_since is not None:
            log.warning("tracking store %s reachable again after %.1f s; sent %d buffered metrics",
                        self.tracking_uri, time.monotonic() - self._down_since, sent)
            self._down_since = None
        return True

    def _handle_rejected(self, op, batch: list[Metric], exc: Exception) -> None:
        """A permanent error: retry metrics one by one; save the rejected ones with the error."""
        if op is not None:
            log.error("artifact %s rejected by %s (%s); it stays on disk", op[0], self.tracking_uri, exc)
            return
        rejected = []
        for m in batch:
            try:
                self.client.log_batch(self.run_id, metrics=[m])
            except Exception as one:  # noqa: BLE001
                rejected.append({**_record(self.run_id, m), "error": redact(str(one))[:300]})
        if rejected:
            path = self._write_unsent(rejected, "rejected")
            log.error("%d metrics rejected by %s (%s); saved to %s", len(rejected),
                      self.tracking_uri, exc, path)

    # ------------------------------------------------------------------ helpers
    def _log_batched(self, run_id: str, what: str, items: list) -> None:
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = {what: items[i:i + MAX_PARAMS_TAGS_PER_BATCH]}
            retry(lambda: self.client.log_batch(run_id, **chunk), self.start_timeout_s, f"logging {what}")

    def _log_params(self, flat: dict[str, str], existing: dict[str, str]) -> None:
        full, params = {}, []
        for key, value in flat.items():
            if len(value) > MAX_PARAM_VAL_LENGTH:
                full[key] = value
                value = value[:MAX_PARAM_VAL_LENGTH - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
            if key not in existing:
                params.append(Param(key, value))
            elif existing[key] != value:
                log.warning("param %s of resumed run %s is %r; new value %r not logged",
                            key, self.run_id, existing[key], value)
        self._log_batched(self.run_id, "params", params)
        if full:
            self.log_text(json.dumps(full, indent=1), "params_full_values.json")

    def _write_unsent(self, records: list[dict], kind: str = "unsent") -> Path:
        path = self.output_dir / f"{kind}_metrics_{self.run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rpg.tracking",
                                description="upload PATH: send an unsent_metrics_*.jsonl file")
    p.add_argument("command", choices=["upload"])
    p.add_argument("path")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite")
    args = p.parse_args(argv)
    print(f"uploaded {upload_unsent(args.path, args.tracking_uri)} metrics from {args.path}")


if __name__ == "__main__":
    main()
