"""submitit against the real local SLURM cluster: results, failures, preemption + requeue, arrays.

The executor settings below are the ones the Hydra submitit_slurm launcher needs for requeue to work
(see slurm/README.md): ``max_num_timeout >= 1`` and ``additional_parameters={"requeue": True}``.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError
from submitit.helpers import Checkpointable, DelayedSubmission

pytestmark = pytest.mark.slurm

# Jobs unpickle this module's functions and classes by value: the test module is not importable
# from the job's working directory.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_NUM_TIMEOUT = 3  # submitit counts every USR2 of a job shorter than 50 min as a time-out
SIGNAL_DELAY_S = 30
LIVE_STATES = {"UNKNOWN", "PENDING", "RUNNING", "COMPLETING", "REQUEUED"}


def make_executor(cluster, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                     slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    executor.update_parameters(
        timeout_min=5, cpus_per_task=1, mem_gb=1, slurm_partition=cluster.partition,
        slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_additional_parameters={"requeue": True},
    )
    return executor


def poll_states(job, timeout: float = 60, on_running=None) -> list[str]:
    """The distinct sacct states submitit reports for ``job`` until it leaves the live states.

    ``on_running`` is called once, when sacct first reports RUNNING.
    """
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job.get_info(mode="force").get("State") or "UNKNOWN"
        if not seen or seen[-1] != state:
            seen.append(state)
            if state == "RUNNING" and on_running is not None:
                on_running()
        if state not in LIVE_STATES:
            return seen
        time.sleep(0.2)
    raise TimeoutError(f"job {job.job_id} still live after {timeout}s; states seen {seen}; "
                       f"stderr:\n{job.stderr()}")


def add_when_told(a: int, b: int, go: str) -> tuple[int, str]:
    """Returns a + b once the file ``go`` exists (sacct reports RUNNING only seconds after start)."""
    deadline = time.monotonic() + 60
    while not Path(go).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.05)
    return a + b, os.environ["SLURM_JOB_ID"]


def explode(code: int) -> None:
    raise ValueError(f"boom {code}")


def square_task(x: int) -> tuple[int, str]:
    return x * x, os.environ["SLURM_ARRAY_TASK_ID"]


class Counter(Checkpointable):
    """Counts to ``n`` in steps of ``step_s`` seconds, persisting progress; resumes from it on requeue.

    Files next to ``progress``: ``.starts`` gets "<resume_from> <unix time>" per start, ``.steps``
    gets each executed step index, so a test can tell a resume from a restart.
    """

    def __call__(self, progress: str, n: int, step_s: float, resume_from: int = 0) -> int:
        path = Path(progress)
        with open(path.with_suffix(".starts"), "a") as f:
            f.write(f"{resume_from} {time.time():.3f}\n")
        for step in range(resume_from, n):
            time.sleep(step_s)
            with open(path.with_suffix(".steps"), "a") as f:
                f.write(f"{step}\n")
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(step + 1))
            tmp.replace(path)
        return int(path.read_text())

    def checkpoint(self, progress: str, n: int, step_s: float, resume_from: int = 0) -> DelayedSubmission:
        done = int(Path(progress).read_text()) if Path(progress).exists() else resume_from
        return DelayedSubmission(self, progress, n, step_s, resume_from=done)


def test_function_result_and_completed_state(slurm_cluster, tmp_path):
    go = tmp_path / "go"
    job = make_executor(slurm_cluster, tmp_path).submit(add_when_told, 2, 3, str(go))
    seen = poll_states(job, on_running=go.touch)
    assert seen[-1] == "COMPLETED", f"states {seen}; stderr:\n{job.stderr()}"
    assert "RUNNING" in seen, f"never saw RUNNING through sacct: {seen}"
    assert set(seen[:-1]) <= LIVE_STATES
    assert job.result() == (5, job.job_id)
    assert job.state == "COMPLETED"
    assert slurm_cluster.sacct_state(job.job_id) == "COMPLETED"


def test_raising_job_is_failed_and_surfaces_the_exception(slurm_cluster, tmp_path):
    job = make_executor(slurm_cluster, tmp_path).submit(explode, 7)
    seen = poll_states(job)
    assert seen[-1] == "FAILED", f"states {seen}"
    with pytest.raises(FailedJobError, match="ValueError: boom 7"):
        job.result()
    assert isinstance(job.exception(), FailedJobError)
    assert slurm_cluster.sacct_state(job.job_id) == "FAILED"


def test_preempted_checkpointable_job_resumes_after_requeue(slurm_cluster, tmp_path, record_property):
    n, step_s, preempt_at = 24, 0.25, 4
    progress = tmp_path / "progress.txt"
    job = make_executor(slurm_cluster, tmp_path).submit(Counter(), str(progress), n, step_s)
    jid = job.job_id

    deadline = time.monotonic() + 40
    while not (progress.exists() and int(progress.read_text()) >= preempt_at):
        assert time.monotonic() < deadline, f"job {jid} made no progress; stderr:\n{job.stderr()}"
        assert slurm_cluster.sacct_state(jid) in LIVE_STATES | {""}, job.stderr()
        time.sleep(0.1)
    assert slurm_cluster.squeue_state(jid)[0] == "RUNNING"

    t_signal = time.time()
    slurm_cluster.run("scancel", "--signal", "USR2", jid)
    # submitit's handler checkpoints, runs `scontrol requeue` and exits; SLURM then keeps the job
    # PENDING with Reason=BeginTime for cred_expire + 1 s (11 s here, 121 s with SLURM's default).
    deadline = time.monotonic() + 20
    while (state := slurm_cluster.squeue_state(jid))[0] != "PENDING":
        assert time.monotonic() < deadline, f"job {jid} not requeued: {state}; stderr:\n{job.stderr()}"
        time.sleep(0.1)
    t_pending = time.time()
    begin = datetime.fromisoformat(slurm_cluster.run("squeue", "-h", "-j", jid, "-o", "%S").strip())
    hold_s = begin.timestamp() - t_signal
    assert 8 <= hold_s <= 14, f"requeued job eligible {hold_s:.1f}s after the signal, expected ~11s"
    # Release it early. The start must fall at least a second after the requeue, or slurmd refuses
    # the launch ("Job credential revoked") and the job ends FAILED: hence now+2, not now.
    slurm_cluster.run("scontrol", "update", f"JobId={jid}", "StartTime=now+2")

    assert job.result() == n, job.stderr()
    starts = [line.split() for line in progress.with_suffix(".starts").read_text().splitlines()]
    assert [int(s[0]) for s in starts][0] == 0
    assert len(starts) == 2, f"expected one start and one resume, got {starts}"
    resumed_from = int(starts[1][0])
    assert preempt_at <= resumed_from < n, f"resumed from {resumed_from}, preempted at >= {preempt_at}"
    steps = [int(s) for s in progress.with_suffix(".steps").read_text().split()]
    assert steps == list(range(n)), "each step must run exactly once (resume, not restart)"

    assert slurm_cluster.wait_sacct_state(jid, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    history = slurm_cluster.run("sacct", "-D", "-X", "-n", "-P", "-j", jid, "-o", "State").split()
    assert history == ["REQUEUED", "COMPLETED"], history
    assert "Requeued job" in job.stdout()  # submitit INFO goes to stdout

    requeue_to_resume = float(starts[1][1]) - t_signal
    record_property("signal_to_pending_s", round(t_pending - t_signal, 2))
    record_property("requeue_hold_s", round(hold_s, 2))
    record_property("requeue_to_resume_s", round(requeue_to_resume, 2))
    print(f"\nsignal->pending {t_pending - t_signal:.2f}s, hold {hold_s:.1f}s, "
          f"signal->resumed {requeue_to_resume:.2f}s")
    assert 0 < requeue_to_resume < 15, f"requeue to resume took {requeue_to_resume:.1f}s"


def test_job_array_of_four_completes(slurm_cluster, tmp_path):
    jobs = make_executor(slurm_cluster, tmp_path).map_array(square_task, [0, 1, 2, 3])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, [job.job_id for job in jobs]
    results = [job.result() for job in jobs]
    assert results == [(0, "0"), (1, "1"), (4, "2"), (9, "3")]
    for job in jobs:
        assert slurm_cluster.wait_sacct_state(job.job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"
        assert job.get_info(mode="force").get("State") == "COMPLETED"
