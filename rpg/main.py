"""Entry point: ``python -m rpg.main [overrides]`` or ``python -m rpg.main -m algo=a,b seed=1,2`` for sweeps.

``python -m rpg.main dry_run=true [overrides]`` validates the config and prints rpg.launch.plan's estimate
(parameters, per-GPU memory, tokens per step) without loading a model or data.
"""

from __future__ import annotations

import hashlib
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from rpg.config import CONF_DIR, register_configs

__all__ = ["CONF_DIR", "main"]

register_configs()

#: the longest folder name a run gets before it is shortened (file systems allow 255 bytes)
MAX_FOLDER_NAME = 200


def run_folder_name(overrides: str, resume: str, now: str) -> str:
    """The folder of a run started by ``python -m rpg.main``: its overrides (Hydra's override_dirname,
    ``algo=grpo,seed=2``; ``defaults`` when there are none), so re-running a command resumes its run;
    ``resume=never`` appends the start time. A ``/`` in a value becomes ``_``; a name longer than
    MAX_FOLDER_NAME keeps its start and a hash of the whole."""
    name = (overrides or "defaults").replace("/", "_")
    if resume == "never":
        name += f"-{now}"
    if len(name) > MAX_FOLDER_NAME:
        name = f"{name[:MAX_FOLDER_NAME - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


OmegaConf.register_new_resolver("run_folder", run_folder_name, replace=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    if cfg.dry_run:  # validate and print the size/memory/tokens estimate; load nothing, run nothing
        from rpg.launch.plan import dry_run

        dry_run(cfg)
        return None
    from rpg.launch.ranks import start

    name_job(cfg)
    logging.getLogger("rpg").setLevel(logging.INFO)
    final = start(cfg)
    return final.get("train/acc")


def name_job(cfg: DictConfig) -> None:
    """A run started with overrides is named by them (its folder's name without the start time, e.g.
    ``algo=grpo,seed=2``) unless ``name`` is set, so runs are told apart in MLflow and on their progress
    bars; a run without overrides keeps the name <algo>-<model>-<data>-s<seed>."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.name is None and HydraConfig.initialized() and HydraConfig.get().job.override_dirname:
        cfg.name = run_folder_name(HydraConfig.get().job.override_dirname, "auto", "")


if __name__ == "__main__":
    main()
