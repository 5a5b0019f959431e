"""The simulated cell in-process on the RunEngine's loop, with labd's devices and the protocols'
layout built from its endpoints (as the daemon builds them). Shared by the protocol tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.cell import CellDevices, instruments_from_endpoints
from hardware_sims.cell import SimCell
from hardware_sims.config import validate_config
from protocols.layout import CellLayout, layout_from_endpoints
from tests.support.procs import Mosquitto
from tests.support.runengine import in_re_loop

#: Virtual seconds per wall second: an 800 °C anneal with its ramp, dwell and cooling (about
#: 5,000 virtual s) takes a few wall seconds.
TIME_SCALE = 2000.0


@dataclass
class Rig:
    sim: SimCell
    cell: CellDevices
    endpoints: dict[str, Any]
    layout: CellLayout

    @property
    def devices(self) -> dict[str, Any]:
        """What the daemon hands a protocol: the devices and the layout."""
        return {**self.cell.devices, "layout": self.layout}


def start_rig(tmp_path: Path, broker: Mosquitto, **config: Any) -> Rig:
    devices = {"furnace": {"tcp_port": 0}, "station": {"measure_s": 120}}
    devices.update(config.pop("devices", {}))
    cfg = validate_config({
        "cell": "ptest", "time_scale": TIME_SCALE, "run_dir": str(tmp_path / "run"),
        "mqtt": {"host": broker.host, "port": broker.port}, "control": {"port": 0},
        "devices": devices, **config,
    })

    async def start() -> Rig:
        sim = SimCell(cfg)
        await sim.start()
        ep = sim.endpoints()
        inst = instruments_from_endpoints(ep, overrides={"gantry": {"open_settle_s": 0.05}})
        cell = CellDevices(inst, client_name="ptest")
        report = await cell.connect(timeout=10)
        assert report == dict.fromkeys(report), f"devices down: {report}"
        return Rig(sim, cell, ep, layout_from_endpoints(ep))

    return in_re_loop(start())


def stop_rig(rig: Rig) -> None:
    async def stop() -> None:
        await rig.cell.close()
        await rig.sim.stop()

    in_re_loop(stop())
