"""Start a real `fastner serve` process on a free loopback port, wait until it is ready, and stop
it with SIGTERM: what the load test and the process-level tests share."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    """(status, parsed body) of a GET; HTTP errors return their status and body too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def resident_bytes(pid: int) -> int:
    """Process `pid`'s resident memory (Linux /proc); 0 once it has exited (a zombie has none)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next((int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def cpu_seconds(pid: int) -> float:
    """Process `pid`'s user + system CPU time so far (Linux /proc); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """`python -m fastner serve MODEL --port P ARGS...` as a child process.

    >>> with ServerProcess("runs/conll", ["--max-wait-ms", "2"]) as server:
    ...     urllib.request.urlopen(server.url + "healthz")
    """

    def __init__(self, model: str, args: Sequence[str] = (), startup_timeout: float = 120.0,
                 env: Optional[dict] = None):
        self.model = model
        self.args: List[str] = list(args)
        self.startup_timeout = startup_timeout
        self.env = env
        self.port = 0
        self.process: Optional[subprocess.Popen] = None
        self.stderr_path: Optional[str] = None
        self.final_log = ""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def start(self) -> "ServerProcess":
        import tempfile

        self.port = free_port()
        handle, self.stderr_path = tempfile.mkstemp(prefix="fastner-serve-", suffix=".log")
        env = dict(os.environ if self.env is None else self.env)
        command = [sys.executable, "-m", "fastner", "serve", self.model, "--host", HOST, "--port", str(self.port)] + self.args
        self.process = subprocess.Popen(command, stdout=handle, stderr=handle, env=env)
        os.close(handle)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fastner serve exited with {self.process.returncode} while starting:\n{self.log()}")
            try:
                status, _ = get_json(self.url + "readyz", timeout=2.0)
                if status == 200:
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fastner serve was not ready within {self.startup_timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        if not self.stderr_path or not os.path.exists(self.stderr_path):
            return ""
        with open(self.stderr_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def pids(self) -> List[int]:
        """The server's process and its descendants (the model process: fastner.serve.worker),
        read from Linux /proc; ones that exit meanwhile are left out."""
        found, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as handle:
                        pending.extend(int(child) for child in handle.read().split())
            except OSError:  # exited while we looked
                continue
        return found

    def rss_bytes(self) -> int:
        """The resident memory of the server and its model process, together (Linux /proc)."""
        return sum(resident_bytes(pid) for pid in self.pids())

    def cpu_seconds(self) -> float:
        """User + system CPU time the server and its model process have used so far (Linux
        /proc): unlike wall time, barely moved by other processes competing for the cores."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait; SIGKILL only if it does not exit in time. Returns the exit status."""
        if self.process is None:
            return 0
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.stderr_path and os.path.exists(self.stderr_path):
            self.final_log = self.log()
            os.unlink(self.stderr_path)
            self.stderr_path = None
        return code

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
