"""What the MLflow web UI shows of the project's runs: the model-training kind and the runs view on new and
existing experiments, each run's description and source, the link to the runs; and, in a headless browser
(scripts/check_mlflow_ui.sh), that the link opens the training view with metric columns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from rpg.tracking.tracker import MLflowTracker
from rpg.tracking.ui import KIND_TAG, TRAINING_KIND, VIEW_TAG, run_tags, runs_url, view_state

REPO = Path(__file__).resolve().parents[1]
PASSWORD_URI = "http://alice:s3cret@127.0.0.1:9"


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def columns(client, experiment_id) -> list[str]:
    return json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG])["selectedColumns"]


def small_cfg(**over):
    return OmegaConf.create({"name": None, "algo": {"name": "grpo"}, "model": {"name": "tiny"},
                             "data": {"name": "toy"}, "seed": 3, "steps": 7, "sweep": "ui", **over})


def test_a_new_experiment_opens_as_model_training_with_metric_columns(uri, tmp_path):
    tracker = MLflowTracker(uri, output_dir=tmp_path)
    tracker.start("fresh", "r", {}, {})
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fresh")
    assert exp.tags[KIND_TAG] == TRAINING_KIND == "custom_model_development"
    assert columns(client, exp.experiment_id) == ["attributes.`Duration`", "attributes.`User`", "attributes.`Source`"]
    tracker.log_metrics({"train/acc": 0.5, "eval/toy/greedy_acc": 0.25, "eval/aime24/mean_at_32": 0.1,
                         "perf/step_time_s": 1.0, "eval/toy/pass_at_4": 0.9}, step=1)
    tracker.end()
    # the headline metrics the run sent became columns; the rest stay behind "Show more columns"
    assert columns(client, exp.experiment_id)[3:] == [
        "metrics.`eval/aime24/mean_at_32`", "metrics.`eval/toy/greedy_acc`", "metrics.`train/acc`"]
    assert tracker.ui_link == (f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
                               "?workflowType=machine_learning&viewStateShareKey=rpg")


def test_an_existing_experiment_gets_the_kind_and_view_but_keeps_a_kind_someone_chose(uri, tmp_path):
    client = MlflowClient(uri)
    old = client.create_experiment("made_by_an_older_version")  # no tags, as every experiment before this
    chosen = client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    first, other = MLflowTracker(uri, output_dir=tmp_path / "a"), MLflowTracker(uri, output_dir=tmp_path / "b")
    run_id = first.start("made_by_an_older_version", "r", {}, {})
    other.start("chosen", "r", {}, {})
    first.end(), other.end()
    assert client.get_experiment(old).tags[KIND_TAG] == TRAINING_KIND and VIEW_TAG in client.get_experiment(old).tags
    assert client.get_experiment(chosen).tags[KIND_TAG] == "genai_development"
    assert VIEW_TAG in client.get_experiment(chosen).tags
    # a run resumed in an experiment that lost its tags (or predates them) gives them back
    client.delete_experiment_tag(old, KIND_TAG)
    client.delete_experiment_tag(old, VIEW_TAG)
    resumed = MLflowTracker(uri, output_dir=tmp_path / "a")
    resumed.start("made_by_an_older_version", "r", {}, {}, run_id=run_id)
    resumed.end()
    assert client.get_experiment(old).tags[KIND_TAG] == TRAINING_KIND and VIEW_TAG in client.get_experiment(old).tags


def test_runs_carry_a_description_and_a_source_without_passwords(uri, tmp_path, monkeypatch):
    command = [sys.executable, "-m", "rpg.main", "algo=grpo", f"tracking.uri={PASSWORD_URI}"]
    monkeypatch.setattr(sys, "orig_argv", command)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    own = run_tags(small_cfg(name="algo=grpo"), "abc123", True)
    assert "s3cret" not in str(own)  # redacted where it is made, and again by the tracker (any tag)
    tags = {"cfg": f"uri={PASSWORD_URI}", **own}
    tracker = MLflowTracker(uri, output_dir=tmp_path)
    run_id = tracker.start("e", "r", {}, tags)
    tracker.end()
    run = MlflowClient(uri).get_run(run_id)
    t = run.data.tags
    note = t["mlflow.note.content"]
    assert note.splitlines()[0] == "grpo on tiny / toy, seed 3, 7 RL steps (sweep ui)"
    assert "- varies: `algo=grpo`" in note and "git abc123 with uncommitted changes" in note
    assert "-m rpg.main algo=grpo tracking.uri=http://alice:***@127.0.0.1:9" in note
    assert "s3cret" not in str(t) and t["cfg"] == "uri=http://alice:***@127.0.0.1:9"  # every tag is redacted
    assert (t["mlflow.source.name"], t["mlflow.source.type"]) == ("rpg.main", "LOCAL")
    assert t["mlflow.source.git.commit"] == "abc123" and t["mlflow.user"]
    # under SLURM: a job, named in the description; started by a non-project entry (submitit): the loop
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "submitit.core._submit", "/tmp/x"])
    tags = run_tags(small_cfg(), "unknown", False)
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("rpg.train.loop", "JOB")
    assert "- SLURM job 77" in tags["mlflow.note.content"] and "mlflow.source.git.commit" not in tags


@pytest.mark.slow
def test_a_training_run_has_them(make_cfg):
    from rpg.train.loop import run

    cfg = make_cfg("steps=1", "eval_every=0", tracking=True)
    run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.tags["mlflow.note.content"].startswith(f"{cfg.algo.name} on tiny / toy, seed 1, 1 RL steps")
    assert r.data.tags["mlflow.source.type"] == "LOCAL" and r.data.tags["mlflow.user"]
    assert exp.tags[KIND_TAG] == TRAINING_KIND and "metrics.`train/acc`" in columns(client, exp.experiment_id)


def test_the_link_and_the_view_state():
    assert runs_url("https://alice:s3cret@mlflow.example.org/prefix/", "4") == (
        "https://mlflow.example.org/prefix/#/experiments/4/runs?workflowType=machine_learning&viewStateShareKey=rpg")
    assert runs_url("sqlite:////x/mlflow.db", "1").startswith("http://127.0.0.1:5000/#/experiments/1/runs?")
    state = view_state(None, ["kl/k3", "optim/lr"])
    assert json.loads(state)["selectedColumns"][-1] == "metrics.`kl/k3`"
    assert view_state(state, ["kl/k3", "optim/lr"]) is None  # nothing new: no write
    assert view_state("not json", []) == view_state(None, [])  # a broken view is replaced


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")),
                    reason="no chromium (apt-get install -y chromium)")
def test_the_link_opens_the_runs_in_the_training_view_in_a_browser():
    done = subprocess.run([str(REPO / "scripts" / "check_mlflow_ui.sh")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: the link opens the runs in the model-training view" in done.stdout
