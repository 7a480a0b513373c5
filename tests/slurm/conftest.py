"""A real one-node SLURM cluster (with accounting) for the tests in this directory.

The session fixture ``slurm_cluster`` runs ``slurm/local_cluster.sh install`` and ``start`` in a
temporary directory, exports ``SLURM_CONF`` for the session (so in-process submitit/Hydra find the
cluster) and stops every daemon by PID at the end. It skips, with the reason, only where the daemons
cannot run: not Linux, not root, or the packages are missing and there is no apt-get to get them;
with RPG_REQUIRE_SLURM set (scripts/test.sh as root) those cases fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
NEEDED = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr")


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running local cluster.

    Attributes: ``state_dir`` (configs, logs, PIDs, database), ``env`` (the variables clients need:
    ``{"SLURM_CONF": ...}``, already exported to ``os.environ`` for the session), ``partition``,
    ``node``, ``name`` (ClusterName), ``cpus`` (CPUs of the node) and ``setup_s`` (start-up time).
    """

    state_dir: Path
    env: dict[str, str]
    partition: str = "debug"
    node: str = "localnode"
    name: str = "local"
    cpus: int = 1
    setup_s: float = 0.0
    script: Path = field(default=SCRIPT)

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command (``sinfo``, ``scontrol``...) against this cluster; return stdout."""
        proc = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sacct_state(self, job_id: str) -> str:
        """Accounting state of the latest run of ``job_id`` ("" while slurmdbd has no record yet)."""
        out = self.run("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "JobID,State")
        states = {jid: st.split()[0] for jid, st in (ln.split("|", 1) for ln in out.splitlines() if ln)}
        return states.get(str(job_id), "")

    def squeue_state(self, job_id: str) -> tuple[str, str]:
        """(state, reason) from the controller, ("", "") once the job has left the queue."""
        out = self.run("squeue", "-h", "-j", str(job_id), "-o", "%T|%r", check=False).strip()
        return tuple(out.split("|", 1)) if "|" in out else ("", "")  # type: ignore[return-value]

    def wait_sacct_state(self, job_id: str, states: set[str], timeout: float = 30) -> str:
        """Poll sacct until the job's state is one of ``states``; return it (TimeoutError otherwise)."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            state = self.sacct_state(job_id)
            if state in states:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {state or 'unknown to sacct'} after {timeout}s, "
                           f"wanted one of {sorted(states)}; logs in {self.state_dir / 'log'}")

    def logs_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.state_dir / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the local SLURM cluster needs Linux"
    missing = [b for b in NEEDED if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    is_root = os.geteuid() == 0
    if missing and not (is_root and shutil.which("apt-get")):
        return (f"SLURM daemons missing ({', '.join(missing)}) and they cannot be installed here "
                f"(needs root and apt-get): run `sudo {SCRIPT} install`")
    if not is_root:
        return f"the local SLURM daemons run as root; run the slurm tests as root ({SCRIPT} start DIR)"
    return None


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """Start the local SLURM cluster once per session and yield a :class:`SlurmCluster`."""
    reason = _skip_reason()
    if reason and os.environ.get("RPG_REQUIRE_SLURM"):
        pytest.fail(f"{reason} (RPG_REQUIRE_SLURM is set: the SLURM tests must run here)")
    if reason:
        pytest.skip(reason)
    state_dir = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()
    for args, limit in ((("install",), 600), (("start", str(state_dir)), 180)):
        proc = _script(*args, timeout=limit)
        if proc.returncode != 0:
            _script("stop", str(state_dir), timeout=60)
            pytest.fail(f"slurm/local_cluster.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    setup_s = time.monotonic() - t0
    env = {"SLURM_CONF": str(state_dir / "etc" / "slurm.conf")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    node_line = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True,
                               check=True).stdout.split()
    cluster = SlurmCluster(state_dir=state_dir, env=env, node=node_line[0], cpus=int(node_line[1]),
                           setup_s=setup_s)
    sys.stderr.write(f"\n[slurm_cluster] ready in {setup_s:.1f}s at {state_dir}\n")
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc = _script("stop", str(state_dir), timeout=120)
        if proc.returncode != 0:
            sys.stderr.write(f"[slurm_cluster] stop failed:\n{proc.stdout}\n{proc.stderr}\n")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs the local SLURM cluster (slurm/local_cluster.sh)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slurm)
