"""What every tracker shares, without importing mlflow: the `Tracker` protocol, `NullTracker`, the
tracking-URI rule and the naming of params and metrics (rpg/tracking/tracker.py holds the MLflow tracker)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TrackingError(RuntimeError):
    """Raised by `start()`/URI resolution when the store cannot be used; never by logging calls."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    tags: dict[str, str]
    start_time: int | None  # ms since the epoch
    end_time: int | None


class Tracker(Protocol):
    run_id: str | None

    def start(self, experiment: str, run_name: str, params: Mapping, tags: Mapping,
              run_id: str | None = None) -> str: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def flush(self) -> bool: ...
    def persist(self) -> None: ...
    def logged_through(self, prefix: str) -> int: ...
    def upload_unsent_files(self) -> int: ...
    def end(self, status: str = "FINISHED", timeout_s: float | None = None) -> None: ...


class NullTracker:
    """Records nothing (dry runs, unit tests)."""

    run_id: str | None = None

    def start(self, experiment, run_name, params, tags, run_id=None) -> str:
        self.run_id = run_id or uuid.uuid4().hex
        return self.run_id

    def log_metrics(self, metrics, step) -> None: ...
    def log_text(self, text, artifact_file) -> None: ...
    def log_artifact(self, local_path, artifact_path=None) -> None: ...
    def flush(self) -> bool:
        return True
    def persist(self) -> None: ...
    def logged_through(self, prefix) -> int:
        return -1
    def upload_unsent_files(self) -> int:
        return 0
    def end(self, status="FINISHED", timeout_s=None) -> None: ...


def resolve_tracking_uri(uri: str | None = None, directory: str | Path | None = None) -> str:
    """The one rule for where runs are stored (training, sweeps and the analysis use it): `uri`, else
    $MLFLOW_TRACKING_URI, else sqlite:///<directory, default the cwd>/mlflow.db; sqlite paths made absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(directory or Path.cwd()) / 'mlflow.db'}"
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r} is an MLflow file store (./mlruns), which this project does not "
            "use. Set tracking.uri / MLFLOW_TRACKING_URI to sqlite:///ABS/PATH/mlflow.db or to a "
            "server address http://HOST:PORT (see `python -m rpg.tracking.server`).")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@]*:)[^\s@/]*@")


def redact(text: str | None) -> str | None:
    """`text` with the password of every URL in it replaced by '***' (http://alice:s3cret@host ->
    http://alice:***@host): for everything that is logged, printed or stored. The tracker itself
    connects with the real URI."""
    return text if not text or "@" not in text else _URL_PASSWORD.sub(r"\1***@", text)


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    """{'algo': {'kl_coef': 0.1}} -> {'algo.kl_coef': '0.1'}."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def mlflow_key(key: str) -> str:
    """The metric name MLflow stores for `key`. MLflow names may only hold alphanumerics and
    `_ - . : / space`, so '@' becomes '_at_' (eval/aime24/mean@32 -> eval/aime24/mean_at_32) and
    any other character outside that set becomes '_'."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))
