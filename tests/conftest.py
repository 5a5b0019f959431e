"""Fixtures shared by the whole suite: real brokers, simulator contexts."""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware_sims.base import MqttBrokerConfig, SimContext
from hardware_sims.clock import VirtualClock
from hardware_sims.ground_truth import SyntheticLandscape
from hardware_sims.world import World, WorldConfig
from tests.support.procs import Mosquitto
from tests.support.runengine import RE, docs

__all__ = ["RE", "docs"]  # the real RunEngine and its validated documents, for every test

SHARED = Path(__file__).resolve().parents[2] / "shared"
OER_CSV = SHARED / "benchmarks" / "oer_plate_3496.csv"


@pytest.fixture(scope="session", autouse=True)
def no_simulator_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A simulated cell outlives a SIGKILLed daemon by design (as hardware does); a test that
    kills a daemon must stop its simulator. This stops any the suite left behind, loudly."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "hardware_sims.launcher" in cmd and base in cmd:
            left.append(int(proc.name))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        warnings.warn(f"the suite left {len(left)} simulated cell(s) running; killed", stacklevel=1)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker of the suite's own (not the machine's), shared by tests that do not stop it."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker this test alone uses, so it may stop and restart it."""
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


def make_context(
    run_dir: Path, broker: Mosquitto | None = None, time_scale: float = 50.0, cell: str = "t"
) -> SimContext:
    clock = VirtualClock(time_scale)
    truth = SyntheticLandscape(["Fe", "Co", "Ni", "Cr", "Mn"], seed=1)
    world = World(WorldConfig(), clock, truth)
    mqtt = MqttBrokerConfig(
        host=broker.host if broker else "127.0.0.1",
        port=broker.port if broker else 1883,
        prefix="labd-sim",
    )
    return SimContext(cell=cell, clock=clock, world=world, run_dir=run_dir, mqtt=mqtt, seed=1)


@pytest.fixture
def sim_ctx(tmp_path: Path) -> SimContext:
    """A context for one in-process simulator (no broker), time scale 50."""
    return make_context(tmp_path)
