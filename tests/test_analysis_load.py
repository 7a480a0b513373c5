"""analysis.load against a real MLflow sqlite store: runs/params/tags, full histories, NaN, repeated
steps, experiment filtering, the parquet cache and its incremental refresh, and back-end agreement."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric

from analysis.load import ClientSource, SqliteSource, load_sweep


def log_run(client, exp_id, name, tags, params, metrics, status="FINISHED"):
    """metrics: list of (key, step, value, timestamp)."""
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    for k, v in params.items():
        client.log_param(run_id, k, v)
    client.log_batch(run_id, metrics=[Metric(k, v, ts, s) for k, s, v, ts in metrics])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("sweep_a")
    other = client.create_experiment("other")
    ids = {}
    for seed in (1, 2):
        ids[f"grpo-{seed}"] = log_run(
            client, exp, f"grpo-s{seed}", {"algo": "grpo", "seed": str(seed), "run_name": f"grpo-s{seed}"},
            {"algo.kl_coef": "0.001", "algo.ref_update": "never", "seed": str(seed)},
            [("train/score_mean", s, 0.1 * s + seed, 1000 + s) for s in range(5)]
            + [("eval/aime24/mean_at_4", s, 0.25 * seed + s / 100, 2000 + s) for s in (0, 4)])
    # a NaN value and a step logged twice (a resumed run): the later timestamp must win
    ids["nan"] = log_run(client, exp, "dapo-s1", {"algo": "dapo", "seed": "1"}, {"algo.kl_coef": "0.0"},
                         [("train/score_mean", 0, float("nan"), 10), ("train/score_mean", 1, 0.5, 11),
                          ("train/score_mean", 1, 0.75, 99), ("train/score_mean", 2, 0.125, 12)])
    ids["running"] = log_run(client, exp, "dapo-s2", {"algo": "dapo", "seed": "2"}, {"algo.kl_coef": "0.0"},
                             [("train/score_mean", 0, 1.5, 5)], status="RUNNING")
    log_run(client, other, "elsewhere", {"algo": "grpo"}, {}, [("train/score_mean", 0, 42.0, 1)])
    return uri, client, exp, ids


def test_runs_table_has_tags_params_and_status(store):
    uri, _, _, ids = store
    sweep = load_sweep("sweep_a", uri, progress=False)
    runs = sweep.runs.set_index("run_id")
    assert len(runs) == 4  # the run of experiment "other" is not included
    assert runs.loc[ids["grpo-1"], "algo"] == "grpo"
    assert runs.loc[ids["grpo-2"], "seed"] == 2 and str(runs["seed"].dtype) == "Int64"
    assert runs.loc[ids["grpo-1"], "algo.kl_coef"] == 0.001 and runs["algo.kl_coef"].dtype == float
    assert runs.loc[ids["grpo-1"], "algo.ref_update"] == "never"
    assert runs.loc[ids["grpo-1"], "param.seed"] == 1  # a param that shares a tag's name gets a prefix
    assert runs.loc[ids["running"], "status"] == "RUNNING" and runs.loc[ids["nan"], "status"] == "FINISHED"
    assert runs.loc[ids["grpo-1"], "run_name"] == "grpo-s1"
    assert not any(c.startswith("mlflow.") for c in runs.columns)


def test_full_histories_exact(store):
    uri, _, _, ids = store
    m = load_sweep("sweep_a", uri, progress=False).metrics
    assert list(m.columns) == ["run_id", "key", "step", "value", "timestamp"]
    g = m[(m["run_id"] == ids["grpo-2"]) & (m["key"] == "train/score_mean")]
    assert g["step"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(g["value"].to_numpy(), [0.1 * s + 2 for s in range(5)])
    e = m[(m["run_id"] == ids["grpo-1"]) & (m["key"] == "eval/aime24/mean_at_4")]
    assert e["value"].tolist() == [0.25, 0.25 + 4 / 100]
    d = m[m["run_id"] == ids["nan"]]
    assert d["step"].tolist() == [0, 1, 2]
    assert math.isnan(d["value"].iloc[0])
    assert d["value"].iloc[1] == 0.75 and d["timestamp"].iloc[1] == 99  # the later of the two step-1 values
    assert len(m) == 2 * (5 + 2) + 3 + 1


def test_unknown_experiment_names_the_existing_ones(store):
    uri = store[0]
    with pytest.raises(ValueError, match=r"no active MLflow experiment 'nope'.*other, sweep_a"):
        load_sweep("nope", uri, progress=False)
    with pytest.raises(FileNotFoundError, match="--tracking-uri"):
        load_sweep("sweep_a", "sqlite:////nonexistent/dir/x.db", progress=False)


def test_backends_agree(store):
    """Direct SQL (ADBC and sqlite3) and the MLflow client return the same tidy histories."""
    uri = store[0]
    sql = SqliteSource(uri)
    runs = sql.runs("sweep_a")
    ids = runs["run_id"].tolist()
    via_adbc = sql.metrics(ids)
    from analysis.load import _concat_metrics, _tidy_metrics

    via_sqlite3 = _tidy_metrics(_concat_metrics([sql._sqlite3_fetch(json.dumps(sorted(ids)))]))
    client = ClientSource(uri)
    client.runs("sweep_a")
    via_client = client.metrics(ids)

    def norm(df):
        return df.astype({"run_id": str, "key": str}).sort_values(["run_id", "key", "step"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(norm(via_adbc), norm(via_sqlite3))
    pd.testing.assert_frame_equal(norm(via_adbc), norm(via_client))


def test_cache_refreshes_only_new_or_changed_runs(store, tmp_path):
    uri, client = store[0], store[1]
    exp = client.create_experiment("sweep_cache")  # its own experiment: this test writes to the store
    ids = {"grpo-1": log_run(client, exp, "grpo-s1", {"algo": "grpo", "seed": "1"}, {},
                             [("train/score_mean", s, 1.0 + s / 10, 100 + s) for s in range(3)]),
           "running": log_run(client, exp, "dapo-s2", {"algo": "dapo", "seed": "2"}, {},
                              [("train/score_mean", 0, 1.5, 5)], status="RUNNING")}
    cache = tmp_path / "cache"
    first = load_sweep("sweep_cache", uri, cache_dir=cache, progress=False)
    (folder,) = list(cache.iterdir())
    # Plant a marker value in the cache: a run served from the cache keeps it, a refetched run loses it.
    cached = pd.read_parquet(folder / "metrics.parquet")
    marked = cached.copy()
    marked.loc[marked["run_id"].isin([ids["grpo-1"], ids["running"]]), "value"] = -7.0
    marked.to_parquet(folder / "metrics.parquet", index=False)
    client.log_metric(ids["running"], "train/score_mean", 2.5, timestamp=6, step=1)
    new = log_run(client, exp, "grpo-s3", {"algo": "grpo", "seed": "3"}, {}, [("train/score_mean", 0, 3.0, 1)])

    second = load_sweep("sweep_cache", uri, cache_dir=cache, progress=False)
    m = second.metrics
    assert (m.loc[m["run_id"] == ids["grpo-1"], "value"] == -7.0).all()  # finished, unchanged: from the cache
    assert m.loc[m["run_id"] == ids["running"], "value"].tolist() == [1.5, 2.5]  # RUNNING: always refetched
    assert m.loc[m["run_id"] == new, "value"].tolist() == [3.0]  # new run fetched
    assert len(second.runs) == len(first.runs) + 1

    client.set_terminated(ids["grpo-1"], "FINISHED", end_time=1)  # changed end time -> refetched
    third = load_sweep("sweep_cache", uri, cache_dir=cache, progress=False).metrics
    assert third.loc[third["run_id"] == ids["grpo-1"], "value"].tolist()[:2] == [1.0, 1.1]
    client.delete_run(new)  # a deleted run leaves the cache
    fourth = load_sweep("sweep_cache", uri, cache_dir=cache, progress=False)
    assert new not in set(fourth.runs["run_id"]) and new not in set(fourth.metrics["run_id"].astype(str))
    assert set(pd.read_parquet(folder / "metrics.parquet")["run_id"].astype(str)) == set(fourth.runs["run_id"])
