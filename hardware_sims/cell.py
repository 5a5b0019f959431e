"""The whole simulated cell: one clock, one world, every enabled instrument, the control channel."""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .base import SimContext, SimInstrument
from .clock import VirtualClock
from .config import SimCellConfig
from .control import ControlServer
from .faults import Fault, FaultKind
from .ground_truth import load_ground_truth
from .world import World

log = logging.getLogger(__name__)

#: Device name -> (module, class). Start order: serial and Modbus first, MQTT last.
DEVICE_CLASSES: dict[str, tuple[str, str]] = {
    "balance": ("hardware_sims.balance", "BalanceSim"),
    "doser": ("hardware_sims.doser", "DoserSim"),
    "gantry": ("hardware_sims.gantry", "GantrySim"),
    "furnace": ("hardware_sims.furnace", "FurnaceSim"),
    "probe": ("hardware_sims.probe", "ProbeSim"),
    "station": ("hardware_sims.station", "StationSim"),
    "safety": ("hardware_sims.safety", "SafetySim"),
}


class SimCellError(RuntimeError):
    """The cell cannot start (e.g. a port is taken); the message says which device and why."""


class SimCell:
    """Starts and stops the simulated cell described by a :class:`SimCellConfig`."""

    def __init__(self, config: SimCellConfig) -> None:
        self.config = config
        self.devices: dict[str, SimInstrument] = {}
        self.control: ControlServer | None = None
        self._own_run_dir = config.run_dir is None
        self.run_dir = (
            Path(config.run_dir)
            if config.run_dir
            else Path(tempfile.mkdtemp(prefix=f"labd-sim-{config.cell}-"))
        )
        self.clock = VirtualClock(config.time_scale)
        gt = config.ground_truth
        self.truth = load_ground_truth(gt.file, gt.goal, gt.elements, seed=gt.seed)
        self.world = World(config.world, self.clock, self.truth)
        self.ctx = SimContext(
            cell=config.cell,
            clock=self.clock,
            world=self.world,
            run_dir=self.run_dir,
            mqtt=config.mqtt,
            seed=config.seed,
        )

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name, (module, cls_name) in DEVICE_CLASSES.items():
                dev_cfg = getattr(self.config.devices, name)
                if not dev_cfg.enabled:
                    continue
                cls = getattr(importlib.import_module(module), cls_name)
                device: SimInstrument = cls(name, dev_cfg, self.ctx)
                try:
                    await device.start()
                except OSError as exc:
                    raise SimCellError(f"{name}: cannot start: {exc}") from exc
                self.devices[name] = device
                log.info("%s started: %s", name, device.endpoint())
            self.control = ControlServer(self, self.config.control.host, self.config.control.port)
            try:
                await self.control.start()
            except OSError as exc:
                raise SimCellError(
                    f"control channel: cannot listen on {self.config.control.host}:"
                    f"{self.config.control.port}: {exc.strerror}"
                ) from exc
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
            self.control = None
        for name, device in reversed(list(self.devices.items())):
            try:
                await device.stop()
            except Exception:
                log.exception("%s: error while stopping", name)
        self.devices.clear()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- introspection and control ---------------------------------------------------------------
    def device(self, name: str) -> SimInstrument:
        try:
            return self.devices[name]
        except KeyError:
            raise KeyError(
                f"no device {name!r} in this cell (devices: {', '.join(self.devices)})"
            ) from None

    def endpoints(self) -> dict[str, Any]:
        control = None
        if self.control is not None and self.control.port:
            control = f"{self.config.control.host}:{self.control.port}"
        return {
            "cell": self.config.cell,
            "time_scale": self.clock.time_scale,
            "run_dir": str(self.run_dir),
            "control": control,
            "mqtt": {
                "host": self.config.mqtt.host,
                "port": self.config.mqtt.port,
                "prefix": f"{self.config.mqtt.prefix}/{self.config.cell}",
            },
            "ground_truth": self.truth.describe(),
            # Where things are in gantry coordinates, so a daemon can drive this cell by name.
            "locations": {
                name: {"kind": loc.kind, "x": loc.x, "y": loc.y, "z": loc.z}
                for name, loc in self.world.locations.items()
                if name != "floor"
            },
            "devices": {
                name: {"kind": dev.kind, **dev.endpoint()} for name, dev in self.devices.items()
            },
        }

    def state(self, device: str | None = None) -> dict[str, Any]:
        if device is not None:
            return self.device(device).state()
        return {
            "world": self.world.state(),
            "devices": {name: dev.state() for name, dev in self.devices.items()},
        }

    async def set_fault(self, device: str, fault: Fault) -> None:
        await self.device(device).set_fault(fault)

    async def clear_fault(self, device: str, kind: FaultKind | None = None) -> None:
        await self.device(device).clear_fault(kind)

    async def __aenter__(self) -> SimCell:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.stop()
