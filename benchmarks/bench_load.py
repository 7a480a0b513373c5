"""Side by side: loading a sweep's metric histories naively vs with analysis.load.

Builds (once, cached under /tmp) an MLflow sqlite store with RUNS runs x METRICS metric keys x STEPS
steps, then times
  naive : MlflowClient.get_metric_history for every (run, key), one call after the other
          (timed on a subset of runs and extrapolated when the full loop would take too long),
  fast  : analysis.load.load_sweep (direct read-only SQL on the sqlite file; cold, no cache),
  cache : analysis.load.load_sweep again, everything served from the parquet cache,
and with --http also against a local `mlflow server` on the same store:
  http naive : get_metric_history per (run, key), sequential (subset, extrapolated),
  http fast  : analysis.load.load_sweep through the server (get-history-bulk endpoint).

    python benchmarks/bench_load.py                 # 500 x 50 x 100
    python benchmarks/bench_load.py --http          # also through a tracking server
    python benchmarks/bench_load.py --runs 50 --naive-runs 10
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
import sqlalchemy  # noqa: E402
from mlflow.entities import Param, RunTag  # noqa: E402
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric  # noqa: E402

from analysis.load import load_sweep  # noqa: E402

ALGOS = ["grpo", "dapo", "rpg_ufkl", "rpg_urkl", "rpg_rf_ufkl", "rpg_rf_urkl", "reinforce_pp", "rpg_fkl"]
TRAIN_KEYS = [
    "train/score_mean", "train/acc", "train/response_length_mean", "train/response_length_max",
    "train/entropy", "kl/k1", "kl/k3", "is/weight_mean", "is/weight_max", "clip/frac_low",
    "clip/frac_high", "clip/frac_dual", "clip/frac_zero_grad", "loss/pg", "loss/total",
    "optim/grad_norm", "optim/lr", "perf/tokens_per_s", "perf/step_time_s",
]


def metric_keys(n: int) -> list[str]:
    keys = list(TRAIN_KEYS)
    for bench in ["aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "toy"]:
        keys += [f"eval/{bench}/{name}" for name in  # logged names: MLflow refuses "@" (mean@32 -> mean_at_32)
                 ("mean_at_32", "pass_at_32", "maj_at_32", "greedy_acc", "pass_at_1", "pass_at_8")]
    if n > len(keys):
        keys += [f"extra/m{i}" for i in range(n - len(keys))]
    return keys[:n]


def build_store(path: Path, runs: int, metrics: int, steps: int, experiment: str = "bench") -> str:
    """Create the store at `path` (skipped when it already holds this shape); returns its URI.

    Runs, tags and params go through MlflowClient; the metric rows are bulk-inserted into MLflow's
    own tables (its SQLAlchemy models) because log_batch would take ~0.3 s per 1000 values here.
    """
    uri = f"sqlite:///{path}"
    marker = path.with_suffix(".v2.done")
    if marker.exists() and path.exists():
        return uri
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, marker):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment(experiment)
    keys = metric_keys(metrics)
    engine = sqlalchemy.create_engine(uri)
    run_ids = []
    for i in range(runs):
        algo, seed = ALGOS[i % len(ALGOS)], i // len(ALGOS)
        tags = {"algo": algo, "seed": str(seed), "sweep": experiment, "config_hash": f"{i:08x}"}
        run = client.create_run(exp_id, tags=tags, run_name=f"{algo}-s{seed}")
        params = {"algo.name": algo, "algo.kl_coef": "0.0001", "algo.clip_low": "0.2",
                  "algo.clip_high": "0.28", "algo.ref_update": "every_step", "seed": str(seed),
                  "steps": str(steps), "model.name": "tiny", "data.name": "toy"}
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag("run_name", f"{algo}-s{seed}")])
        run_ids.append(run.info.run_id)
    rows, latest = [], []
    for r, run_id in enumerate(run_ids):
        for k, key in enumerate(keys):
            for s in range(steps):
                rows.append({"key": key, "value": (r * 0.001 + k * 0.01 + s * 1e-4) % 1.0,
                             "timestamp": 1_700_000_000_000 + s * 1000, "run_uuid": run_id,
                             "step": s, "is_nan": False})
            latest.append(dict(rows[-1]))
    with engine.begin() as conn:
        conn.execute(sqlalchemy.insert(SqlMetric.__table__), rows)
        conn.execute(sqlalchemy.insert(SqlLatestMetric.__table__), latest)
    for run_id in run_ids:
        client.set_terminated(run_id, "FINISHED")
    marker.touch()
    print(f"built {uri}: {runs} runs x {metrics} keys x {steps} steps in {time.perf_counter() - t0:.1f} s")
    return uri


def time_naive(client, run_ids: list[str], keys: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for run_id in run_ids:
        for key in keys:
            n += len(client.get_metric_history(run_id, key))
    return time.perf_counter() - t0, n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store_uri: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
           "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start within 240 s")


def report(label: str, seconds: float, values: int, note: str = "", cpu: float | None = None) -> None:
    cpu_text = f"cpu {cpu:7.2f} s" if cpu is not None else " " * 13
    print(f"{label:<36} wall {seconds:>8.2f} s  {cpu_text}  {values:>10,d} values  {note}")


class Timer:
    """Wall and process CPU time of a block (CPU time ~ wall time on an idle machine)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--metrics", type=int, default=50)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--naive-runs", type=int, default=10, help="runs timed in the naive loop (extrapolated)")
    ap.add_argument("--store-dir", default=os.path.join(tempfile.gettempdir(), "rpg_bench_load"))
    ap.add_argument("--http", action="store_true", help="also time through a local mlflow server")
    ap.add_argument("--http-threaded", action="store_true", help="also time get_metric_history x 8 threads (slow)")
    args = ap.parse_args()

    store = Path(args.store_dir) / f"store_{args.runs}x{args.metrics}x{args.steps}_v2.db"
    uri = build_store(store, args.runs, args.metrics, args.steps)
    total = args.runs * args.metrics * args.steps
    keys = metric_keys(args.metrics)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    all_ids = [r.info.run_id for r in client.search_runs([exp.experiment_id], max_results=50_000)]

    print(f"load average (1/5/15 min) at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"\nstore: {uri}  ({args.runs} runs x {args.metrics} keys x {args.steps} steps = {total:,d} values)")
    n_naive = min(args.naive_runs, len(all_ids))
    with Timer() as t:
        secs, n = time_naive(client, all_ids[:n_naive], keys)
    report("naive sqlite (measured subset)", secs, n, f"{n_naive} runs", cpu=t.cpu)
    report("naive sqlite (extrapolated)", secs * len(all_ids) / n_naive, total, "estimate")

    with Timer() as t:
        sweep = load_sweep("bench", tracking_uri=uri, cache_dir=None, progress=False)
    report("fast sqlite (SQL, no cache)", t.wall, len(sweep.metrics), cpu=t.cpu)
    with tempfile.TemporaryDirectory() as cache:
        with Timer() as t:
            sweep = load_sweep("bench", tracking_uri=uri, cache_dir=cache, progress=False)
        report("fast sqlite (SQL + writing the cache)", t.wall, len(sweep.metrics), cpu=t.cpu)
        with Timer() as t:
            sweep = load_sweep("bench", tracking_uri=uri, cache_dir=cache, progress=False)
        report("fast sqlite (warm parquet cache)", t.wall, len(sweep.metrics), cpu=t.cpu)
    if len(sweep.metrics) != total:
        raise SystemExit(f"fast path returned {len(sweep.metrics)} values, expected {total}")

    if args.http:
        with tempfile.TemporaryDirectory() as work:
            proc, url = start_server(uri, Path(work))
            try:
                hclient = mlflow.MlflowClient(url)
                hclient.search_runs([exp.experiment_id], max_results=1)  # warm the server up before timing
                secs, n = time_naive(hclient, all_ids[:n_naive], keys)
                report("naive http (measured subset)", secs, n, f"{n_naive} runs")
                report("naive http (extrapolated)", secs * len(all_ids) / n_naive, total, "estimate")
                with Timer() as t:
                    hs = load_sweep("bench", tracking_uri=url, cache_dir=None, progress=False)
                report("fast http (get-history-bulk, 8 threads)", t.wall, len(hs.metrics), cpu=t.cpu)
                if args.http_threaded:
                    with Timer() as t:
                        hs = load_sweep("bench", tracking_uri=url, cache_dir=None, progress=False, http_bulk=False)
                    report("http get_metric_history, 8 threads", t.wall, len(hs.metrics), cpu=t.cpu)
            finally:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
