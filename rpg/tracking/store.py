"""The MLflow store itself: opening it (and experiments) safely, retrying transient errors, and querying /
repairing runs.

Used by rpg.tracking.tracker (the tracker, re-exported there) and rpg.launch.sweep (run lookups).
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rpg.tracking.base import RunInfo, TrackingError, redact, resolve_tracking_uri

METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
_CREATED: set[str] = set()  # stores this process has opened (sqlite: created under the lock; servers: reached)


def is_permanent(exc: BaseException) -> bool:
    """Errors that retrying cannot fix (bad request, missing run, auth); the rest are transient."""
    return isinstance(exc, MlflowException) and exc.get_http_status_code() in (400, 401, 403, 404)


def retry(fn, timeout_s: float, what: str):
    """Call `fn`, retrying transient errors with backoff for up to `timeout_s`."""
    deadline, delay = time.monotonic() + timeout_s, 0.25
    while True:
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001
            if is_permanent(exc) or time.monotonic() + delay > deadline:
                message = f"{what} failed: {exc}"
                if redact(message) != message:  # the store's error quotes the URI: no password, no chain
                    raise TrackingError(redact(message)) from None
                raise TrackingError(message) from exc
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def check_reachable(uri: str, attempts: int = 3, timeout_s: float = 2.0) -> None:
    """A tracking server's address must accept connections, or the run stops in seconds (MLflow's own
    retries took 88 s to give up on a closed port) with what to set."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    proxied = any(os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
    if not parts.hostname or proxied:  # through a proxy only MLflow's own requests can tell
        return
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    for attempt in range(attempts):
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            return
        except OSError as exc:
            error = exc
            time.sleep(0.5 * (attempt + 1))
    raise TrackingError(f"no tracking server answers at {redact(uri)} ({error}): start one "
                        "(`python -m rpg.tracking.server`), or set tracking.uri / MLFLOW_TRACKING_URI to a "
                        "reachable server or to sqlite:///ABS/PATH/mlflow.db")


def open_store(uri: str) -> MlflowClient:
    """A client of ``uri``; a server must be reachable; a sqlite store is created (or migrated) under an
    exclusive file lock.

    MLflow creates its schema on first use; several processes doing that at once on a new file (a
    parallel sweep) broke the store for good (measured: 1 of 4 runs started together survived).
    """
    if uri.startswith(("http://", "https://")) and uri not in _CREATED:
        check_reachable(uri)
        _CREATED.add(uri)
    if not uri.startswith("sqlite:///") or uri in _CREATED:
        return MlflowClient(tracking_uri=uri)
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates the tables, serialised
    _CREATED.add(uri)
    return client


def open_experiment(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (a sqlite store keeps its artifacts next to the
    database, not in ./mlruns); a deleted one is refused with the fix."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[10:]).parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another run of the sweep
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(f"experiment {name!r} is deleted; restore it (mlflow experiments "
                            f"restore --experiment-id {exp.experiment_id}) or use another name")
    return exp.experiment_id


def find_runs(tracking_uri: str | None, experiment: str, tags: Mapping[str, str]) -> list[RunInfo]:
    """Runs of `experiment` whose tags equal `tags` (e.g. {'config_hash': h}), newest first."""
    client = open_store(resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    quote = lambda v: f'"{v}"' if "'" in v else f"'{v}'"  # noqa: E731
    query = " AND ".join(f"tags.`{k}` = {quote(str(v))}" for k, v in tags.items())
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], query, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs += [RunInfo(r.info.run_id, r.info.status, dict(r.data.tags), r.info.start_time,
                         r.info.end_time) for r in page]
        if not (token := page.token):
            return runs


def get_run_status(run_id: str, tracking_uri: str | None = None) -> str:
    """'RUNNING' | 'FINISHED' | 'FAILED' | 'KILLED' | 'SCHEDULED'."""
    return open_store(resolve_tracking_uri(tracking_uri)).get_run(run_id).info.status


def upload_unsent(path: str | os.PathLike, tracking_uri: str | None = None) -> int:
    """Send an unsent_metrics_*.jsonl file (metrics, artifacts, final status); return the number
    of metrics sent and rename the file to *.uploaded. Metrics that did arrive before are ignored
    by the store (exact duplicates), so sending twice is harmless."""
    client = open_store(resolve_tracking_uri(tracking_uri))
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    metrics: dict[str, list[Metric]] = collections.defaultdict(list)
    for r in records:
        if "key" in r:
            metrics[r["run_id"]].append(Metric(r["key"], r["value"], r["timestamp"], r["step"]))
        elif "artifact" in r:
            client.log_artifact(r["run_id"], r["artifact"], r["artifact_path"])
    for run_id, items in metrics.items():
        for i in range(0, len(items), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=items[i:i + METRICS_PER_BATCH])
    for r in records:
        if "status" in r:
            client.set_terminated(r["run_id"], r["status"], r["end_time"])
    os.replace(path, f"{path}.uploaded")
    return sum(len(v) for v in metrics.values())
