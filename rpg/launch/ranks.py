"""Which processes a run is: the one place that decides it (rpg.main and the SLURM job both call ``start``).

A local run is this process.  An FSDP run's ranks are either already there (torchrun, or SLURM tasks,
whose environment is translated here into torchrun's RANK / WORLD_SIZE / MASTER_ADDR / ...), or, from one
command on one node, started here: the resolved config (output directory and tracking URI filled in) is
written to ``<out_dir>/ranks_config.yaml`` and ``engine.ranks_per_node`` processes are started with torchrun,
each loading it (``python -m rpg.launch.ranks PATH``).  The trainer (rpg.train.loop) only ever trains its own rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from rpg.config import ConfigError, RunConfig, ranks_per_node
from rpg.tracking.identity import FINAL_METRICS


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
           "-m", "rpg.launch.ranks", str(path)]
    code = subprocess.run(cmd).returncode
    if code:
        raise RuntimeError(f"the {n} ranks of the run failed (exit code {code}); see their output above")
    return json.loads((out_dir / FINAL_METRICS).read_text())


def start(cfg) -> dict[str, float]:
    """Run ``cfg`` as this process, or as the ranks it needs; returns the final metrics."""
    from rpg.train.build import check_toy_split
    from rpg.config import validate
    from rpg.train.loop import run, tracking_uri, writable_dir

    if cfg.engine.backend == "fsdp" and "RANK" not in os.environ:
        if "SLURM_PROCID" in os.environ:  # SLURM tasks: torchrun's environment from SLURM's
            from rpg.launch.submit import export_torch_distributed_env

            export_torch_distributed_env()
        else:  # one command on one node: the checks of a run, once, before any process is started
            validate(cfg)
            check_toy_split(cfg)
            out_dir = writable_dir(Path(cfg.out_dir or Path.cwd()).resolve())
            # the ranks inherit $MLFLOW_TRACKING_URI: only a URI given in the config (or the default store
            # of this launch directory) is written to their config file, so no password from the
            # environment reaches the disk
            uri = cfg.tracking.uri or (None if os.environ.get("MLFLOW_TRACKING_URI") or not cfg.tracking.enabled
                                       else tracking_uri(cfg))
            return spawn_ranks(cfg, out_dir, uri)
    return run(cfg)


def main(path: str) -> None:
    from rpg.train.loop import run

    run(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))


if __name__ == "__main__":
    main(sys.argv[1])
