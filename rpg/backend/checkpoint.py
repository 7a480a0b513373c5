"""Atomic checkpoints: `<dir>/step_<n>.pt` files, a `latest` pointer, and RNG state helpers.

A checkpoint is written to a temporary file in the same directory, fsync'ed, and renamed into
place with `os.replace`; only then is the `latest` pointer (a one-line text file) replaced the same
way. A crash at any point leaves either the previous checkpoint or the new one, never a partial
file under a name that `load_latest_checkpoint` reads. A distributed backend writes its shards to
`step_<n>.dcp/` first; the `.pt` file is written last, so it only exists once its shards are complete.
The state dict typically holds the model and optimizer state dicts, `rng_state()`, the step, the data
position and the MLflow run id.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("rpg.backend.checkpoint")

LATEST = "latest"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step_{int(step)}.pt"


def shard_dir(directory: str | os.PathLike, step: int) -> Path:
    """Where a distributed backend keeps the sharded part of the checkpoint of ``step`` (a directory)."""
    return Path(directory) / f"step_{int(step)}.dcp"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call `write(file)` on a temp file next to `path`, fsync it, then rename it to `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `directory` as (step, path), oldest first; temp files are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(directory: str | os.PathLike, step: int, state: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write `state` (plus `step`) to `<directory>/step_<step>.pt` atomically, point `latest` at
    it, and delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps all).
    Temp files left by an interrupted save are removed (one writer per directory is assumed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    for stale in directory.glob(".step_*.pt.*.tmp"):  # left by a crash mid-save (one writer per dir)
        stale.unlink(missing_ok=True)
    _atomic_write(path, lambda f: torch.save({**state, "step": int(step)}, f))
    _atomic_write(directory / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
    if keep_last > 0:
        for _, old in list_checkpoints(directory)[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
                shutil.rmtree(old.with_suffix(".dcp"), ignore_errors=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    weights_only: bool = True) -> dict[str, Any]:
    """Load one checkpoint. `weights_only=True` accepts tensors, containers and plain scalars
    (everything `rng_state()` and torch state dicts produce); pass False for trusted files
    holding other Python objects."""
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def load_latest_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                           weights_only: bool = True) -> dict[str, Any] | None:
    """The checkpoint `latest` points to, else the highest step present; None if there is none.

    A file that cannot be read (truncated, overwritten, not a torch file) is skipped with a warning that
    names it and why, and the next newest is tried; if none can be read this raises instead of letting a
    run start over. Files are always read with `weights_only=True` unless the caller asks otherwise.
    """
    directory = Path(directory)
    found = [p for _, p in reversed(list_checkpoints(directory))]
    pointer = directory / LATEST
    if pointer.is_file():
        target = directory / pointer.read_text().strip()
        if target in found:
            found.remove(target)
            found.insert(0, target)
        else:
            log.warning("%s points to missing %s; using the newest step_*.pt instead", pointer, target)
    rejected = []
    for path in found:
        try:
            return load_checkpoint(path, map_location, weights_only)
        except Exception as err:  # noqa: BLE001 -- any unreadable file: say which and try the next
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
            log.warning("skipping unreadable checkpoint %s (%s)", path, reason)
            rejected.append(f"{path.name} ({reason})")
    if rejected:
        raise RuntimeError(f"no readable checkpoint in {directory}: {'; '.join(rejected)}. Restore one, or delete "
                           "them (or set resume=never) to start this run over")
    return None


def rng_state() -> dict[str, Any]:
    """RNG states of python `random`, numpy's global generator (if numpy is imported), torch CPU
    and every CUDA device (if available), as types that `torch.load(weights_only=True)` accepts."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        s = np.random.get_state(legacy=False)
        state["numpy"] = {"bit_generator": s["bit_generator"],
                          "key": torch.from_numpy(s["state"]["key"].astype(np.int64)),
                          "pos": int(s["state"]["pos"]), "has_gauss": int(s["has_gauss"]),
                          "gauss": float(s["gauss"])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured (the parts this process can restore)."""
    random.setstate(_as_python_random_state(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state({"bit_generator": s["bit_generator"],
                             "state": {"key": s["key"].numpy().astype(np.uint32), "pos": s["pos"]},
                             "has_gauss": s["has_gauss"], "gauss": s["gauss"]})
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        else:
            log.warning("checkpoint holds CUDA RNG states for %d devices but %d are visible; "
                        "CUDA RNG not restored", len(state["cuda"]),
                        torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _as_python_random_state(s):
    """random.setstate needs tuples; a round trip through some loaders turns them into lists."""
    version, internal, gauss = s
    return (version, tuple(internal), gauss)
