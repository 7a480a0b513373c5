"""Shared fixtures: composing the real Hydra config with small, fast settings for the CPU trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rpg.config import register_configs
from rpg.main import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

#: Small but real: the default warm start, 4 prompts x 4 samples, 8 held-out problems.
FAST = [
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "ppo.mini_batch_size=16",
    "ppo.micro_batch_size=8",
    "data.eval_sets.0.max_problems=8",
    "data.eval_sets.0.k=2",
    "steps=2",
    "eval_every=2",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One warm-start/toy-data cache for the whole session."""
    return tmp_path_factory.mktemp("rpg-cache")


@pytest.fixture
def fast_overrides(cache_dir) -> list[str]:
    """FAST plus the session cache, for command lines."""
    return FAST + [f"cache_dir={cache_dir}"]


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """``make_cfg(*overrides)`` -> the composed run config, writing into tmp_path."""
    register_configs()

    def make(*overrides: str, out_dir: Path | None = None, tracking: bool = False):
        base = FAST + [f"cache_dir={cache_dir}", f"out_dir={out_dir or tmp_path / 'run'}",
                       f"tracking.enabled={str(tracking).lower()}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=base + list(overrides))
        OmegaConf.set_readonly(cfg, False)
        return cfg

    return make
