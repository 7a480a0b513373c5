r"""Start and stop an MLflow tracking server (for a workstation or a SLURM allocation).

    python -m rpg.tracking.server --host 0.0.0.0 --port 5000 \
        --backend-store-uri sqlite:////shared/rpg/mlflow.db --address-file /shared/rpg/tracking_address

starts `mlflow server` in its own process group, waits until GET /health answers, writes
`http://HOST:PORT` to the address file (so jobs can `export MLFLOW_TRACKING_URI=$(cat FILE)`),
and on SIGTERM/SIGINT stops the whole process group and removes the address file.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# What `mlflow server` accepts by default (loopback and private ranges); hosts binding a public
# interface add their own names to it (the server checks the Host header against this list).
_DEFAULT_ALLOWED = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "10.*", "192.168.*",
                    *[f"172.{i}.*" for i in range(16, 32)]]


@dataclass
class ServerHandle:
    url: str
    pid: int
    proc: subprocess.Popen = field(repr=False)
    address_file: Path | None = None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after `timeout_s`; return the exit code."""
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            try:  # the leader exited; make sure no worker of the group is left
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        if self.address_file is not None and self.address_file.exists():
            if self.address_file.read_text().strip() == self.url:
                self.address_file.unlink()
        return self.proc.poll()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _sqlite_abs(uri: str) -> str:
    if "://" not in uri or uri.startswith("file:"):
        raise ValueError(f"backend store {uri!r} is a file store; use sqlite:///ABS/PATH/mlflow.db "
                         "(or a database URL such as postgresql://...)")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (for tests and ad-hoc servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def start_server(host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None,
                 artifacts_destination: str | None = None, address_file: str | os.PathLike | None = None,
                 workers: int = 1, log_path: str | os.PathLike | None = None,
                 allowed_hosts: str | None = None, advertise_host: str | None = None,
                 startup_timeout_s: float = 120.0) -> ServerHandle:
    """Start `mlflow server` and return once it is healthy.

    Args:
        backend_store_uri: default sqlite:///<cwd>/mlflow.db; relative sqlite paths are made absolute.
        artifacts_destination: default `mlartifacts/` next to a sqlite database.
        address_file: receives `http://HOST:PORT` once healthy.
        advertise_host: HOST in the published URL; default `host`, or this machine's hostname
            when `host` is a wildcard address (0.0.0.0).
        log_path: server stdout/stderr (default: inherited).
        allowed_hosts: Host headers the server accepts; default: MLflow's when binding loopback,
            else MLflow's plus this machine's names.
    """
    store = _sqlite_abs(backend_store_uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    if artifacts_destination is None and store.startswith("sqlite:///"):
        artifacts_destination = str(Path(store[len("sqlite:///"):]).parent / "mlartifacts")
    if not _port_free(host, port):
        raise RuntimeError(f"port {port} on {host or '*'} is in use; pick another with --port")
    public = advertise_host or (socket.gethostname() if host in WILDCARD_HOSTS else host)
    url = f"http://{'[' + public + ']' if ':' in public else public}:{port}"
    probe = f"http://127.0.0.1:{port}" if host in WILDCARD_HOSTS else url
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", store, "--workers", str(workers)]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    if allowed_hosts is None and host not in LOOPBACK_HOSTS:
        names = {socket.gethostname(), public}
        allowed_hosts = ",".join(_DEFAULT_ALLOWED + [f"{n}{p}" for n in sorted(names) for p in ("", ":*")])
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if out is not None:
            out.close()
    handle = ServerHandle(url, proc.pid, proc, Path(address_file).resolve() if address_file else None)
    deadline = time.monotonic() + startup_timeout_s
    while not healthy(probe, timeout_s=1.0):
        if proc.poll() is not None:
            handle.stop()  # reap any worker it left behind
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} during start-up"
                               + (f"; see {log_path}" if log_path else ""))
        if time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"mlflow server not healthy after {startup_timeout_s:.0f} s at {probe}")
        time.sleep(0.25)
    if handle.address_file is not None:
        _write_atomic(handle.address_file, url + "\n")
    return handle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpg.tracking.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other nodes")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None, help="default sqlite:///<cwd>/mlflow.db")
    p.add_argument("--artifacts-destination", default=None)
    p.add_argument("--address-file", default=None, help="write http://HOST:PORT here once healthy")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--allowed-hosts", default=None, help="Host headers to accept (mlflow server)")
    p.add_argument("--advertise-host", default=None,
                   help="host name to publish (default: --host, or hostname for 0.0.0.0)")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        handle = start_server(args.host, args.port, args.backend_store_uri,
                              args.artifacts_destination, args.address_file, args.workers,
                              allowed_hosts=args.allowed_hosts, advertise_host=args.advertise_host,
                              startup_timeout_s=args.startup_timeout)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MLflow tracking server at {handle.url} (pid {handle.pid})", flush=True)
    while not stop.wait(1.0):
        if handle.proc.poll() is not None:
            print(f"mlflow server exited by itself (code {handle.proc.returncode})", file=sys.stderr)
            handle.stop()
            return handle.proc.returncode or 1
    handle.stop()
    print("MLflow tracking server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
