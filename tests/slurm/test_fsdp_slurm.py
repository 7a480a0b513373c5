"""FSDP ranks started as SLURM tasks: two tasks of one job join one process group from their SLURM
environment (translated to torchrun's as rpg.launch.ranks.start does, then rpg.backend.fsdp.init_distributed), as
the GPU path starts one task per GPU;
and a whole FSDP training run launched with hydra/launcher=slurm as one job of two tasks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cloudpickle
import submitit
from mlflow.tracking import MlflowClient

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def join_and_reduce() -> tuple[int, int, float, str]:
    import os

    import torch
    import torch.distributed as dist

    from rpg.backend.fsdp import init_distributed
    from rpg.launch.submit import export_torch_distributed_env

    export_torch_distributed_env()  # what rpg.launch.ranks.start does in a SLURM task before the trainer joins
    init_distributed("cpu", timeout_s=60)
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    out = (dist.get_rank(), dist.get_world_size(), t.item(), os.environ["MASTER_ADDR"])
    dist.destroy_process_group()
    return out


def test_two_slurm_tasks_form_one_process_group(slurm_cluster, tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    # the test cluster's node name (localnode) does not resolve: give the address as a site would
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=2, tasks_per_node=2, nodes=1,
                               slurm_partition=slurm_cluster.partition, slurm_setup=["export MASTER_ADDR=127.0.0.1"])
    job = executor.submit(join_and_reduce)
    results = job.results()  # one per task
    assert sorted(r[:3] for r in results) == [(0, 2, 3.0), (1, 2, 3.0)], (results, job.stderr())
    assert {r[3] for r in results} == {"127.0.0.1"}


def test_fsdp_run_through_the_hydra_slurm_launcher(slurm_cluster, tmp_path, cache_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "rpg.main", "-m", "seed=1", "hydra/launcher=slurm", "cluster=local_test",
         "engine.backend=fsdp", "engine.ranks_per_node=2", "engine.torch_threads=1",
         "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "ppo.mini_batch_size=16",
         "ppo.micro_batch_size=4", "steps=2", "eval_every=0", "model.warm_start.sft_steps=40",
         f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra.sweep.subdir=${hydra.job.num}", f"tracking.uri={uri}",
         f"cache_dir={cache_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rpg").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/acc")] == [1, 2]
    out_dir = Path(run.data.tags["out_dir"])
    assert (out_dir / "checkpoints" / "step_2.dcp").is_dir()
    submission = next((tmp_path / "multirun" / ".submitit").rglob("*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in submission
