"""Start the ranks of an FSDP run from one command: ``python -m rpg.main engine.backend=fsdp ...`` on one
node re-launches itself as ``engine.ranks_per_node`` (default: one per GPU) processes with torchrun.

The parent writes the resolved config (with its output directory and tracking URI filled in) to
``<out_dir>/ranks_config.yaml`` and waits; each rank loads it here (``python -m rpg.backend.spawn PATH``).
Under torchrun or as SLURM tasks the ranks already exist and nothing is spawned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from rpg.config import ConfigError, RunConfig, ranks_per_node

FINAL_METRICS = "final_metrics.json"


def ranks_exist() -> bool:
    """Whether this process is already one rank of a distributed run (torchrun or a SLURM task)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def spawn_ranks(cfg, out_dir: Path, tracking_uri: str | None) -> dict[str, float]:
    n = ranks_per_node(cfg.engine)
    if n < 2:
        raise ConfigError("engine.backend=fsdp started as one process: set engine.num_gpus (GPUs) or "
                          "engine.ranks_per_node (CPU ranks) to 2 or more, or start the ranks with torchrun")
    if cfg.engine.nodes > 1:
        raise ConfigError(f"engine.nodes={cfg.engine.nodes}: a multi-node run needs its ranks started on every "
                          "node: hydra/launcher=slurm (one task per GPU), or torchrun on each node")
    cfg = OmegaConf.merge(cfg, {"out_dir": str(out_dir), "tracking": {"uri": tracking_uri}})
    path = out_dir / "ranks_config.yaml"
    OmegaConf.save(cfg, path, resolve=True)
    (out_dir / FINAL_METRICS).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "rpg.backend.spawn", str(path)]
    code = subprocess.run(cmd).returncode
    if code:
        raise RuntimeError(f"the {n} ranks of the run failed (exit code {code}); see their output above")
    return json.loads((out_dir / FINAL_METRICS).read_text())


def main(path: str) -> None:
    from rpg.train import run

    run(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))


if __name__ == "__main__":
    main(sys.argv[1])
