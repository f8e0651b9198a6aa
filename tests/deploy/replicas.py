"""Helpers: server replicas as real processes on loopback, and nginx in front with the shipped config."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port, status, wait_for

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"


class Replica:
    """`boomerang serve` over a pair, in its own process."""

    def __init__(self, teacher: Path, student: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "services.cli", "serve", "--teacher", str(teacher), "--student",
                    str(student), "--device", "cpu", "--name", "tiny", "--port", str(self.port), *extra]
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Replica:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        if wait:
            assert wait_for(lambda: status(self.url + "/ready") == 200, 180), "replica did not become ready"
        return self

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


class Nginx:
    """nginx with the shipped nginx.conf; only the upstream list and the listen port are test-specific."""

    def __init__(self, workdir: Path, upstream_ports: list[int]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        conf = NGINX_CONF.read_text().replace("listen 8000;", f"listen 127.0.0.1:{self.port};")
        (workdir / "nginx.conf").write_text(conf)
        (workdir / "upstream.conf").write_text("".join(
            f"server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;\n" for p in upstream_ports))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen([binary, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"),
                                         "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_for(lambda: status(self.url + "/health") is not None, 20), "nginx did not start"
        return self

    def reload(self, upstream_ports: list[int]) -> None:
        """A new upstream list, read by a configuration reload (SIGHUP) of the running nginx."""
        (self.workdir / "upstream.conf").write_text("".join(
            f"server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;\n" for p in upstream_ports))
        self.process.send_signal(signal.SIGHUP)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
