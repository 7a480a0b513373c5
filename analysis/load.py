"""MLflow runs of one experiment (= one sweep) -> two tidy pandas tables, cached to parquet.

``load_sweep(experiment, tracking_uri)`` returns a :class:`Sweep` with
  runs:    one row per run: run_id, experiment, run_name, status, start_time, end_time (ms since epoch),
           fingerprint, then every tag (algo, seed, sweep, config_hash, ...; MLflow's own ``mlflow.*``
           tags dropped) and every param under its dotted key (algo.kl_coef, algo.clip_low, ...). A
           param whose key is also a tag name is stored as ``param.<key>``. Values that all parse as
           numbers become numeric columns.
  metrics: run_id, key (categorical), step, value, timestamp, sorted by (run_id, key, step); NaN where
           MLflow stored is_nan; a step logged twice (a resumed run) keeps its latest value.

Back ends: a ``sqlite:///`` store is read directly with read-only SQL (ADBC's SQLite driver returns
Arrow columns without a Python object per value; the standard sqlite3 module is the fallback). Any
other URI goes through the MLflow client: for an http(s) server the UI's bulk history endpoint
(``/ajax-api/2.0/mlflow/metrics/get-history-bulk``: one request per metric key and 100 runs) in a thread
pool, else ``get_metric_history`` per (run, key) in a thread pool.

Cache: ``<cache_dir>/<experiment>-<hash of the URI>/{runs,metrics}.parquet``. A run's metrics are
fetched again only when it is new, its fingerprint (status, end time, latest logged metric) changed,
or it is not finished yet (RUNNING/SCHEDULED); runs gone from the store leave the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import urllib.parse
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

TERMINAL = ("FINISHED", "FAILED", "KILLED")
METRIC_COLUMNS = ["run_id", "key", "step", "value", "timestamp"]
BASE_COLUMNS = ["run_id", "experiment", "run_name", "status", "start_time", "end_time", "fingerprint"]
RUNS_PER_QUERY = 100  # runs per SQL query / bulk request (also the progress-bar granularity)
BULK_MAX_RESULTS = 25_000  # the server's cap per get-history-bulk request
HTTP_THREADS = 8


@dataclass
class Sweep:
    experiment: str
    tracking_uri: str
    runs: pd.DataFrame
    metrics: pd.DataFrame

    def history(self, key: str) -> pd.DataFrame:
        """Rows of one metric key: run_id, step, value (all runs)."""
        m = self.metrics
        return m.loc[m["key"] == key, ["run_id", "step", "value"]]

    def keys(self) -> list[str]:
        return sorted(self.metrics["key"].unique().tolist())


def resolve_uri(tracking_uri: str | None) -> str:
    """The project's one rule (rpg.tracking.base.resolve_tracking_uri): default sqlite:///<cwd>/mlflow.db."""
    from rpg.tracking.base import resolve_tracking_uri

    return resolve_tracking_uri(tracking_uri)


def load_sweep(experiment: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None,
               progress: bool = True, http_bulk: bool = True) -> Sweep:
    """Load runs and full metric histories of MLflow experiment ``experiment``.

    tracking_uri: ``sqlite:///path.db`` or a server URL; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.
    cache_dir: parquet cache folder (None = no cache).  http_bulk: use the bulk endpoint on a server.
    """
    uri = resolve_uri(tracking_uri)
    source = SqliteSource(uri) if uri.startswith("sqlite:") else ClientSource(uri, http_bulk)
    runs = source.runs(experiment)
    cache = _cache_paths(cache_dir, experiment, uri) if cache_dir is not None else None
    cached_runs, cached_metrics = _read_cache(cache)
    old = dict(zip(cached_runs["run_id"], cached_runs["fingerprint"])) if cached_runs is not None else {}
    stale = [r for r, fp, st in zip(runs["run_id"], runs["fingerprint"], runs["status"])
             if old.get(r) != fp or st not in TERMINAL]
    keep = set(runs["run_id"]) - set(stale)
    fresh = source.metrics(stale, progress) if stale else _empty_metrics()
    if cached_metrics is not None and keep:
        kept = cached_metrics[cached_metrics["run_id"].isin(keep)]
        metrics = _tidy_metrics(_concat_metrics([kept, fresh]))
    else:
        metrics = fresh
    if cache is not None and (stale or set(old) != set(runs["run_id"]) or cached_metrics is None):
        _write_cache(cache, runs, metrics)
    return Sweep(experiment, uri, runs, metrics)


# ----------------------------------------------------------------------------- sqlite back end

class SqliteSource:
    """Read-only SQL on an MLflow sqlite store (tables runs, tags, params, metrics, latest_metrics)."""

    def __init__(self, uri: str):
        path = sqlite_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow store at {path} (from {uri}); set --tracking-uri / MLFLOW_TRACKING_URI")
        self.uri, self.path = uri, path
        self.ro_uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.ro_uri, uri=True)

    def runs(self, experiment: str) -> pd.DataFrame:
        with closing(self._connect()) as con:
            row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                              (experiment,)).fetchone()
            if row is None:
                names = [r[0] for r in con.execute("SELECT name FROM experiments WHERE lifecycle_stage = 'active'")]
                raise ValueError(_no_experiment(experiment, self.uri, names))
            sel = "SELECT run_uuid FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active'"
            base = pd.read_sql_query(
                "SELECT r.run_uuid AS run_id, r.name AS run_name, r.status, r.start_time, r.end_time,"
                " (SELECT max(timestamp) || ':' || count(*) FROM latest_metrics l WHERE l.run_uuid = r.run_uuid)"
                " AS latest FROM runs r WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'",
                con, params=(row[0],))
            tags = pd.read_sql_query(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({sel})", con,
                                     params=(row[0],))
            params = pd.read_sql_query(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({sel})", con,
                                       params=(row[0],))
        base["experiment"] = experiment
        end = base["end_time"].astype("Int64").astype("string").fillna("")
        base["fingerprint"] = base["status"] + "|" + end + "|" + base.pop("latest").fillna("")
        return _assemble_runs(base, _long_to_dict(tags), _long_to_dict(params))

    def metrics(self, run_ids: list[str], progress: bool = False) -> pd.DataFrame:
        ids = sorted(run_ids)
        chunks = [ids[i:i + RUNS_PER_QUERY] for i in range(0, len(ids), RUNS_PER_QUERY)]
        fetch = self._adbc_fetch if _has_adbc() else self._sqlite3_fetch
        parts = [fetch(json.dumps(c)) for c in tqdm(chunks, desc="metrics", unit="query", disable=not progress)]
        return _tidy_metrics(_concat_metrics(parts))

    _ROWS = (" FROM metrics WHERE run_uuid IN (SELECT value FROM json_each(?))")

    def _sqlite3_fetch(self, ids_json: str) -> pd.DataFrame:
        with closing(self._connect()) as con:
            df = pd.read_sql_query("SELECT run_uuid AS run_id, key, step, value, timestamp, is_nan" + self._ROWS,
                                   con, params=(ids_json,))
        return _with_nan(df)

    def _adbc_fetch(self, ids_json: str, attempts: int = 3) -> pd.DataFrame:
        """Rows ordered by run (the run_uuid index gives that order for free), so the run id column is
        rebuilt from per-run counts instead of being read as text: ~2.5x less work per value."""
        import adbc_driver_sqlite.dbapi as adbc
        import pyarrow.compute as pc

        with adbc.connect(self.ro_uri) as con, con.cursor() as cur:
            cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": "65536"})
            for _ in range(attempts):
                cur.execute("SELECT run_uuid, count(*)" + self._ROWS + " GROUP BY run_uuid ORDER BY run_uuid",
                            (ids_json,))
                counts = cur.fetch_arrow_table()
                cur.execute("SELECT key, step, value, timestamp, is_nan" + self._ROWS + " ORDER BY run_uuid",
                            (ids_json,))
                table = cur.fetch_arrow_table()
                n = counts.column(1).to_numpy()
                if n.sum() == table.num_rows:  # else a writer added rows in between: read again
                    break
            else:
                return self._sqlite3_fetch(ids_json)
        runs = counts.column(0).to_pylist()
        df = table.set_column(0, "key", pc.dictionary_encode(table.column("key"))).to_pandas()
        df.insert(0, "run_id", pd.Categorical.from_codes(np.repeat(np.arange(len(runs)), n), categories=runs))
        return _with_nan(df)


def _has_adbc() -> bool:
    try:
        import adbc_driver_sqlite.dbapi  # noqa: F401
    except ImportError:
        return False
    return True


def _with_nan(df: pd.DataFrame) -> pd.DataFrame:
    """MLflow stores NaN as value 0 with is_nan = 1."""
    value = df["value"].to_numpy(float, copy=True)
    value[df.pop("is_nan").to_numpy() != 0] = np.nan
    df["value"] = value
    return df[["run_id", "key", "step", "value", "timestamp"]]


def sqlite_path(uri: str) -> Path:
    """``sqlite:///rel.db`` -> rel.db; ``sqlite:////abs/x.db`` -> /abs/x.db (SQLAlchemy's convention)."""
    m = re.fullmatch(r"sqlite:///([^?]+)(\?.*)?", uri)
    if not m:
        raise ValueError(f"cannot read a file path from {uri!r}; use sqlite:///relative.db or sqlite:////abs/path.db")
    return Path(m.group(1))


# ----------------------------------------------------------------------------- client / server back end

class ClientSource:
    """Any tracking URI through MlflowClient; bulk history requests on an http(s) server."""

    def __init__(self, uri: str, http_bulk: bool = True):
        import mlflow

        self.uri = uri
        self.client = mlflow.MlflowClient(uri)
        self.bulk = http_bulk and uri.startswith(("http://", "https://"))
        self.latest: dict[str, list[str]] = {}

    def runs(self, experiment: str) -> pd.DataFrame:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            names = [e.name for e in self.client.search_experiments()]
            raise ValueError(_no_experiment(experiment, self.uri, names))
        rows, tags, params, token = [], {}, {}, None
        while True:
            page = self.client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            for run in page:
                i, d = run.info, run.data
                latest = json.dumps(sorted(d.metrics.items()))
                rows.append({"run_id": i.run_id, "run_name": i.run_name, "status": i.status,
                             "start_time": i.start_time, "end_time": i.end_time, "experiment": experiment,
                             "fingerprint": f"{i.status}|{i.end_time or ''}|{hashlib.sha1(latest.encode()).hexdigest()[:12]}"})
                tags[i.run_id], params[i.run_id] = dict(d.tags), dict(d.params)
                self.latest[i.run_id] = sorted(d.metrics)
            token = page.token
            if not token:
                break
        base = pd.DataFrame(rows, columns=[c for c in BASE_COLUMNS])
        return _assemble_runs(base, tags, params)

    def metrics(self, run_ids: list[str], progress: bool = False) -> pd.DataFrame:
        by_key: dict[str, list[str]] = {}
        for r in run_ids:
            for k in self.latest.get(r, []):
                by_key.setdefault(k, []).append(r)
        if self.bulk:
            tasks = [(k, rs[i:i + RUNS_PER_QUERY]) for k, rs in by_key.items() for i in range(0, len(rs), RUNS_PER_QUERY)]
            work = lambda t: self._bulk(t[0], t[1])  # noqa: E731
        else:
            tasks = [(k, r) for k, rs in by_key.items() for r in rs]
            work = lambda t: self._history(t[0], t[1])  # noqa: E731
        with ThreadPoolExecutor(HTTP_THREADS) as pool:
            parts = list(tqdm(pool.map(work, tasks), total=len(tasks), desc="metrics", unit="req", disable=not progress))
        rows = [row for part in parts for row in part]
        df = pd.DataFrame(rows, columns=METRIC_COLUMNS)
        df = df.astype({"run_id": "category", "key": "category", "step": np.int64, "value": float, "timestamp": np.int64})
        return _tidy_metrics(df)

    def _history(self, key: str, run_id: str) -> list[tuple]:
        return [(run_id, key, m.step, m.value, m.timestamp) for m in self.client.get_metric_history(run_id, key)]

    def _bulk(self, key: str, run_ids: list[str]) -> list[tuple]:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        params = [("run_id", r) for r in run_ids] + [("metric_key", key), ("max_results", BULK_MAX_RESULTS)]
        resp = http_request(get_default_host_creds(self.uri), "/ajax-api/2.0/mlflow/metrics/get-history-bulk",
                            "GET", params=params, raise_on_status=False)
        if resp.status_code == 404:  # a server without the UI endpoints
            return [row for r in run_ids for row in self._history(key, r)]
        resp.raise_for_status()
        found = resp.json().get("metrics", [])
        if len(found) >= BULK_MAX_RESULTS:  # truncated by the server: split the runs
            if len(run_ids) == 1:
                return self._history(key, run_ids[0])
            half = len(run_ids) // 2
            return self._bulk(key, run_ids[:half]) + self._bulk(key, run_ids[half:])
        return [(m["run_id"], m["key"], int(m.get("step", 0)), float(m["value"]), int(m["timestamp"])) for m in found]


# ----------------------------------------------------------------------------- shared helpers

def _no_experiment(name: str, uri: str, names: list[str]) -> str:
    have = ", ".join(sorted(names)) or "none"
    return f"no active MLflow experiment {name!r} in {uri} (experiments there: {have}); set --experiment to the sweep name"


def _long_to_dict(df: pd.DataFrame) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for run, key, value in df.itertuples(index=False):
        out.setdefault(run, {})[key] = value
    return out


def _assemble_runs(base: pd.DataFrame, tags: dict, params: dict) -> pd.DataFrame:
    """base + one column per tag and per param, numeric where every value parses as a number."""
    ids = base["run_id"].tolist()
    tag_df = pd.DataFrame([{k: v for k, v in tags.get(r, {}).items() if not k.startswith("mlflow.")} for r in ids])
    if "run_name" in tag_df:  # the project's run_name tag wins over MLflow's generated name
        base = base.assign(run_name=tag_df.pop("run_name").fillna(base["run_name"]).to_numpy())
    par_df = pd.DataFrame([params.get(r, {}) for r in ids])
    par_df = par_df.rename(columns={c: f"param.{c}" for c in par_df.columns if c in tag_df.columns or c in base.columns})
    tag_df = tag_df.rename(columns={c: f"tag.{c}" for c in tag_df.columns if c in base.columns})
    out = pd.concat([base[BASE_COLUMNS].reset_index(drop=True), tag_df[sorted(tag_df.columns)],
                     par_df[sorted(par_df.columns)]], axis=1)
    for col in out.columns[len(BASE_COLUMNS):]:
        out[col] = _maybe_numeric(out[col])
    for col in ("start_time", "end_time"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
    return out.sort_values(["run_name", "run_id"], na_position="last").reset_index(drop=True)


def _maybe_numeric(col: pd.Series) -> pd.Series:
    """Strings -> Int64 when all are integers, float when all are numbers, else unchanged."""
    text = col.dropna().astype(str)
    if text.empty or not text.str.fullmatch(_NUMBER).all():
        return col
    if text.str.fullmatch(r"[-+]?\d+").all():
        return pd.to_numeric(col).astype("Int64")
    return pd.to_numeric(col).astype(float)


_NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)"


def _empty_metrics() -> pd.DataFrame:
    return pd.DataFrame({"run_id": pd.Categorical([]), "key": pd.Categorical([]), "step": np.array([], np.int64),
                         "value": np.array([], float), "timestamp": np.array([], np.int64)})


def _tidy_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by (run, key, step); a step logged twice keeps the value logged last (latest timestamp)."""
    if df.empty:
        return _empty_metrics()
    run, key = df["run_id"].cat, df["key"].cat
    rc, kc = run.codes.to_numpy(np.int64), key.codes.to_numpy(np.int64)
    step, ts = df["step"].to_numpy(np.int64), df["timestamp"].to_numpy(np.int64)
    span = int(step.max()) - int(step.min()) + 1
    if len(run.categories) * len(key.categories) * span < 2**62:  # one int64 sort key: fast radix sort
        code = (rc * len(key.categories) + kc) * span + (step - step.min())
        order = np.lexsort((ts, code))
        code = code[order]
        last = np.append(code[1:] != code[:-1], True)
    else:
        order = np.lexsort((ts, step, kc, rc))
        rc, kc, st = rc[order], kc[order], step[order]
        last = np.append((rc[1:] != rc[:-1]) | (kc[1:] != kc[:-1]) | (st[1:] != st[:-1]), True)
    keep = order[last]
    out = df.iloc[keep].reset_index(drop=True)
    out["run_id"] = out["run_id"].cat.remove_unused_categories()
    out["key"] = out["key"].cat.remove_unused_categories()
    return out


def _concat_metrics(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return _empty_metrics()
    cols = {c: pd.api.types.union_categoricals([pd.Categorical(p[c]) for p in parts], ignore_order=True)
            for c in ("run_id", "key")}
    rest = {c: np.concatenate([p[c].to_numpy() for p in parts]) for c in ("step", "value", "timestamp")}
    return pd.DataFrame({**cols, **rest})


def _cache_paths(cache_dir, experiment: str, uri: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    return Path(cache_dir) / f"{slug}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"


def _read_cache(path: Path | None):
    if path is None or not (path / "runs.parquet").is_file() or not (path / "metrics.parquet").is_file():
        return None, None
    try:
        runs = pd.read_parquet(path / "runs.parquet", columns=["run_id", "fingerprint"])
        metrics = pd.read_parquet(path / "metrics.parquet")
    except Exception:  # noqa: BLE001  (an unreadable cache is rebuilt, never trusted)
        return None, None
    if list(metrics.columns) != METRIC_COLUMNS:
        return None, None
    return runs, metrics


def _write_cache(path: Path, runs: pd.DataFrame, metrics: pd.DataFrame) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, df in (("metrics", metrics), ("runs", runs)):
        tmp = path / f".{name}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path / f"{name}.parquet")
