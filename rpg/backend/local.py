"""One process: the policy is trained in place and checkpoints are single atomic files."""

from __future__ import annotations

import copy

import torch

from rpg.backend import checkpoint


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class LocalBackend:
    name = "local"
    rank, world_size, is_main = 0, 1, True

    def __init__(self, cfg=None):  # nothing to set up
        pass

    def main_first(self, fn):
        return fn()

    def reference_model(self, lm):
        return frozen_copy(lm)

    def wrap(self, lm):
        return lm

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def local_share(self, items: list) -> list:
        return items

    def all_gather_object(self, obj) -> list:
        return [obj]

    def broadcast(self, obj):
        return obj

    def all_finite(self, flag: bool) -> bool:
        return flag

    def reduce_metrics(self, sums: dict, weights: dict, max_keys=()) -> tuple[dict, dict]:
        return sums, weights

    def full_weights(self, module):
        return module

    def save(self, ckpt_dir, step: int, state: dict, module, optimizer, ref_module=None, keep_last: int = 3) -> None:
        checkpoint.save_checkpoint(ckpt_dir, step, {
            **state, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
            "ref_model": None if ref_module is None else ref_module.state_dict()}, keep_last=keep_last)

    def load(self, ckpt_dir, module, optimizer, ref_module=None) -> dict | None:
        state = checkpoint.load_latest_checkpoint(ckpt_dir)
        if state is None:
            return None
        module.load_state_dict(state.pop("model"))
        optimizer.load_state_dict(state.pop("optimizer"))
        ref = state.pop("ref_model")
        if ref_module is not None and ref is not None:
            ref_module.load_state_dict(ref)
        return state

    def close(self) -> None:
        pass
