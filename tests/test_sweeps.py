"""Sweeps as data (rpg.launch.sweep) and launcher settings (rpg.launch.submit), without SLURM.

Every sweeps/*.yaml file expands and composes against the schema; the skip/resubmit/submit decision is
checked against a real sqlite MLflow store; one tiny sweep runs end to end with the inline launcher.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from rpg.launch import submit as launch
from rpg.launch import sweep
from rpg.main import CONF_DIR
from rpg.tracking.identity import Terminated, config_hash
from rpg.tracking.tracker import MLflowTracker

REPO = Path(__file__).resolve().parents[1]
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
PAPER = {"main", "clip_ablation", "kl_ablation", "qwen2_5_7b"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_paper_experiment_has_a_sweep_file():
    assert {p.stem for p in SWEEP_FILES} >= PAPER | {"smoke"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_expands_and_composes(path, tmp_path):
    s = sweep.load_sweep(path)
    assert s.command.startswith(f"python -m rpg.sweep sweeps/{path.name}"), "first line: the launch command"
    assert {"model", "data", "engine"} <= set(s.base)
    runs = sweep.expand(s)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    grid_keys = [k for keys, _ in s.grid for k in keys]
    for r in runs:  # the name lists exactly the varied keys, in file order
        assert [part.split("=", 1)[0] for part in r.name.split(",")] == list(r.varied)
        assert list(r.varied) == grid_keys or r.varied in s.runs
    composed = sweep.compose_runs(s, runs, runs_root=tmp_path, check=True)  # schema + validate()
    assert len({c.config_hash for c in composed}) == len(runs), "two runs of the sweep are the same config"
    for c in composed:
        assert c.config["sweep"] == s.name and c.config["tracking"]["experiment"] == s.name
        assert c.config["out_dir"] == str(tmp_path.resolve() / s.name / c.run.name)
        assert c.config["name"] == c.run.name  # its MLflow name is its folder's
        assert c.config["model"]["name"] == s.base["model"] and c.config["engine"]["name"] == s.base["engine"]
        for key, value in c.run.varied.items():  # a group choice shows as <group>.name
            node = c.config
            for part in (f"{key}.name" if key in ("algo", "model", "data", "engine") else key).split("."):
                node = node[int(part)] if isinstance(node, list) else node[part]
            assert node == value, (c.run.name, key)
    # the fast path equals a full Hydra compose with every override on the command line
    first, last = composed[0], composed[-1]
    for c in (first, last):
        overrides = {**s.base, **c.run.varied}
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            full = compose(config_name="config", overrides=[f"{k}={sweep.format_value(v)}" for k, v in overrides.items()]
                           + [f"sweep={s.name}", f"out_dir={sweep.format_value(c.config['out_dir'])}",
                              f"name={sweep.format_value(c.run.name)}"])
        assert OmegaConf.to_container(full, resolve=True) == c.config
        assert config_hash(full) == c.config_hash


def test_paper_sweeps_cover_the_paper(tmp_path):
    main = sweep.expand(sweep.load_sweep(REPO / "sweeps" / "main.yaml"))
    algos = {r.varied["algo"] for r in main}
    assert algos == {"grpo", "dapo", "reinforce_pp", "reinforce_pp_baseline", "rpg_fkl", "rpg_rkl", "rpg_ufkl",
                     "rpg_urkl", "rpg_rf_fkl", "rpg_rf_rkl", "rpg_rf_ufkl", "rpg_rf_urkl"}
    assert len(main) == 12 * 3 * 3
    clip = sweep.expand(sweep.load_sweep(REPO / "sweeps" / "clip_ablation.yaml"))
    assert {(r.varied["algo.clip_low"], r.varied["algo.clip_high"]) for r in clip} == {(0.1, 0.1), (0.2, 0.28)}
    assert {r.varied["algo"] for r in clip} == {"rpg_rf_fkl", "rpg_rf_rkl", "rpg_rf_ufkl", "rpg_rf_urkl"}
    kl = sweep.expand(sweep.load_sweep(REPO / "sweeps" / "kl_ablation.yaml"))
    assert {(r.varied["algo.kl_coef"], r.varied["algo.ref_update"]) for r in kl} == \
        {(1e-3, "every_step"), (1e-3, "never"), (1e-4, "every_step"), (1e-4, "never")}
    smoke = sweep.expand(sweep.load_sweep(REPO / "sweeps" / "smoke.yaml"))
    assert [r.name for r in smoke] == ["algo=rpg_rf_urkl,seed=1", "algo=rpg_rf_urkl,seed=2",
                                       "algo=grpo,seed=1", "algo=grpo,seed=2"]


def test_zipped_keys_explicit_runs_and_errors(tmp_path):
    good = write(tmp_path / "z.yaml", """# python -m rpg.sweep z.yaml
name: z
model: tiny
data: toy
engine: cpu
grid:
  algo.clip_low,algo.clip_high: [[0.1, 0.1], [0.2, 0.28]]
  seed: [1, 2]
runs:
  - {algo: grpo, seed: 7, optim.lr: 1.0e-3}
""")
    runs = sweep.expand(sweep.load_sweep(good))
    assert [r.name for r in runs] == [
        "algo.clip_low=0.1,algo.clip_high=0.1,seed=1", "algo.clip_low=0.1,algo.clip_high=0.1,seed=2",
        "algo.clip_low=0.2,algo.clip_high=0.28,seed=1", "algo.clip_low=0.2,algo.clip_high=0.28,seed=2",
        "algo=grpo,seed=7,optim.lr=0.001"]
    cfg = sweep.compose_runs(sweep.load_sweep(good), runs[-1:], ["steps=3"], tmp_path)[0].config
    assert (cfg["algo"]["name"], cfg["seed"], cfg["optim"]["lr"], cfg["steps"]) == ("grpo", 7, 1e-3, 3)

    bad_key = write(tmp_path / "b.yaml", good.read_text().replace("seed: [1, 2]", "algo.not_a_key: [1, 2]"))
    with pytest.raises(sweep.SweepError, match="not_a_key"):
        sweep.compose_runs(sweep.load_sweep(bad_key), sweep.expand(sweep.load_sweep(bad_key)), (), tmp_path)
    dup = write(tmp_path / "d.yaml", good.read_text().replace("seed: 7", "seed: 1").replace(", optim.lr: 1.0e-3", "")
                .replace("algo: grpo, ", "algo.clip_low: 0.1, algo.clip_high: 0.1, "))
    with pytest.raises(sweep.SweepError, match="duplicate"):
        sweep.expand(sweep.load_sweep(dup))
    same = write(tmp_path / "s.yaml", good.read_text().replace("seed: 7, optim.lr: 1.0e-3", "seed: 1")
                 .replace("algo: grpo, ", "algo.clip_high: 0.1, algo.clip_low: 0.1, "))
    with pytest.raises(sweep.SweepError, match="are the same config"):  # same values, other key order
        sweep.compose_runs(sweep.load_sweep(same), sweep.expand(sweep.load_sweep(same)), (), tmp_path)
    with pytest.raises(sweep.SweepError, match="set `engine:`"):
        sweep.load_sweep(write(tmp_path / "e.yaml", "name: e\nmodel: tiny\ndata: toy\n"))
    with pytest.raises(sweep.SweepError, match="unknown keys"):
        sweep.load_sweep(write(tmp_path / "u.yaml", good.read_text() + "gird: {}\n"))
    with pytest.raises(sweep.SweepError, match="sweep is set by"):
        sweep.compose_runs(sweep.load_sweep(good), runs, ["sweep=other"], tmp_path)
    with pytest.raises(sweep.SweepError, match="parallel=0; set it to the number of runs at a time"):
        sweep.load_sweep(write(tmp_path / "p.yaml", good.read_text() + "parallel: 0\n"))
    assert sweep.load_sweep(write(tmp_path / "p2.yaml", good.read_text() + "parallel: 2\n")).parallel == 2


def test_parallel_is_refused_where_a_launcher_places_the_jobs(tmp_path, capsys):
    path = write(tmp_path / "q.yaml", SMALL.format(path="q.yaml", name="q"))
    assert sweep.main([str(path), "--launcher", "local", "--parallel", "2", "--runs-root", str(tmp_path)]) == 2
    assert "--parallel 2: runs at a time (>= 1) with --launcher inline" in capsys.readouterr().err


SMALL = """# python -m rpg.sweep {path}
name: {name}
model: tiny
data: toy
engine: cpu
fixed:
  steps: 2
  eval_every: 2
  rollout.prompts_per_step: 4
  rollout.samples_per_prompt: 4
  ppo.mini_batch_size: 16
  ppo.micro_batch_size: 8
  data.eval_sets.0.max_problems: 8
  data.eval_sets.0.k: 2
  model.warm_start.sft_steps: 40
grid:
  algo: [rpg_rf_urkl, grpo]
  seed: [1, 2, 3]
"""


def test_status_logic_on_a_real_mlflow_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write(tmp_path / "st.yaml", SMALL.format(path="st.yaml", name="status_demo"))
    extra = [f"tracking.uri={uri}"]
    plans, got_uri, experiment = sweep.plan(sweep.load_sweep(path), extra, tmp_path / "runs")
    assert (got_uri, experiment) == (uri, "status_demo")
    assert [(p.state, p.action) for p in plans] == [("missing", "submit")] * 6

    elsewhere = tmp_path / "old_place"
    elsewhere.mkdir()
    # FINISHED, FAILED (its out_dir elsewhere), RUNNING, KILLED; a FINISHED run of another config
    statuses, running = {0: "FINISHED", 1: "FAILED", 2: None, 3: "KILLED"}, None
    for i, status in statuses.items():
        tracker = MLflowTracker(uri, output_dir=tmp_path / f"t{i}")
        out_dir = elsewhere if i == 1 else plans[i].config["out_dir"]
        tracker.start("status_demo", f"r{i}", {}, {"config_hash": plans[i].config_hash, "out_dir": out_dir})
        if status:
            tracker.end(status)
        else:
            running = tracker
    other = MLflowTracker(uri, output_dir=tmp_path / "t9")
    other.start("status_demo", "other", {}, {"config_hash": "0000000000000000"})
    other.end("FINISHED")
    # run 4 was submitted to a local job that is still alive (this process); run 5 to one that is gone
    launch.append_record(plans[4].config["out_dir"], event="submitted", launcher="local", job_id=str(os.getpid()))
    launch.append_record(plans[5].config["out_dir"], event="submitted", launcher="local", job_id="999999999")

    plans, _, _ = sweep.plan(sweep.load_sweep(path), extra, tmp_path / "runs")
    assert [(p.state, p.action) for p in plans] == [
        ("finished", "skip"), ("failed", "resubmit"), ("running", "skip"), ("killed", "resubmit"),
        ("queued", "skip"), ("missing", "submit")]
    assert plans[1].config["out_dir"] == str(elsewhere), "a failed run resumes where its checkpoints are"
    assert plans[3].config["out_dir"].endswith("status_demo/algo=grpo,seed=1")
    assert plans[4].job == str(os.getpid()) and plans[0].mlflow_run is not None

    # a newer run of the same config wins: FAILED then FINISHED -> finished
    again = MLflowTracker(uri, output_dir=tmp_path / "t1b")
    again.start("status_demo", "r1-again", {}, {"config_hash": plans[1].config_hash})
    again.end("FINISHED")
    plans, _, _ = sweep.plan(sweep.load_sweep(path), extra, tmp_path / "runs")
    assert plans[1].state == "finished"

    # the CLI prints the table and submits nothing with --status
    code = sweep.main([str(path), "--status", "--runs-root", str(tmp_path / "runs"), *extra])
    assert code == 0
    assert len(MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("status_demo").experiment_id])) == 6
    running.end("KILLED")


def test_launcher_params_match_the_hydra_launcher(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hcfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "cluster=local_test"],
                       return_hydra_config=True)
        run_cfg = compose(config_name="config", overrides=["engine=gpu"])
    hydra_launcher = OmegaConf.to_container(hcfg.hydra.launcher, resolve=False)
    params = launch.launcher_params("slurm", "local_test", run_cfg, folder=str(tmp_path / "%j"), name="rpg-x")
    for key in ("partition", "cpus_per_task", "mem_gb", "timeout_min", "signal_delay_s", "max_num_timeout",
                "additional_parameters", "array_parallelism"):
        assert params[key] == hydra_launcher[key], key
    assert hydra_launcher["gpus_per_node"] == "${engine.num_gpus}"
    assert params["gpus_per_node"] == 8  # resolved against the run: engine=gpu
    assert (params["tasks_per_node"], params["nodes"]) == (8, 1)  # FSDP: one task per GPU
    assert params["max_num_timeout"] >= 1 and params["additional_parameters"]["requeue"] is True
    assert (params["submitit_folder"], params["name"]) == (str(tmp_path / "%j"), "rpg-x")
    gpu8 = launch.launcher_params("slurm", "gpu8", run_cfg)
    assert (gpu8["partition"], gpu8["gpus_per_node"], gpu8["additional_parameters"]) == \
        ("gpu", 8, {"requeue": True, "exclusive": True})
    assert all("${" not in line for line in gpu8["setup"])
    cpu = launch.launcher_params("slurm", "local_test", {"engine": launch.ONE_PROCESS_ENGINE})
    assert (cpu["tasks_per_node"], cpu["gpus_per_node"]) == (1, 0)
    cpu_fsdp = {**launch.ONE_PROCESS_ENGINE, "backend": "fsdp", "ranks_per_node": 2}
    assert launch.launcher_params("slurm", "local_test", {"engine": cpu_fsdp})["tasks_per_node"] == 2
    local = launch.launcher_params("local", None, {"engine": {"num_gpus": 0}})
    assert local["timeout_min"] >= 60 * 24 and local["gpus_per_node"] == 0
    with pytest.raises(ValueError, match=re.escape(str(launch.profile_names()))):
        launch.launcher_params("slurm", "no_such_site")
    executor = launch.make_executor("slurm", params)  # builds without a cluster
    assert executor.parameters["partition"] == "debug" and executor.parameters["signal_delay_s"] == 30
    assert executor.parameters["additional_parameters"] == {"requeue": True}


@pytest.mark.slow
def test_inline_sweep_runs_then_skips(tmp_path, cache_dir, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write(tmp_path / "one.yaml", SMALL.format(path="one.yaml", name="inline_demo")
                 .replace("algo: [rpg_rf_urkl, grpo]", "algo: [rpg_rf_urkl]").replace("[1, 2, 3]", "[1]"))
    args = [str(path), "--launcher", "inline", "--runs-root", str(tmp_path / "runs"), f"tracking.uri={uri}",
            f"cache_dir={cache_dir}", "engine.torch_threads=1"]
    assert sweep.main(args + ["--wait"]) == 0
    plans, _, _ = sweep.plan(sweep.load_sweep(path), args[5:], tmp_path / "runs")
    assert [(p.state, p.action) for p in plans] == [("finished", "skip")]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("inline_demo").experiment_id])
    assert run.data.tags["config_hash"] == plans[0].config_hash and run.data.tags["sweep"] == "inline_demo"
    assert run.data.tags["out_dir"] == str(tmp_path.resolve() / "runs" / "inline_demo" / "algo=rpg_rf_urkl,seed=1")
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert "0 to submit" in capsys.readouterr().out
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_an_inline_sweep_with_a_failed_run_says_so(tmp_path, cache_dir, capsys):
    """A run that fails before its MLflow run exists: the sweep exits 1, its table shows the run failed with
    the error and the traceback file, --status too, and the finished run's accuracy."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    text = SMALL.format(path="two.yaml", name="fails").replace("algo: [rpg_rf_urkl, grpo]", "algo: [rpg_rf_urkl]") \
        .replace("[1, 2, 3]", "[1]") + "runs:\n  - {seed: 2, model.kind: pretrained, model.path: /nonexistent/model}\n"
    path = write(tmp_path / "two.yaml", text)
    args = [str(path), "--launcher", "inline", "--runs-root", str(tmp_path / "runs"), f"tracking.uri={uri}",
            f"cache_dir={cache_dir}", "engine.torch_threads=1"]
    assert sweep.main(args) == 1
    table = capsys.readouterr().out.splitlines()[::-1]  # the table after the runs comes last
    done = next(line for line in table if line.startswith("algo=rpg_rf_urkl,seed=1 "))
    failed = next(line for line in table if "seed=2" in line and "model.path" in line)
    assert " finished " in done and "toy greedy_acc 0." in done and "mean_at_2 0." in done
    failed_dir = tmp_path / "runs" / "fails" / failed.split()[0]
    assert " failed " in failed and "FileNotFoundError: model.path=/nonexistent/model" in failed
    assert str(failed_dir / "traceback.txt") in failed
    assert "Traceback (most recent call last)" in (failed_dir / "traceback.txt").read_text()
    assert sweep.main(args + ["--status"]) == 0
    status = capsys.readouterr().out
    assert "failed    resubmit" in status and "1 failed, 1 finished; 1 to submit" in status


def test_sigterm_during_a_stop_lets_the_shutdown_finish(tmp_path):
    # SLURM sends SIGTERM right after a job requeues itself (submitit raises SystemExit on USR2): the
    # trainer's shutdown (MLflow flush, KILLED) must not be cut short; a SIGTERM at any other time stops it.
    script = tmp_path / "sig.py"
    script.write_text(
        "import os, signal, time\n"
        "from rpg.tracking.identity import Terminated, raise_on_sigterm\n"
        "raise_on_sigterm()\n"
        "log = []\n"
        "try:\n"
        "    try:\n"
        "        raise SystemExit(-1)\n"
        "    except SystemExit:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)\n"
        "        log.append('shutdown finished')\n"
        "        raise\n"
        "except SystemExit:\n"
        "    pass\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "except Terminated:\n"
        "    log.append('terminated')\n"
        "print(log)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.strip() == "['shutdown finished', 'terminated']", out.stderr
    assert not issubclass(Terminated, Exception)  # job wrappers catching Exception do not report it as failed


def test_every_paper_sweep_run_has_its_own_name(tmp_path):
    # the clip ablation's two clip settings used to share one MLflow name per algo and seed
    from rpg.tracking.identity import run_name

    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        s = sweep.load_sweep(path)
        names = [run_name(OmegaConf.create(c.config)) for c in sweep.compose_runs(s, sweep.expand(s), runs_root=tmp_path)]
        assert len(set(names)) == len(names), path.name


def test_a_path_valued_setting_names_its_run_by_the_last_part():
    from rpg.tracking.identity import settings_name

    assert settings_name({"model.path": "/models/qwen3-4b", "seed": 1}) == "model.path=qwen3-4b,seed=1"
    with pytest.raises(ValueError, match="no usable run name"):
        settings_name({})


def test_a_run_is_stale_only_when_its_folder_lock_is_free_and_its_sweep_is_gone(tmp_path):
    from rpg.tracking.identity import LOCK_FILE

    assert not launch.abandoned(tmp_path)  # never started here: nothing says it is gone
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not launch.abandoned(tmp_path)  # a trainer holds it
    finally:
        holder.kill()
        holder.wait()
    assert launch.abandoned(tmp_path)  # released by the kernel on SIGKILL
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another sweep command
    try:
        records = [{"launcher": "inline", "job_id": str(other.pid), "host": host},
                   {"launcher": "inline", "job_id": str(dead.pid), "host": host},
                   {"launcher": "inline", "job_id": str(os.getpid()), "host": host},  # this one runs nothing now
                   {"launcher": "inline", "job_id": str(other.pid + 1), "host": host + "-elsewhere"}]
        assert launch.live_jobs(records) == {str(other.pid)}  # the sweep that owns its runs still lives
    finally:
        other.kill()
        other.wait()
