"""The paper's hyperparameters, written once with their source, against every composed paper config.

Source: RPG paper (arXiv 2505.17508), Appendix H "Detailed experimental setup" and Section 5; where the
paper names no value the row says what the project uses and why.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rpg.config import register_configs
from rpg.main import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
ALGOS = sorted(Path(p).stem for p in glob.glob(str(REPO / "conf" / "algo" / "*.yaml")))

#: key -> (value, where it comes from)
APPENDIX_H = {
    "optim.lr": (1e-6, "App. H: learning rate 1e-6"),
    "optim.weight_decay": (0.1, "App. H: weight decay 0.1"),
    "optim.grad_clip": (1.0, "App. H: gradient clipping at 1.0"),
    "optim.warmup_steps": (10, "App. H: 400 steps including an initial 10 warm-up steps (RL steps)"),
    "optim.betas": ([0.9, 0.999], "not stated: AdamW's defaults (torch, verl)"),
    "steps": (400, "App. H: training proceeds for 400 steps"),
    "rollout.prompts_per_step": (512, "App. H: global training batch size 512"),
    "rollout.samples_per_prompt": (16, "App. H: 16 responses per sample"),
    "rollout.temperature": (1.0, "App. H: temperature 1.0"),
    "ppo.mini_batch_size": (512, "App. H: mini-batch of 32 prompts x 16 responses: 16 optimizer steps per RL step"),
    "ppo.epochs": (1, "App. H / official code: one pass over each batch"),
}
#: clip (eps_low, eps_high) and beta per algorithm: Section 5 and App. H "Specific clipping parameters"
CLIP = {"grpo": (0.1, 0.1), "grpo_is": (0.1, 0.1)}  # every other algorithm: (0.2, 0.28)
KL_COEF = {"dapo": 0.0}  # DAPO has no KL term; every other algorithm: App. H's beta = 1e-4
CONTEXT_RESPONSE_LEN = {"2k": 2048, "4k": 4096, "8k": 8192}  # Tables 6, 5, 3


def composed(*overrides: str) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["engine=gpu", "data=dapo_math_17k", "model=qwen3_4b",
                                                       *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def at(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("context", sorted(CONTEXT_RESPONSE_LEN))
@pytest.mark.parametrize("algo", ALGOS)
def test_every_paper_config_states_appendix_h(context, algo):
    cfg = composed(f"context={context}", f"algo={algo}")
    for key, (value, source) in APPENDIX_H.items():
        assert at(cfg, key) == value, f"{key}: {at(cfg, key)!r}, paper {value!r} ({source})"
    assert (cfg["algo"]["clip_low"], cfg["algo"]["clip_high"]) == CLIP.get(algo, (0.2, 0.28)), algo
    assert cfg["algo"]["kl_coef"] == KL_COEF.get(algo, 1e-4), algo
    assert cfg["data"]["max_response_len"] == CONTEXT_RESPONSE_LEN[context]
