"""A real `mlflow server` on 127.0.0.1, killed in the middle of a run and restarted on the same
port and store. One test on purpose: each cold server start costs ~10 s of CPU. It covers the
Python API (`start_server`), the CLI wrapper (address file, SIGTERM), logging over HTTP, and that
an outage loses no metric."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rpg.tracking.tracker import MLflowTracker, upload_unsent
from rpg.tracking.server import free_port, healthy, start_server

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180  # a cold `mlflow server` start takes 8-30 s on a busy 2-core machine


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: m.step)]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_cli(tmp_path, port, store, address):
    log = open(tmp_path / "cli.log", "wb")  # noqa: SIM115 - closed by the caller
    cli = subprocess.Popen(
        [sys.executable, "-m", "rpg.tracking.server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store, "--address-file", str(address)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not address.exists():
        assert cli.poll() is None, (tmp_path / "cli.log").read_text()
        assert time.monotonic() < deadline, "server did not publish its address"
        time.sleep(0.2)
    return cli, log


@pytest.mark.slow
def test_outage_mid_run_loses_nothing(tmp_path):
    port, store = free_port(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    address = tmp_path / "tracking_address"
    t0 = time.monotonic()
    server = start_server(port=port, backend_store_uri=store, log_path=tmp_path / "server.log",
                          startup_timeout_s=START_TIMEOUT_S)
    first_start_s = time.monotonic() - t0
    cli = log = None
    try:
        url = server.url
        assert url == f"http://127.0.0.1:{port}" and healthy(url)
        tracker = MLflowTracker(url, output_dir=tmp_path / "a", flush_interval_s=0.1,
                                backoff_initial_s=0.2, backoff_max_s=2.0)
        # a second run whose end() comes while the server is down: it must save, not lose
        quitter = MLflowTracker(url, output_dir=tmp_path / "b", flush_interval_s=0.1,
                                end_timeout_s=1.0)
        # a third run checkpoints while the server is down and is then SIGKILLed: persist() must have put
        # everything on disk, and its resumed attempt sends it
        keeper = MLflowTracker(url, output_dir=tmp_path / "c", flush_interval_s=0.1)
        run_id = tracker.start("exp_outage", "survivor", {"algo": {"name": "grpo"}},
                               {"config_hash": "o1"})
        quit_id = quitter.start("exp_outage", "quitter", {"seed": 2}, {"config_hash": "o2"})
        keep_id = keeper.start("exp_outage", "keeper", {"seed": 3}, {"config_hash": "o3"})
        tracker.log_text("over http", "notes.txt")

        def log_step(step):
            t = time.monotonic()
            tracker.log_metrics({"train/acc": step / 16, "loss/total": 1.0 / (step + 1)}, step)
            quitter.log_metrics({"train/acc": step / 32}, step)
            keeper.log_metrics({"train/acc": step / 64}, step)
            return time.monotonic() - t

        for step in range(5):
            log_step(step)
        assert tracker.flush(timeout_s=30) and quitter.flush(timeout_s=30)
        keeper.persist()  # the store is up: everything is sent, nothing written
        assert not list((tmp_path / "c").glob("unsent_*"))

        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.proc.wait(timeout=10)
        assert not healthy(url)
        blocked = []
        for step in range(5, 15):
            blocked.append(log_step(step))
            time.sleep(0.1)  # the sender keeps failing and backing off meanwhile
        assert max(blocked) < 0.5, blocked  # log_metrics never waits on the network

        t0 = time.monotonic()
        assert tracker.flush(timeout_s=1.0) is False  # bounded, and it says nothing was sent
        assert time.monotonic() - t0 < 3.0
        t0 = time.monotonic()
        quitter.end("FAILED")
        end_wait = time.monotonic() - t0
        assert end_wait < 6.0, end_wait
        unsent = tmp_path / "b" / f"unsent_metrics_{quit_id}.jsonl"
        records = [json.loads(line) for line in unsent.read_text().splitlines()]
        assert {r["step"] for r in records if "key" in r} == set(range(5, 15))
        assert [r["status"] for r in records if "status" in r] == ["FAILED"]
        t0 = time.monotonic()
        keeper.persist(timeout_s=1.0)  # a checkpoint while the server is down
        assert time.monotonic() - t0 < 3.0
        kept = tmp_path / "c" / f"unsent_metrics_{keep_id}.jsonl"
        assert {json.loads(line)["step"] for line in kept.read_text().splitlines()} == set(range(5, 15))
        with keeper._cv:  # then SIGKILL: no end(), no more sending
            keeper._stopping = True
            keeper._cv.notify_all()
        import atexit
        atexit.unregister(keeper._atexit)

        # restart through the CLI wrapper, same port and store; it publishes its address
        t0 = time.monotonic()
        cli, log = _start_cli(tmp_path, port, store, address)
        second_start_s = time.monotonic() - t0
        assert address.read_text().strip() == url
        server_pid = int(re.search(r"\(pid (\d+)\)", (tmp_path / "cli.log").read_text()).group(1))
        t0 = time.monotonic()
        assert tracker.flush(timeout_s=30) is True
        print(f"server starts {first_start_s:.1f} s / {second_start_s:.1f} s; log_metrics max "
              f"block while down {max(blocked) * 1e3:.2f} ms; end() with server down "
              f"{end_wait:.2f} s; backlog sent {time.monotonic() - t0:.2f} s after restart")
        tracker.end("FINISHED")
        assert upload_unsent(unsent, url) == 10
        resumed = MLflowTracker(url, output_dir=tmp_path / "c")
        resumed.start("exp_outage", "keeper", {"seed": 3}, {"config_hash": "o3"}, run_id=keep_id)
        assert resumed.upload_unsent_files() == 10 and resumed.logged_through("train/") == 14
        resumed.end("FINISHED")

        client = MlflowClient(url)
        assert history(client, run_id, "train/acc") == [(s, s / 16) for s in range(15)]
        assert history(client, run_id, "loss/total") == [(s, 1.0 / (s + 1)) for s in range(15)]
        assert history(client, quit_id, "train/acc") == [(s, s / 32) for s in range(15)]
        assert history(client, keep_id, "train/acc") == [(s, s / 64) for s in range(15)]  # each step once
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_run(run_id).data.params == {"algo.name": "grpo"}
        assert client.get_run(quit_id).info.status == "FAILED"
        assert not list((tmp_path / "a").glob("unsent_*"))
        # proxied artifacts land next to the sqlite database
        assert [p.read_text() for p in (tmp_path / "mlartifacts").rglob("notes.txt")] == ["over http"]

        cli.send_signal(signal.SIGTERM)  # clean stop: exit 0, address withdrawn, group gone
        assert cli.wait(timeout=30) == 0
        assert not address.exists() and not healthy(url) and not _group_alive(server_pid)
    finally:
        server.stop()
        if cli is not None and cli.poll() is None:
            cli.kill()
        if log is not None:
            log.close()
    assert not _group_alive(server.pid)
