"""Training backends: where the policy's parameters live and how ranks cooperate.

``local``  one process (CPU or one GPU); every collective is the identity.
``fsdp``   torch.distributed + FSDP2, one process per GPU (or per CPU rank with gloo), launched by
           ``torchrun`` or as SLURM tasks (rpg/backend/fsdp.py is the only module that imports FSDP).

Both expose the same small interface, so the RL loop in rpg/train/loop.py is written once:

  main_first(fn)         run fn on rank 0 first (builds caches), then on the other ranks
  reference_model(lm)    a frozen copy of the policy for the KL anchor (call before wrap)
  wrap(lm)               the module the update trains and scores with
  local_rows(idx)        this rank's share of a set of batch rows
  gather_rows(t)         every rank's rows back in order (the inverse of local_rows over a batch)
  local_share(items)     this rank's contiguous share of a list (prompts to generate)
  all_gather_object(o)   every rank's object, in rank order
  broadcast(obj)         rank 0's value on every rank
  all_finite(flag)       True on every rank only if it is True on every rank
  reduce_metrics(s, w)   metric sums and weights summed (maxima: max) over ranks
  full_weights(module)   the weights in the model's own names, for the rollout engine's sync
  save / load            checkpoints that resume exactly
"""

from __future__ import annotations


def make_backend(cfg):
    if cfg.engine.backend == "local":
        from rpg.backend.local import LocalBackend

        return LocalBackend(cfg)
    if cfg.engine.backend == "fsdp":
        from rpg.backend.fsdp import FSDPBackend

        return FSDPBackend(cfg)
    raise ValueError(f"engine.backend={cfg.engine.backend!r}; use local or fsdp")
