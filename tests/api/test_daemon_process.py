"""The real ``labd`` process on embedded defaults (it starts the simulated cell), killed with
SIGKILL in the middle of a run and restarted: queue and history survive, the run that was going is
``interrupted``, and the queue does not restart by itself. Then SIGTERM: exit 0."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.labd import LabdProcess, wait_until
from tests.support.procs import Mosquitto


@pytest.fixture
def labd(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[LabdProcess]:
    daemon = LabdProcess(tmp_path / "data", tmp_path / "labd.log",
                         ["--mqtt", mosquitto.url, "--time-scale", "200"])
    yield daemon
    daemon.cleanup()


def test_sigkill_mid_run_then_restart_then_sigterm(labd: LabdProcess) -> None:
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
    assert labd.signal(signal.SIGKILL, 10) == -signal.SIGKILL

    c = labd.start()
    hist = c.get("/history").json()
    assert [(h["item_uid"], h["status"]) for h in hist] == [(running["item_uid"], "interrupted")]
    assert "stopped while this was running" in hist[0]["error"]
    q = c.get("/queue").json()
    assert [i["item_uid"] for i in q["items"]] == [w["item_uid"] for w in waiting]
    assert q["running"] is False  # the worker takes nothing while the queue is stopped
    st = c.get("/status").json()
    assert st["engine"] == "idle" and st["current"] is None and st["queue_length"] == 2
    assert labd.signal(signal.SIGTERM) == 0
