"""The CPU replication (sweeps/cpu_replication.yaml): its testbed is built the same on every CPU kernel set,
and a shortened copy of the sweep runs two at a time, resumes after a SIGKILL, and goes through the analysis
to every table and figure the README shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

import torch

from rpg.launch import sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "cpu_replication.yaml"

#: The testbed one replication run trains on, hashed: its composed config, training prompts, held-out
#: problems and initial policy weights.
TESTBED_HASH = """
import dataclasses, hashlib, json, sys
import torch
from omegaconf import OmegaConf
from rpg.config import RunConfig
from rpg.launch.sweep import compose_runs, expand, load_sweep
from rpg.train.build import build_data, build_policy

s = load_sweep(sys.argv[1])
(run,) = [r for r in expand(s) if r.varied == {"algo": "rpg_rf_urkl", "seed": 1}]
(c,) = compose_runs(s, [run], [f"cache_dir={sys.argv[2]}"], sys.argv[3])
cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), c.config)
digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
train, evals = build_data(cfg)
model, _, info = build_policy(cfg)
weights = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    weights.update(k.encode() + v.contiguous().numpy().tobytes())
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "config": c.config_hash,
                  "train": digest(dataclasses.asdict(train)), "eval": digest([dataclasses.asdict(e) for e in evals]),
                  "weights": weights.hexdigest(), "warm_start": info["warm_start_path"]}))
"""


def kernel_sets() -> list[str]:
    """The scalar set, AVX2, and AVX-512 where this CPU has it."""
    native = torch.backends.cpu.get_cpu_capability()
    return ["default", "avx2"] + (["avx512"] if native.startswith("AVX512") else [])


def test_the_testbed_is_built_the_same_on_every_kernel_set(tmp_path):
    from rpg.models.warmstart import SHIPPED_DIR

    results = []
    for capability in kernel_sets():
        proc = subprocess.run([sys.executable, "-c", TESTBED_HASH, str(SWEEP), str(tmp_path / "cache"),
                               str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert len({r["capability"] for r in results}) == len(results), results  # the pins took effect
    for key in ("config", "train", "eval", "weights", "warm_start"):
        assert len({r[key] for r in results}) == 1, (key, results)
    assert results[0]["warm_start"] == str(SHIPPED_DIR)  # shipped weights, nothing trained on this host
    assert not (tmp_path / "cache" / "warmstart").exists() or not any((tmp_path / "cache" / "warmstart").iterdir())


def test_the_replication_holds_every_algorithm_five_seeds_and_both_ablations():
    s = sweep.load_sweep(SWEEP)
    runs = sweep.expand(s)
    algos = {r.varied["algo"] for r in runs}
    assert algos == {p.stem for p in (ROOT / "conf" / "algo").glob("*.yaml")}
    plain = [r for r in runs if set(r.varied) == {"algo", "seed"}]
    assert len(plain) == 13 * 5 and {r.varied["seed"] for r in plain} == {1, 2, 3, 4, 5}
    variants = {tuple(sorted((k, v) for k, v in r.varied.items() if k != "seed")) for r in runs if r not in plain}
    assert len(variants) == 4 and len(runs) == 65 + 4 * 5
    assert s.launcher == "inline" and s.parallel == 2
    # the frozen-reference variant is the one that logs the exact KLs (ref = old makes them 0)
    frozen = [r for r in runs if r.varied.get("algo.ref_update") == "never" and r not in plain]
    assert frozen and all(r.varied.get("tracking.exact_kl") is True for r in frozen)


def shortened(tmp_path: Path, seeds=(1, 2), steps: int = 4) -> Path:
    """The replication sweep with 3 algorithms and fewer seeds, steps and held-out problems; the same ablations."""
    d = yaml.safe_load(SWEEP.read_text())
    d["grid"] = {"algo": ["rpg_rf_urkl", "grpo", "dapo"], "seed": list(seeds)}
    d["runs"] = [r for r in d["runs"] if r["seed"] in seeds]
    d["fixed"].update({"steps": steps, "eval_every": 2, "save_every": 2, "data.eval_sets.0.max_problems": 16,
                       "rollout.prompts_per_step": 8})
    path = tmp_path / "short.yaml"
    path.write_text(f"# python -m rpg.sweep {path}\n" + yaml.safe_dump(d, sort_keys=False))
    return path


def sweep_command(path: Path, tmp_path: Path, cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rpg.sweep", str(path), "--runs-root", str(tmp_path / "runs"),
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"cache_dir={cache_dir}"]


def in_progress(runs_root: Path) -> list[Path]:
    """Run folders with a checkpoint and no final metrics yet."""
    return [d for d in runs_root.glob("*/*") if (d / "checkpoints" / "latest").is_file()
            and not (d / "final_metrics.json").is_file()]


@pytest.mark.slow  # ~2.5 min: 14 short runs, two at a time, one of them killed and resumed, then the analysis
def test_a_shortened_replication_resumes_after_sigkill_and_the_analysis_draws_everything(tmp_path, cache_dir):
    path = shortened(tmp_path, steps=12)
    cmd = sweep_command(path, tmp_path, cache_dir)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while not in_progress(tmp_path / "runs") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    killed = in_progress(tmp_path / "runs")
    assert killed, "no run was caught mid-way"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers: no handler runs, MLflow keeps RUNNING
    proc.wait(timeout=30)

    status = subprocess.run(cmd + ["--status"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    stale = [line.split()[0] for line in status.stdout.splitlines() if "  stale  " in line]
    assert {d.name for d in killed} <= set(stale), status.stdout

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "14 runs: 14 finished" in again.stdout and "[1/" in again.stdout  # progress, one line per run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cpu_replication")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 14 and {r.info.status for r in runs} == {"FINISHED"}  # resumed, none started twice
    for d in killed:
        starts = [json.loads(x) for x in (d / "jobs.jsonl").read_text().splitlines() if '"start"' in x]
        assert starts[-1]["resume_step"] > 0, starts  # continued from its checkpoint
        assert (d / "run.log").is_file()

    out = tmp_path / "out"
    analysis = subprocess.run([sys.executable, "-m", "analysis", "--experiment", "cpu_replication",
                               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--baseline", "grpo,dapo",
                               "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    assert "skipped" not in analysis.stdout, analysis.stdout
    for name in ("last_best.md", "last_best.csv", "paired_vs_grpo.md", "paired_vs_dapo.md", "verdicts.md", "status.md"):
        assert (out / "tables" / name).is_file(), name
    for name in ("dynamics", "ablation_clip", "ablation_kl", "estimator_bias"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 20_000, name
    table = (out / "tables" / "last_best.md").read_text()
    for method in ("GRPO", "DAPO", "RPG-REINFORCE-URKL |", "[kl_coef=0]", "[ref_update=never]", "clip_low=0.1",
                   "clip_low=None"):
        assert method in table, (method, table)
    import pandas as pd

    for base in ("GRPO", "DAPO"):
        paired = pd.read_csv(out / "tables" / f"paired_vs_{base.lower()}.csv")
        assert len(paired) == 6 * 2 and set(paired["baseline"]) == {base}  # 6 other methods x Last/Best
        assert (paired["n_pairs"] == 2).all() and "holds" not in set(paired["verdict"])  # 2 seeds cover 50%
    assert "0 of 24 comparisons hold" in (out / "tables" / "verdicts.md").read_text()
