"""FSDP ranks started as SLURM tasks: two tasks of one job join one process group from their SLURM
environment (rpg.backend.fsdp.init_distributed via submitit), as the GPU path starts one task per GPU."""

from __future__ import annotations

import sys

import cloudpickle
import submitit

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def join_and_reduce() -> tuple[int, int, float, str]:
    import os

    import torch
    import torch.distributed as dist

    from rpg.backend.fsdp import init_distributed

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
