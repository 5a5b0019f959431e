"""The real ``labd`` process, for the tests that run the daemon as a user does: started from its
console script, waited for (the bootstrap admin token written, the API answering), stopped with
SIGTERM or killed, and ``labctl`` run against it.

The simulated cell the daemon starts outlives a SIGKILL of the daemon by design (the next daemon
re-attaches to it); :meth:`LabdProcess.cleanup` stops whatever is left of both."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import free_port, wait_until

__all__ = ["LABCTL", "LABD", "LabdProcess", "wait_until"]

BIN = Path(sys.executable).parent
LABD = BIN / "labd"
LABCTL = BIN / "labctl"


@dataclass
class LabdProcess:
    """``labd --data-dir DATA --api-port PORT *args``, restartable on the same data dir and port.

    ``args`` carries the rest (``--config``, ``--mqtt``, ``--time-scale``, ...)."""

    data_dir: Path
    log: Path
    args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    #: seconds for an API call of the admin client
    http_timeout: float = 15.0
    proc: subprocess.Popen[bytes] | None = None
    http: httpx.Client | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/api/v1"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "admin.token"

    def _alive(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-5000:]
        return True

    def start(self) -> httpx.Client:
        """Start the daemon and wait until it answers; returns an admin client (also ``http``)."""
        cmd = [str(LABD), "--data-dir", str(self.data_dir), "--api-port", str(self.port),
               *self.args]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)

        def admin_token() -> str:  # the file is created, then written: wait for its content
            self._alive()
            return self.token_file.read_text().strip() if self.token_file.exists() else ""

        token = wait_until(admin_token, 60, "admin.token")
        self.http = self.client(token)

        def answers() -> bool:
            self._alive()
            try:
                return self.http.get("/status").status_code == 200  # type: ignore[union-attr]
            except httpx.TransportError:
                return False

        wait_until(answers, 60, "labd to answer")
        return self.http

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=self.http_timeout,
                            headers={"Authorization": f"Bearer {token}"})

    def signal(self, sig: signal.Signals, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the process to end; its return code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def labctl(self, *args: str, token: str | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``labctl`` against this daemon, with ``token`` or the admin token file."""
        env = {**os.environ, "LABD_URL": self.base}
        auth = ["--token", token] if token else ["--token-file", str(self.token_file)]
        return subprocess.run([str(LABCTL), *auth, *args], capture_output=True, text=True,
                              env=env, timeout=timeout)

    def endpoints(self) -> dict[str, Any]:
        """The simulated cell's endpoints (as ``labd-sim`` wrote them)."""
        path = next(self.data_dir.glob("**/endpoints.json"))
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def cleanup(self) -> None:
        """SIGTERM (then SIGKILL) the daemon if it still runs, and stop a left-over simulator."""
        if self.http is not None:
            self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        pidfile = next(self.data_dir.glob("**/labd-sim.pid"), None)
        if pidfile is not None:
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
