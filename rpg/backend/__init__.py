"""Training backends: where the policy's parameters live and how ranks cooperate.

``local``  one process (CPU or one GPU); every collective is the identity.
``fsdp``   torch.distributed + FSDP2, one process per GPU (or per CPU rank with gloo), launched by
           ``torchrun`` or as SLURM tasks (rpg/backend/fsdp.py is the only module that imports FSDP).

Both implement :class:`TrainBackend`, so the RL loop in rpg/train/loop.py is written once.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainBackend(Protocol):
    """Where the policy's parameters live and how ranks cooperate (one rank: every collective is the identity)."""

    rank: int
    world_size: int
    is_main: bool

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 first (it builds caches), then on the other ranks."""

    def reference_model(self, lm: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy of the policy for the KL anchor (call before ``wrap``)."""

    def wrap(self, lm: torch.nn.Module) -> torch.nn.Module:
        """The module the update trains and scores with."""

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a set of batch rows."""

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows back in order (the inverse of ``local_rows`` over a batch)."""

    def local_share(self, items: list) -> list:
        """This rank's contiguous share of a list (prompts to generate)."""

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's object, in rank order."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value on every rank."""

    def all_finite(self, flag: bool) -> bool:
        """True on every rank only if it is True on every rank."""

    def reduce_metrics(self, sums: dict, weights: dict, max_keys=()) -> tuple[dict, dict]:
        """Metric sums and weights summed over ranks (``max_keys``: max)."""

    def full_weights(self, module: torch.nn.Module) -> Any:
        """The weights in the model's own names, for the rollout engine's sync."""

    def save(self, ckpt_dir, step: int, state: dict, module, optimizer, ref_module=None, keep_last: int = 3) -> None:
        """A checkpoint that resumes exactly (atomic; the last ``keep_last`` kept)."""

    def load(self, ckpt_dir, module, optimizer, ref_module=None) -> dict | None:
        """The newest readable checkpoint's state, loaded into module/optimizer/ref_module; None if none."""

    def close(self) -> None:
        """Release the process group (if any)."""


def make_backend(cfg) -> TrainBackend:
    if cfg.engine.backend == "local":
        from rpg.backend.local import LocalBackend

        return LocalBackend(cfg)
    if cfg.engine.backend == "fsdp":
        from rpg.backend.fsdp import FSDPBackend

        return FSDPBackend(cfg)
    raise ValueError(f"engine.backend={cfg.engine.backend!r}; use local or fsdp")
