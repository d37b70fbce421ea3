"""A private, throwaway redis-server for `baton up` and tests.

Lifecycle: ``RedisServer().start()`` picks a free port (unless given), spawns
``redis-server --port P --save '' --appendonly no`` bound to 127.0.0.1, and
waits until it answers PING; ``stop()`` terminates it (kill after a grace
period). Nothing is persisted. ``available()`` tells whether the binary exists;
callers fall back to the in-process store when it does not.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time


def find_binary() -> str | None:
    return shutil.which("redis-server")


def available() -> bool:
    return find_binary() is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1", binary: str | None = None) -> None:
        self.host = host
        self.port = port
        self.binary = binary or find_binary()
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        if self.binary is None:
            raise RuntimeError("redis-server not found on PATH")
        if self.running:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--loglevel", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                self.stop()
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            if self._ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout_s}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, grace_s: float = 3.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
