"""Sweeps on the real local SLURM cluster, with the real trainer (tiny model) and a real MLflow store.

A 2x2 Hydra multirun through hydra/launcher=slurm; a half-finished sweep re-issued with
``python -m rpg.sweep`` (only the missing runs go out, one of them failing on purpose); a training job
preempted with USR2, requeued and resumed from its checkpoint into the same MLflow run, compared with an
uninterrupted run of the same config; the MLflow server as a SLURM job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rpg.launch import submit as launch
from rpg.launch import sweep
from rpg.tracking.server import healthy

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SWEEP = "slurm_sweep"
#: Small but real runs; one thread each (the node has 2 CPUs, one per job).
JOB = {"model.warm_start.sft_steps": 40, "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 4,
       "ppo.mini_batch_size": 16, "ppo.micro_batch_size": 8, "data.eval_sets.0.max_problems": 8,
       "data.eval_sets.0.k": 2, "steps": 2, "eval_every": 2, "engine.torch_threads": 1}


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return proc


def sweep_file(path: Path, name: str, fixed: dict, grid: dict, runs: list[dict] = ()) -> Path:
    body = {"name": name, "model": "tiny", "data": "toy", "engine": "cpu", "fixed": fixed, "grid": grid,
            "runs": list(runs)}
    path.write_text(f"# python -m rpg.sweep {path}\n" + json.dumps(body, indent=1) + "\n")  # JSON is YAML
    return path


def experiment_runs(uri: str, name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, (client.search_runs([exp.experiment_id], max_results=1000) if exp else [])


@pytest.fixture(scope="module")
def hydra_sweep(slurm_cluster, tmp_path_factory, cache_dir):
    """`python -m rpg.main -m algo=rpg_rf_urkl,grpo seed=1,2 hydra/launcher=slurm cluster=local_test`."""
    root = tmp_path_factory.mktemp("sweeps")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the schema once, before four jobs race to
    t0 = time.monotonic()
    proc = cli("-m", "rpg.main", "-m", "algo=rpg_rf_urkl,grpo", "seed=1,2", "hydra/launcher=slurm",
               "cluster=local_test", f"hydra.sweep.dir={root / 'multirun'}", "hydra.sweep.subdir=${hydra.job.num}",
               f"sweep={SWEEP}", f"tracking.uri={uri}", f"cache_dir={cache_dir}",
               *[f"{k}={v}" for k, v in JOB.items()], cwd=root)
    return {"root": root, "uri": uri, "proc": proc, "seconds": time.monotonic() - t0, "cache_dir": cache_dir}


def test_hydra_multirun_on_slurm_is_one_array_of_four_finished_runs(hydra_sweep, slurm_cluster, record_property):
    proc, root = hydra_sweep["proc"], hydra_sweep["root"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, runs = experiment_runs(hydra_sweep["uri"], SWEEP)
    assert sorted((r.data.tags["algo"], r.data.tags["seed"]) for r in runs) == \
        [("grpo", "1"), ("grpo", "2"), ("rpg_rf_urkl", "1"), ("rpg_rf_urkl", "2")]
    assert [r.info.status for r in runs] == ["FINISHED"] * 4
    assert len({r.data.tags["config_hash"] for r in runs}) == 4
    for r in runs:
        assert Path(r.data.tags["out_dir"]).parent == root / "multirun"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/acc")] == [1, 2]
        assert r.data.params["engine.torch_threads"] == "1" and r.data.tags["sweep"] == SWEEP
    job_dirs = sorted(p.name for p in (root / "multirun" / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    arrays = {d.split("_")[0] for d in job_dirs}
    assert len(arrays) == 1 and sorted(d.split("_")[1] for d in job_dirs) == ["0", "1", "2", "3"], job_dirs
    for d in job_dirs:
        assert slurm_cluster.wait_sacct_state(d, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    record_property("hydra_2x2_sweep_s", round(hydra_sweep["seconds"], 1))


def test_reissued_sweep_submits_only_missing_runs(hydra_sweep, slurm_cluster, tmp_path):
    root, uri = hydra_sweep["root"], hydra_sweep["uri"]
    failing = {"algo": "rpg_rf_fkl", "seed": 1, "algo.kl_coef": 1.0, "optim.lr": 1.0e30}  # non-finite loss
    path = sweep_file(tmp_path / "half.yaml", SWEEP, JOB, {"algo": ["rpg_rf_urkl", "grpo"], "seed": [1, 2, 3]},
                      [failing])
    args = ["-m", "rpg.launch.sweep", str(path), "--launcher", "slurm", "--profile", "local_test", "--runs-root",
            str(root / "runs"), f"tracking.uri={uri}", f"cache_dir={hydra_sweep['cache_dir']}"]
    _, before = experiment_runs(uri, SWEEP)

    dry = cli(*args, "--dry-run", cwd=root)
    assert dry.returncode == 0, dry.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:3] for line in dry.stdout.splitlines() if line.startswith("algo=")}
    assert rows == {"algo=rpg_rf_urkl,seed=1": ["finished", "skip"], "algo=rpg_rf_urkl,seed=2": ["finished", "skip"],
                    "algo=rpg_rf_urkl,seed=3": ["missing", "submit"], "algo=grpo,seed=1": ["finished", "skip"],
                    "algo=grpo,seed=2": ["finished", "skip"], "algo=grpo,seed=3": ["missing", "submit"],
                    "algo=rpg_rf_fkl,seed=1,algo.kl_coef=1.0,optim.lr=1e+30": ["missing", "submit"]}, dry.stdout
    assert "would submit 3 runs" in dry.stdout and not (root / "runs" / SWEEP / ".submitit").exists()

    t0 = time.monotonic()
    done = cli(*args, "--wait", cwd=root)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # one run failed on purpose
    assert "submitted 3 runs (slurm, profile local_test) as job array" in done.stdout
    array = done.stdout.split("as job array ")[1].split()[0]
    (error,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]  # the failed run, its log
    assert error.startswith(f"error: job {array}_2: ") and "_log.err" in error, done.stderr[-2000:]
    tasks = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", array, "-o", "JobID,State").split()
    assert sorted(t.split("|")[0] for t in tasks) == [f"{array}_{i}" for i in range(3)], tasks

    client, after = experiment_runs(uri, SWEEP)
    by_hash: dict[str, list] = {}
    for r in after:
        by_hash.setdefault(r.data.tags["config_hash"], []).append(r)
    assert all(len(v) == 1 for v in by_hash.values()), "a finished run was submitted again"
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in after} and len(after) == 7
    new = {r.data.tags["out_dir"].rsplit("/", 1)[1]: r for r in after if r.info.run_id not in {b.info.run_id for b in before}}
    assert {k: r.info.status for k, r in new.items()} == {
        "algo=rpg_rf_urkl,seed=3": "FINISHED", "algo=grpo,seed=3": "FINISHED",
        "algo=rpg_rf_fkl,seed=1,algo.kl_coef=1.0,optim.lr=1e+30": "FAILED"}
    failed = new["algo=rpg_rf_fkl,seed=1,algo.kl_coef=1.0,optim.lr=1e+30"]
    assert "traceback.txt" in [f.path for f in client.list_artifacts(failed.info.run_id)]

    status = cli(*args, "--status", cwd=root)
    assert "6 finished" in status.stdout and "1 failed" in status.stdout and "1 to submit" in status.stdout
    print(f"\nre-issue: 3 of 7 runs submitted and finished in {time.monotonic() - t0:.1f}s")


#: Long enough that the job is still training when USR2 arrives after its 2nd checkpoint: at 8 steps a run
#: on a fast CPU (~0.1 s/step) had finished before the signal was handled, and was never requeued.
N_PREEMPT = 30
#: Overlong shaping makes rewards differ within a group, so the tiny model gets real updates.
PREEMPT = {**JOB, "steps": N_PREEMPT, "eval_every": 10, "algo": "rpg_rf_urkl", "algo.overlong_buffer_frac": 0.5}


@pytest.fixture(scope="module")
def reference(slurm_cluster, tmp_path_factory, cache_dir):
    """An uninterrupted run of the preemption tests' config (submitted now, waited for by the tests)."""
    root = tmp_path_factory.mktemp("preempt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    common = ["--launcher", "slurm", "--profile", "local_test", "--runs-root", str(root / "runs"),
              f"tracking.uri={uri}", f"cache_dir={cache_dir}"]
    assert sweep.main([str(sweep_file(root / "ref.yaml", "preempt_ref", PREEMPT, {"seed": [1]})), *common]) == 0
    return {"root": root, "uri": uri, "common": common, "out": root / "runs" / "preempt_ref" / "seed=1"}


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(poll)
    return value


def preempt(slurm_cluster, jid: str, out: Path) -> tuple[float, float]:
    """USR2 once the run has written its 2nd checkpoint, then release the requeued job early."""
    wait_for(lambda: (out / "checkpoints" / "step_2.pt").exists(), 150, f"job {jid} to reach step 2")
    t_signal = time.time()
    slurm_cluster.run("scancel", "--signal", "USR2", jid)
    wait_for(lambda: slurm_cluster.squeue_state(jid)[0] == "PENDING", 60, f"job {jid} to be requeued")
    t_pending = time.time()
    slurm_cluster.run("scontrol", "update", f"JobId={jid}", "StartTime=now+2")  # skip the 11 s hold
    return t_signal, t_pending


def finished_run(uri: str, experiment: str):
    """The experiment's single run once it has FINISHED or FAILED (a preempted run is KILLED meanwhile)."""
    def done():
        _, runs = experiment_runs(uri, experiment)
        return runs[0] if len(runs) == 1 and runs[0].info.status in ("FINISHED", "FAILED") else None
    return wait_for(done, 240, f"the run of {experiment} to end", poll=0.5)


def check_resumed(slurm_cluster, reference, run, out: Path, jid: str, resume_step: int, t_signal: float,
                  record_property, label: str) -> None:
    """Same MLflow run, continuous steps, same metrics and final parameters as the uninterrupted run."""
    client = MlflowClient(reference["uri"])
    ref_run = finished_run(reference["uri"], "preempt_ref")
    assert (run.info.status, ref_run.info.status) == ("FINISHED", "FINISHED")
    assert run.data.tags["config_hash"] == ref_run.data.tags["config_hash"]
    assert (out / "run_id.txt").read_text().strip() == run.info.run_id  # resumed into the same run
    assert 2 <= resume_step < N_PREEMPT
    assert slurm_cluster.wait_sacct_state(jid, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    history = slurm_cluster.run("sacct", "-D", "-X", "-n", "-P", "-j", jid, "-o", "State").split()
    assert history == ["REQUEUED", "COMPLETED"], history
    for key in ("train/acc", "train/score_mean", "optim/grad_norm", "kl/k3"):
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        want = sorted((m.step, m.value) for m in client.get_metric_history(ref_run.info.run_id, key))
        assert sorted({st for st, _ in got}) == list(range(1, N_PREEMPT + 1)), (key, got)  # continuous steps
        assert sorted(set(got)) == want, key  # a step logged twice (lost with the process) has equal values
    grads = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "optim/grad_norm")}
    assert any(grads[st] > 0 for st in range(resume_step + 1, N_PREEMPT + 1)), "no update after the resume"
    final = torch.load(out / "checkpoints" / f"step_{N_PREEMPT}.pt", weights_only=False)["model"]
    ref_final = torch.load(reference["out"] / "checkpoints" / f"step_{N_PREEMPT}.pt", weights_only=False)["model"]
    assert final.keys() == ref_final.keys()
    for k in final:
        torch.testing.assert_close(final[k], ref_final[k], atol=0, rtol=0, msg=k)
    resumed = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "train/acc")
                  if m.step == resume_step + 1) / 1000
    record_property(f"{label}_usr2_to_next_step_s", round(resumed - t_signal, 2))
    print(f"\n{label}: resumed at step {resume_step}; USR2 -> first resumed step logged {resumed - t_signal:.1f}s")
    assert resumed - t_signal < 90


def test_preempted_sweep_job_resumes_into_the_same_mlflow_run(slurm_cluster, reference, record_property):
    root, uri = reference["root"], reference["uri"]
    pre = sweep_file(root / "pre.yaml", "preempt_sweep", PREEMPT, {"seed": [1]})
    assert sweep.main([str(pre), *reference["common"]]) == 0
    out = root / "runs" / "preempt_sweep" / "seed=1"
    jid = launch.read_records(out)[0]["job_id"]
    t_signal, t_pending = preempt(slurm_cluster, jid, out)
    run = finished_run(uri, "preempt_sweep")
    events = launch.read_records(out)
    assert [e["event"] for e in events] == ["submitted", "start", "preempted", "start"], events
    starts = [e for e in events if e["event"] == "start"]
    assert starts[0]["resume_step"] == 0
    check_resumed(slurm_cluster, reference, run, out, jid, starts[1]["resume_step"], t_signal, record_property,
                  "sweep")
    record_property("sweep_usr2_to_pending_s", round(t_pending - t_signal, 2))
    record_property("sweep_usr2_to_restart_s", round(starts[1]["time"] - t_signal, 2))
    print(f"sweep: USR2 -> PENDING {t_pending - t_signal:.1f}s, -> job restarted {starts[1]['time'] - t_signal:.1f}s")


def test_preempted_hydra_job_resumes_into_the_same_mlflow_run(slurm_cluster, reference, cache_dir, record_property):
    root, uri = reference["root"], reference["uri"]
    multirun = root / "multirun"
    cmd = [sys.executable, "-m", "rpg.main", "-m", "seed=1", "hydra/launcher=slurm", "cluster=local_test",
           f"hydra.sweep.dir={multirun}", "hydra.sweep.subdir=${hydra.job.num}", "sweep=preempt_hydra",
           f"tracking.uri={uri}", f"cache_dir={cache_dir}", *[f"{k}={v}" for k, v in PREEMPT.items()]]
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        jid = wait_for(lambda: next((p.name for p in (multirun / ".submitit").glob("[0-9]*") if p.is_dir()), None)
                       if (multirun / ".submitit").is_dir() else None, 60, "the Hydra job to be submitted")
        t_signal, _ = preempt(slurm_cluster, jid, multirun / "0")
        output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    run = finished_run(uri, "preempt_hydra")
    log = (multirun / "0" / "main.log").read_text()
    resume_step = int(log.split("checkpoints at step ")[1].split()[0])
    check_resumed(slurm_cluster, reference, run, multirun / "0", jid, resume_step, t_signal, record_property,
                  "hydra")


def test_tracking_server_runs_as_a_slurm_job(slurm_cluster, tmp_path):
    address = tmp_path / "tracking_address"
    proc = cli("-m", "rpg.launch.submit", "server", "--profile", "local_test", "--address-file", str(address),
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1", "--hours", "0.2",
               "--timeout", "120", cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jid = proc.stdout.split("submitted tracking server job ")[1].split(";")[0]
    url = address.read_text().strip()
    assert url.startswith("http://") and healthy(url.replace(url.split("//")[1].split(":")[0], "127.0.0.1"))
    base = url.replace(url.split("//")[1].split(":")[0], "127.0.0.1")
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=5", timeout=10) as r:
        assert r.status == 200 and "experiments" in json.loads(r.read())
    slurm_cluster.run("scancel", jid)
    deadline = time.monotonic() + 30
    while address.exists():  # the job stops the server and removes the address on SIGTERM
        assert time.monotonic() < deadline, "address file left behind after scancel"
        time.sleep(0.2)
    assert slurm_cluster.wait_sacct_state(jid, {"CANCELLED", "COMPLETED", "FAILED"}) in {"CANCELLED", "COMPLETED"}
