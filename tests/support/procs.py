"""Real services for tests: a private mosquitto on a free port, free ports, waiting on state."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and Path(cand).exists():
            return cand
    raise RuntimeError("mosquitto is not installed (make system-deps installs it)")


class Mosquitto:
    """A mosquitto broker of the test's own, on a free port, that the test may stop and restart."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            # Without it the broker's Nagle delay (~40 ms per hop) dominates every round trip.
            "set_tcp_nodelay true\n"
        )
        self.log = workdir / f"mosquitto-{self.port}.log"

    def start(self) -> Mosquitto:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=log
            )
        wait_port(self.host, self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"


def _polls(predicate: Callable[[], Any], timeout: float, what: str,
           error: type[Exception]) -> Iterator[Any]:
    """The polling both waits share: yields None between looks at ``predicate``, then its first
    truthy value; raises ``error`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout} s waiting for {what or predicate}")
        yield None
    yield value


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "",
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that (a thread's wait on
    state, not a fixed sleep); AssertionError naming ``what`` after ``timeout`` seconds."""
    for value in _polls(predicate, timeout, what, AssertionError):
        if value:
            return value
        time.sleep(interval)


async def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns something truthy (state, not a fixed sleep); on the
    loop, TimeoutError after ``timeout`` seconds."""
    for value in _polls(predicate, timeout, what, TimeoutError):
        if value:
            return value
        await asyncio.sleep(interval)
