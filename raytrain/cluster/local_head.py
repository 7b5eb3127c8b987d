"""A one-node Ray cluster started the way a real head is (`ray start --head --block`), for trying `raytrain submit`
on one machine, and for the tests and benchmarks that exercise it.

Every port is an explicit free one and the head lives in its own temp dir, where `ray start` registers it, so no
other process's `ray.init()` joins it by accident; it ends with SIGTERM to the process this object started, and
its temp dir (logs included) is removed unless it failed to start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from raytrain.cluster.jobs import ClusterError, auth_headers

PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
         "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all held open while picking, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class LocalHead:
    """`with LocalHead(num_cpus=4) as url:` yields the head's dashboard address once its jobs API answers.
    `env` replaces this process's environment for the head (and so for its jobs)."""

    def __init__(self, *, num_cpus: int | None = None, num_gpus: int | None = None,
                 object_store_bytes: int | None = None, env: Mapping[str, str] | None = None,
                 timeout_s: float = 180) -> None:
        self.ports = dict(zip(PORTS, free_ports(len(PORTS))))
        self.url = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths live in it
        self.env = dict(os.environ if env is None else env)
        self.timeout_s = timeout_s
        options = {"num-cpus": num_cpus, "num-gpus": num_gpus, "object-store-memory": object_store_bytes,
                   "temp-dir": self.temp_dir, "dashboard-host": "127.0.0.1", **self.ports}
        self.cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                    "--disable-usage-stats", *(f"--{k}={v}" for k, v in options.items() if v is not None)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        import requests

        log = self.temp_dir / "head.log"
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        headers = auth_headers(self.env)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            # the dashboard answers before the node has finished starting, which can still fail
            if "Ray runtime started" in log.read_text():
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"{self.url}/api/jobs/", headers=headers, timeout=5).ok:
                        return self.url
            time.sleep(1)
        self._stop()
        raise ClusterError(f"the local Ray head did not come up at {self.url} (see {log})")

    def __exit__(self, *exc: object) -> None:
        self._stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            self.proc.wait(timeout=120)
