"""MLflowTracker against a real sqlite-backed MLflow store (one database per module: creating one
runs MLflow's migrations, which takes seconds)."""

import json
import os
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from rpg.tracking.tracker import (
    MAX_PARAM_VAL_LENGTH,
    TRUNCATION_MARKER,
    MLflowTracker,
    NullTracker,
    TrackingError,
    find_runs,
    flatten_params,
    get_run_status,
    mlflow_key,
    resolve_tracking_uri,
    upload_unsent,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the schema once
    return uri, root


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_start_log_end(store, tmp_path):
    uri, root = store
    long_value = "x" * (MAX_PARAM_VAL_LENGTH + 500)
    params = {"algo": {"name": "rpg_fkl", "kl_coef": 0.05, "clip": {"low": 0.2}}, "seed": 1,
              "prompt": long_value}
    tracker = MLflowTracker(uri, output_dir=tmp_path)
    run_id = tracker.start("exp_basic", "rpg_fkl-s1", params, {"algo": "rpg_fkl", "seed": 1})
    assert get_run_status(run_id, uri) == "RUNNING"
    for step in range(6):
        tracker.log_metrics({"train/acc": step / 8, "loss/pg": -0.25 * step}, step=step)
    tracker.log_text("hello tracker", "notes/readme.txt")
    assert tracker.flush(timeout_s=30) is True
    tracker.end("FINISHED")

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
    assert run.data.tags["algo"] == "rpg_fkl" and run.data.tags["seed"] == "1"
    assert run.info.run_name == "rpg_fkl-s1"
    p = run.data.params
    assert (p["algo.name"], p["algo.kl_coef"], p["algo.clip.low"], p["seed"]) == \
        ("rpg_fkl", "0.05", "0.2", "1")
    assert len(p["prompt"]) == MAX_PARAM_VAL_LENGTH and p["prompt"].endswith(TRUNCATION_MARKER)
    assert history(client, run_id, "train/acc") == [(s, s / 8) for s in range(6)]
    assert history(client, run_id, "loss/pg") == [(s, -0.25 * s) for s in range(6)]
    full = json.loads(open(client.download_artifacts(run_id, "params_full_values.json", tmp_path)).read())
    assert full == {"prompt": long_value}
    assert open(client.download_artifacts(run_id, "notes/readme.txt", tmp_path)).read() == "hello tracker"
    assert not (root / "mlruns").exists() and not list(tmp_path.glob("unsent_*"))


def test_many_params_are_batched(store, tmp_path):
    uri, _ = store
    params = {f"group{g}": {f"k{i}": i for i in range(60)} for g in range(4)}  # 240 > 100 per batch
    flat = flatten_params(params)
    assert len(flat) == 240 and flat["group3.k59"] == "59"
    tracker = MLflowTracker(uri, output_dir=tmp_path)
    run_id = tracker.start("exp_params", "many", params, {})
    tracker.end("FINISHED")
    assert MlflowClient(uri).get_run(run_id).data.params == flat


def test_resume_continues_same_run(store, tmp_path):
    uri, _ = store
    params, tags = {"algo": {"name": "grpo"}, "steps": 10}, {"config_hash": "resume1"}
    first = MLflowTracker(uri, output_dir=tmp_path)
    run_id = first.start("exp_resume", "grpo-s1", params, tags)
    for step in range(5):
        first.log_metrics({"train/score_mean": float(step)}, step)
    first.end("KILLED")  # e.g. a preempted SLURM job
    assert get_run_status(run_id, uri) == "KILLED"

    second = MLflowTracker(uri, output_dir=tmp_path)
    assert second.start("exp_resume", "grpo-s1", params, tags, run_id=run_id) == run_id
    assert get_run_status(run_id, uri) == "RUNNING"
    for step in range(5, 10):
        second.log_metrics({"train/score_mean": float(step)}, step)
    second.end("FINISHED")
    client = MlflowClient(uri)
    assert history(client, run_id, "train/score_mean") == [(s, float(s)) for s in range(10)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params == {"algo.name": "grpo", "steps": "10"}
    assert len(find_runs(uri, "exp_resume", {"config_hash": "resume1"})) == 1


def test_statuses_and_find_runs(store, tmp_path):
    uri, _ = store
    ids = {}
    for name, status, config_hash in [("a", "FAILED", "h1"), ("b", "KILLED", "h1"),
                                      ("c", "FINISHED", "h2")]:
        tracker = MLflowTracker(uri, output_dir=tmp_path)
        ids[name] = tracker.start("exp_find", name, {}, {"config_hash": config_hash, "sweep": "s'1"})
        tracker.end(status)
    assert get_run_status(ids["a"], uri) == "FAILED"
    assert get_run_status(ids["b"], uri) == "KILLED"
    found = find_runs(uri, "exp_find", {"config_hash": "h1"})
    assert {r.run_id: r.status for r in found} == {ids["a"]: "FAILED", ids["b"]: "KILLED"}
    assert found[0].start_time >= found[1].start_time  # newest first
    assert all(r.end_time is not None and r.tags["config_hash"] == "h1" for r in found)
    assert [r.run_id for r in find_runs(uri, "exp_find", {"config_hash": "h2", "sweep": "s'1"})] \
        == [ids["c"]]
    assert find_runs(uri, "exp_find", {"config_hash": "nope"}) == []
    assert find_runs(uri, "no_such_experiment", {"config_hash": "h1"}) == []
    with pytest.raises(ValueError, match="status must be one of"):
        MLflowTracker(uri, output_dir=tmp_path).end("DONE")
    client = MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name("exp_find").experiment_id)
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="is deleted; restore it"):
        MLflowTracker(uri, output_dir=tmp_path).start("exp_find", "d", {}, {})
    assert time.monotonic() - t0 < 5  # a permanent error is not retried for start_timeout_s


def test_bad_values_do_not_raise_and_buffer_overflow_is_saved(store, tmp_path):
    uri, _ = store
    # a long flush interval keeps everything in the buffer, so the bound is reached for sure
    tracker = MLflowTracker(uri, output_dir=tmp_path, flush_interval_s=3600, max_buffer=10)
    run_id = tracker.start("exp_overflow", "r", {}, {})
    tracker.log_metrics({"ok": 1.0, "bad": "not-a-number", "none": None}, step=0)
    for step in range(1, 6):
        tracker.log_metrics({f"m{i}": step * 10.0 + i for i in range(4)}, step=step)
    spill = tmp_path / f"unsent_metrics_{run_id}.jsonl"
    spilled = [json.loads(line) for line in spill.read_text().splitlines()]
    # buffer sizes 1, 5, 9, 13 -> spill 6, 11 -> spill 5, 10: the 11 oldest metrics went to disk
    assert len(spilled) == 11 and all(r["run_id"] == run_id for r in spilled)
    assert (spilled[0]["key"], spilled[0]["step"], spilled[0]["value"]) == ("ok", 0, 1.0)
    tracker.end("FINISHED")
    assert upload_unsent(spill, uri) == len(spilled)
    assert not spill.exists() and spill.with_name(spill.name + ".uploaded").exists()
    client = MlflowClient(uri)
    assert history(client, run_id, "ok") == [(0, 1.0)]
    assert set(client.get_run(run_id).data.metrics) == {"ok", "m0", "m1", "m2", "m3"}
    for i in range(4):
        assert history(client, run_id, f"m{i}") == [(s, s * 10.0 + i) for s in range(1, 6)]


def test_metric_names_mlflow_rejects_are_mapped(store, tmp_path):
    uri, _ = store
    assert mlflow_key("eval/aime24/mean@32") == "eval/aime24/mean_at_32"
    assert mlflow_key("clip/frac_low") == "clip/frac_low"
    assert mlflow_key("a!b(c)") == "a_b_c_"
    tracker = MLflowTracker(uri, output_dir=tmp_path)
    run_id = tracker.start("exp_keys", "r", {}, {})
    tracker.log_metrics({"eval/aime24/mean@32": 0.25, "eval/aime24/pass@32": 0.5}, step=3)
    tracker.log_metrics({"kl/k3": 0.125, "kl/../k3": 7.0}, step=4)  # MLflow refuses the 2nd name
    tracker.end("FINISHED")
    client = MlflowClient(uri)
    assert history(client, run_id, "eval/aime24/mean_at_32") == [(3, 0.25)]
    assert history(client, run_id, "eval/aime24/pass_at_32") == [(3, 0.5)]
    assert history(client, run_id, "kl/k3") == [(4, 0.125)]  # its batch-mate still arrives
    rejected = [json.loads(line) for line in
                (tmp_path / f"rejected_metrics_{run_id}.jsonl").read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in rejected] == [("kl/../k3", 4, 7.0)]
    assert "must not resolve to other names" in rejected[0]["error"]
    assert not list(tmp_path.glob("unsent_*"))


def test_trackers_in_threads(store, tmp_path):
    uri, _ = store
    trackers = [MLflowTracker(uri, output_dir=tmp_path, flush_interval_s=0.05) for _ in range(3)]
    ids = [t.start("exp_threads", f"t{i}", {"i": i}, {}) for i, t in enumerate(trackers)]

    def work(i, t):
        for step in range(40):
            t.log_metrics({"v": 1000.0 * i + step}, step)
        t.end("FINISHED")

    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate(trackers)]
    [th.start() for th in threads]
    [th.join(timeout=60) for th in threads]
    client = MlflowClient(uri)
    for i, run_id in enumerate(ids):
        assert history(client, run_id, "v") == [(s, 1000.0 * i + s) for s in range(40)]
        assert client.get_run(run_id).info.status == "FINISHED"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert resolve_tracking_uri("http://10.0.0.5:5000") == "http://10.0.0.5:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://node7:5000")
    assert resolve_tracking_uri() == "http://node7:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    for bad in ("./mlruns", "mlruns", "file:///tmp/mlruns"):
        with pytest.raises(TrackingError, match=r"sqlite:///.*http://HOST:PORT"):
            resolve_tracking_uri(bad)


def test_http_client_fails_fast_by_default(store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's own setting wins
    MLflowTracker(store[0], output_dir=tmp_path)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_null_tracker():
    t = NullTracker()
    run_id = t.start("e", "r", {"a": 1}, {})
    assert isinstance(run_id, str) and len(run_id) == 32 and t.run_id == run_id
    t.log_metrics({"x": 1.0}, 0)
    t.log_text("x", "a.txt")
    assert t.flush() is True
    t.end("FAILED")


RACER = """
import sys, time
uri, t0, i = sys.argv[1], float(sys.argv[2]), sys.argv[3]
from rpg.tracking.tracker import MLflowTracker
while time.time() < t0:
    time.sleep(0.001)
tracker = MLflowTracker(uri, output_dir=sys.argv[4], start_timeout_s=60)
tracker.start("race", f"r{i}", {"i": i}, {})
tracker.log_metrics({"x": 1.0}, 1)
tracker.end("FINISHED")
"""


def test_four_runs_starting_together_on_a_new_store_all_finish(tmp_path):
    """MLflow creates a sqlite schema on first use; 4 processes doing it at once broke the store (1 of 4
    survived before the store was created under a file lock)."""
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'new.db'}"
    t0 = time.time() + 8  # after every process has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(t0), str(i), str(tmp_path / f"o{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-1500:] for o in outs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4


def test_training_sweeps_and_analysis_find_the_same_store(make_cfg, tmp_path, monkeypatch):
    from analysis.load import resolve_uri
    from rpg.launch.sweep import _tracking
    from rpg.train.loop import tracking_uri

    monkeypatch.chdir(tmp_path)
    for env in (None, f"sqlite:///{tmp_path / 'env.db'}"):
        if env:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for uri in (None, "sqlite:///relative.db"):
            cfg = make_cfg(*([f"tracking.uri={uri}"] if uri else []))
            if uri is None:
                cfg.tracking.uri = None
            config = {"tracking": {"uri": cfg.tracking.uri, "experiment": "x"}}
            want = uri or env or f"sqlite:///{tmp_path / 'mlflow.db'}"
            want = want.replace("sqlite:///relative.db", f"sqlite:///{tmp_path / 'relative.db'}")
            assert tracking_uri(cfg) == _tracking([config])[0] == resolve_uri(cfg.tracking.uri) == want


def test_an_unreachable_server_fails_in_seconds_with_the_fix(tmp_path):
    import socket
    import time

    from rpg.tracking.base import TrackingError
    from rpg.tracking.store import open_store

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(TrackingError, match=rf"no tracking server answers at http://u:\*\*\*@127.0.0.1:{port} .*"
                                            r"start one \(`python -m rpg.tracking.server`\)"):
        open_store(f"http://u:secret@127.0.0.1:{port}")
    assert time.perf_counter() - t < 10  # MLflow's own retries took 88 s
