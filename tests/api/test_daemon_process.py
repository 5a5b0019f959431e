"""The real ``labd`` process on embedded defaults (it starts the simulated cell), killed with
SIGKILL in the middle of a run and restarted: queue and history survive, the run that was going is
``interrupted``, and the queue does not restart by itself. Then SIGTERM: exit 0."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import Mosquitto, free_port

from .conftest import wait_until

LABD = Path(sys.executable).parent / "labd"


class Labd:
    def __init__(self, data_dir: Path, broker: Mosquitto, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1"
        self.cmd = [str(LABD), "--data-dir", str(data_dir), "--api-port", str(self.port),
                    "--mqtt", broker.url, "--time-scale", "200"]
        self.log = log
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> httpx.Client:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log,
                                         start_new_session=True)
        token = self.data_dir / "admin.token"
        wait_until(lambda: token.exists() or self.proc.poll() is not None, 60, "admin.token")
        client = httpx.Client(base_url=self.url, timeout=10, headers={
            "Authorization": f"Bearer {token.read_text().strip()}"})

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return client.get("/status").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, 60, "labd to answer")
        return client


@pytest.fixture
def labd(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Labd]:
    daemon = Labd(tmp_path / "data", mosquitto, tmp_path / "labd.log")
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.proc.kill()
        daemon.proc.wait(10)
    # the simulated cell outlives a killed daemon by design: stop what is left of it
    pidfile = next(daemon.data_dir.glob("**/labd-sim.pid"), None)
    if pidfile is not None:
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)


def test_sigkill_mid_run_then_restart_then_sigterm(labd: Labd) -> None:
    c = labd.start()
    protos = {p["name"] for p in c.get("/protocols").json()}
    assert {"furnace_bakeout", "home_gantry"} <= protos
    # a bake-out takes ~45 s at time scale 200: long enough to be killed in the middle
    running = c.post("/queue", json={"protocol": "furnace_bakeout", "params": {}}).json()
    waiting = [c.post("/queue", json={"protocol": "home_gantry"}).json() for _ in range(2)]
    assert c.post("/queue/start").json()["running"] is True

    def current() -> Any:
        return c.get("/status").json()["current"]

    cur = wait_until(current, 30, "the bake-out to start")
    assert cur["item_uid"] == running["item_uid"] and cur["user"] == "admin"
    assert labd.proc is not None
    labd.proc.send_signal(signal.SIGKILL)
    assert labd.proc.wait(10) == -signal.SIGKILL
    c.close()

    c = labd.start()
    hist = c.get("/history").json()
    assert [(h["item_uid"], h["status"]) for h in hist] == [(running["item_uid"], "interrupted")]
    assert "stopped while this was running" in hist[0]["error"]
    q = c.get("/queue").json()
    assert [i["item_uid"] for i in q["items"]] == [w["item_uid"] for w in waiting]
    assert q["running"] is False  # the worker takes nothing while the queue is stopped
    st = c.get("/status").json()
    assert st["engine"] == "idle" and st["current"] is None and st["queue_length"] == 2
    c.close()
    labd.proc.send_signal(signal.SIGTERM)
    assert labd.proc.wait(60) == 0
