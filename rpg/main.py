"""Entry point: ``python -m rpg.main [overrides]`` or ``python -m rpg.main -m algo=a,b seed=1,2`` for sweeps."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from pathlib import Path

from rpg.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from rpg.train import run

    logging.getLogger("rpg").setLevel(logging.INFO)
    final = run(cfg)
    return final.get("train/acc")


if __name__ == "__main__":
    main()
