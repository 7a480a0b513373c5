"""FSDP2 across ranks: one process per GPU (NCCL) or per CPU rank (gloo); the only FSDP importer.

Each decoder layer is its own ``fully_shard`` unit; the root unit is a :class:`ResponseScorer` around the
causal LM, so embedding, final norm and output head are gathered around each scoring call.  Parameters,
gradients and AdamW state are sharded in ``engine.param_dtype``; compute runs in ``engine.dtype``
(mixed precision, gradients reduced in float32).

Rollouts are data-parallel (rpg.rollout.sharded): every rank samples its share of the prompts with its
own engine and all ranks gather the whole batch. Exact loss normalisation across ranks: every rank holds
the whole rollout batch, so each mini-batch's BatchTotals are computed from all its rows on every rank without
communication; each rank takes an equal, contiguous share of the rows, and gradients are *summed* over
ranks (divide factor 1), so the step uses exactly the mini-batch gradient of one process.

Checkpoints: model, optimizer and reference shards go to ``step_<n>.dcp/`` (torch.distributed.checkpoint,
written to a temporary name and renamed by rank 0 once every rank has finished), the rest of the
training state to the atomic ``step_<n>.pt`` of rpg.backend.checkpoint, which is written last, with every rank's RNG
state (ranks sample different prompts, so their streams differ; resume is exact only if each gets its own).
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rpg.backend import checkpoint
from rpg.backend.local import frozen_copy
from rpg.models import DTYPES
from rpg.config import ConfigError
from rpg.models.logprobs import ResponseScorer

_PREFIX = "lm."


class FullWeights:
    """Full (unsharded) weights under the model's own names; what rollout engines sync from."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def init_distributed(device: str, timeout_s: float = 1800.0) -> None:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, torchrun's environment
    (whoever started the ranks set it: torchrun, or rpg.launch.ranks for SLURM tasks)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise RuntimeError(
            "engine.backend=fsdp needs one process per rank: start it with "
            "`torchrun --nproc-per-node N -m rpg.main engine.backend=fsdp ...`, or as SLURM tasks "
            "(hydra/launcher=slurm runs engine.num_gpus tasks per node); for one process use engine.backend=local")
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


class FSDPBackend:
    name = "fsdp"

    def __init__(self, cfg):
        e = cfg.engine
        init_distributed(e.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", torch.cuda.current_device()) if e.device.startswith("cuda") else torch.device("cpu")
        per_node = e.ranks_per_node or e.num_gpus
        if per_node and self.world_size != per_node * e.nodes:
            raise ConfigError(f"{self.world_size} ranks started but the config asks for {per_node} per node x "
                              f"engine.nodes={e.nodes}; start one process per GPU, or fix engine.ranks_per_node "
                              "/ engine.num_gpus / engine.nodes")
        u = cfg.ppo
        per_rank = u.mini_batch_size // self.world_size
        if u.mini_batch_size % self.world_size or (u.micro_batch_size < per_rank and per_rank % u.micro_batch_size):
            raise ConfigError(f"ppo.mini_batch_size={u.mini_batch_size} must split over {self.world_size} ranks into "
                             f"whole micro-batches of ppo.micro_batch_size={u.micro_batch_size} (responses per "
                             f"rank per forward): set ppo.micro_batch_size to a divisor of "
                             f"{per_rank} (or at least {per_rank}: one forward per rank)")
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        compute, params = DTYPES[e.dtype], DTYPES[e.param_dtype]
        self.mp = (MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != params
                   else MixedPrecisionPolicy())

    # -- the model ---------------------------------------------------------------------------------

    def main_first(self, fn):
        """Run ``fn`` on rank 0, then on the others (so caches are built once)."""
        if self.is_main:
            out = fn()
            dist.barrier()
        else:
            dist.barrier()
            out = fn()
        return out

    def _shard(self, lm) -> ResponseScorer:
        for layer in lm.get_decoder().layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=self.mp)
        scorer = ResponseScorer(lm)
        fully_shard(scorer, mesh=self.mesh, mp_policy=self.mp)
        for m in scorer.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum over ranks: each rank's loss is already a share
                m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
        return scorer

    def reference_model(self, lm):
        return self._shard(frozen_copy(lm))

    def wrap(self, lm):
        return self._shard(lm)

    def full_weights(self, module) -> FullWeights:
        """The weights under the model's own names, still sharded (DTensors): a consumer gathers them one
        tensor at a time with ``full_tensor()``, so every rank must read them in the same order."""
        return FullWeights({k.removeprefix(_PREFIX): v for k, v in module.state_dict().items()})

    # -- rows and collectives ------------------------------------------------------------------------

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        if n % self.world_size:
            raise ValueError(f"{n} rows do not split evenly over {self.world_size} ranks")
        k = n // self.world_size
        return idx[self.rank * k : (self.rank + 1) * k]

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous().to(self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts).cpu()

    def local_share(self, items: list) -> list:
        """This rank's contiguous share of ``items`` (sizes differ by at most one)."""
        n, w = len(items), self.world_size
        return items[n * self.rank // w : n * (self.rank + 1) // w]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_finite(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def reduce_metrics(self, sums: dict, weights: dict, max_keys=()) -> tuple[dict, dict]:
        keys = sorted(sums)
        add = [k for k in keys if k not in max_keys]
        mx = [k for k in keys if k in max_keys]
        if add:
            t = torch.tensor([[sums[k] for k in add], [weights[k] for k in add]], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            sums.update(zip(add, t[0].tolist()))
            weights.update(zip(add, t[1].tolist()))
        if mx:
            t = torch.tensor([sums[k] for k in mx], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sums.update(zip(mx, t.tolist()))
        return sums, weights

    # -- checkpoints ------------------------------------------------------------------------------

    def _payload(self, module, optimizer, ref_module) -> dict:
        model_state, optim_state = get_state_dict(module, optimizer)
        payload = {"model": model_state, "optim": optim_state}
        if ref_module is not None:
            payload["ref"] = get_model_state_dict(ref_module)
        return payload

    def save(self, ckpt_dir, step: int, state: dict, module, optimizer, ref_module=None, keep_last: int = 3) -> None:
        ckpt_dir = Path(ckpt_dir)
        rank_rng = self.all_gather_object(checkpoint.rng_state())  # ranks sample different shares: own streams
        target = checkpoint.shard_dir(ckpt_dir, step)
        tmp = target.with_name(f".{target.name}.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._payload(module, optimizer, ref_module), checkpoint_id=str(tmp))
        dist.barrier()
        if self.is_main:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            checkpoint.save_checkpoint(ckpt_dir, step, {**state, "world_size": self.world_size, "rank_rng": rank_rng},
                                       keep_last=keep_last)
        dist.barrier()

    def load(self, ckpt_dir, module, optimizer, ref_module=None) -> dict | None:
        state = self.broadcast(checkpoint.load_latest_checkpoint(ckpt_dir) if self.is_main else None)
        if state is None:
            return None
        shards = checkpoint.shard_dir(ckpt_dir, state["step"])
        if not shards.is_dir():
            raise FileNotFoundError(f"{shards} is missing: the checkpoint at step {state['step']} was written by "
                                    "the local backend; resume it with engine.backend=local")
        payload = self._payload(module, optimizer, ref_module)
        dcp.load(payload, checkpoint_id=str(shards))
        set_state_dict(module, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
        if ref_module is not None:
            set_model_state_dict(ref_module, payload["ref"])
        rank_rng = state.pop("rank_rng", None)
        if rank_rng is not None and len(rank_rng) == self.world_size:  # else: a new world size, rank 0's stream
            state["rng"] = rank_rng[self.rank]
        return state

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
