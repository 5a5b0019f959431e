"""All the instruments of one cell, built from configuration.

A real cell and the simulated cell differ only in addresses: the same :class:`InstrumentsConfig`
(YAML under ``instruments:`` in the daemon's config) names ``/dev/ttyUSB0`` or a pty, a Modbus
gateway or the simulator's port. :func:`instruments_from_endpoints` writes that config for a running
``labd-sim`` from its ``--endpoints`` JSON.

:class:`CellDevices` owns the transports (:class:`~drivers.links.Links`), the protocol clients and
the ophyd-async devices. ``connect()`` connects every device concurrently and reports the ones
that did not answer instead of failing the others; ``retry_down()`` tries those again (the daemon
calls it in the background); ``safe_state()`` brings every device to its safe state, each
attempted even if another fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from .aio import wait_for
from .instruments.balance import Balance, BalanceSettings
from .instruments.doser import Doser, DoserSettings
from .instruments.furnace import Furnace, FurnaceSettings
from .instruments.gantry import Gantry, GantrySettings
from .instruments.probe import Probe, ProbeSettings
from .instruments.safety import SafetySensors, SafetySettings
from .instruments.station import Station, StationSettings
from .links import Links, ModbusLink, MqttLink, SerialLink
from .ophyd.balance import make_balance_device
from .ophyd.doser import make_doser_device
from .ophyd.furnace import make_furnace_device
from .ophyd.gantry import make_gantry_device
from .ophyd.probe import make_probe_device
from .ophyd.safety import make_safety_device
from .ophyd.station import make_station_device

log = logging.getLogger(__name__)


class InstrumentsConfig(BaseModel):
    """The instruments of a cell; a missing one is simply not part of this cell."""

    model_config = ConfigDict(extra="forbid")

    balance: BalanceSettings | None = None
    doser: DoserSettings | None = None
    gantry: GantrySettings | None = None
    furnace: FurnaceSettings | None = None
    probe: ProbeSettings | None = None
    station: StationSettings | None = None
    safety: SafetySettings | None = None


#: name -> (client class, device factory). Order: how they are connected and listed.
_BUILDERS: dict[str, tuple[Callable[..., Any], Callable[[str, Any], Any]]] = {
    "balance": (Balance, make_balance_device),
    "doser": (Doser, make_doser_device),
    "gantry": (Gantry, make_gantry_device),
    "furnace": (Furnace, make_furnace_device),
    "probe": (Probe, make_probe_device),
    "station": (Station, make_station_device),
    "safety": (SafetySensors, make_safety_device),
}


class CellDevices:
    def __init__(self, config: InstrumentsConfig, *, client_name: str = "labd",
                 status_topic: str | None = None) -> None:
        self.config = config
        self.links = Links(client_name, status_topic)
        self.clients: dict[str, Any] = {}
        self.devices: dict[str, Any] = {}
        #: name -> why it is down (absent: up).
        self.down: dict[str, str] = {}
        for name, (client_cls, make_device) in _BUILDERS.items():
            settings = getattr(config, name)
            if settings is None:
                continue
            client = client_cls(name, settings, self.links)
            self.clients[name] = client
            self.devices[name] = make_device(name, client)

    async def _connect_one(self, name: str, timeout: float) -> str | None:
        client = self.clients[name]
        try:
            start = getattr(client, "start", None)
            if start is not None:
                await wait_for(start(), timeout)
            await self.devices[name].connect(timeout=timeout)
        except Exception as exc:  # reported per device; the others go on
            text = str(exc).strip().replace("\n", " ") or type(exc).__name__
            return f"{type(exc).__name__}: {text}"
        return None

    async def connect(self, timeout: float = 10.0) -> dict[str, str | None]:
        """Connect every device; return ``{name: None | reason it is down}``."""
        await self.links.start()
        names = list(self.devices)
        results = await asyncio.gather(*(self._connect_one(n, timeout) for n in names))
        report = dict(zip(names, results, strict=True))
        self.down = {n: r for n, r in report.items() if r is not None}
        for name, reason in self.down.items():
            log.warning("%s is down: %s", name, reason)
        return report

    async def retry_down(self, timeout: float = 5.0) -> dict[str, str | None]:
        """Try the devices that are down again; return what changed."""
        changed: dict[str, str | None] = {}
        for name in list(self.down):
            reason = await self._connect_one(name, timeout)
            if reason is None:
                del self.down[name]
                changed[name] = None
                log.info("%s is up", name)
            else:
                self.down[name] = reason
        return changed

    def available(self) -> dict[str, Any]:
        """The devices that are up."""
        return {n: d for n, d in self.devices.items() if n not in self.down}

    async def safe_state(self, timeout: float = 10.0) -> dict[str, str | None]:
        """Every device to its safe state (heaters off, motion stopped, dosing stopped)."""

        async def one(name: str) -> str | None:
            safe = getattr(self.devices[name], "safe_state", None)
            if safe is None:
                return None
            try:
                await wait_for(safe(), timeout)
            except Exception as exc:
                log.error("%s: safe state failed: %s", name, exc)
                return f"{type(exc).__name__}: {exc}"
            return None

        names = list(self.devices)
        results = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        for client in self.clients.values():
            close = getattr(client, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception as exc:
                    log.debug("closing %s: %s", client, exc)
        await self.links.close()


def instruments_from_endpoints(
    endpoints: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> InstrumentsConfig:
    """The instruments of a running ``labd-sim`` cell, from its ``--endpoints`` JSON.

    ``overrides`` adds or replaces settings per instrument (e.g. timeouts for a time scale).
    """
    devs = endpoints["devices"]
    over = {k: dict(v) for k, v in (overrides or {}).items()}
    data: dict[str, dict[str, Any]] = {}

    def serial(name: str) -> dict[str, Any]:
        d = devs[name]
        link = SerialLink(url=d.get("pty") or d["url"], baudrate=d.get("baudrate", 9600))
        return link.model_dump()

    if "balance" in devs:
        data["balance"] = {"link": serial("balance")}
    if "doser" in devs:
        data["doser"] = {"link": serial("doser")}
    if "gantry" in devs:
        locations = {n: (v["x"], v["y"], v["z"]) for n, v in endpoints.get("locations", {}).items()}
        data["gantry"] = {"link": serial("gantry"), "locations": locations}
    if "probe" in devs:
        data["probe"] = {"link": serial("probe"),
                         "terminator": devs["probe"].get("terminator", "CR")}
    if "furnace" in devs:
        d = devs["furnace"]
        link = ModbusLink(framing="tcp", host=d["tcp_host"], port=d["tcp_port"],
                          unit_id=d.get("unit_id", 1)) if "tcp_port" in d else ModbusLink(
            framing="rtu", url=d["pty"], unit_id=d.get("unit_id", 1))
        data["furnace"] = {"link": link.model_dump()}
    elements = list(endpoints.get("ground_truth", {}).get("elements", []))
    for name in ("station", "safety"):
        if name in devs:
            d = devs[name]
            host, _, port = d["address"].rpartition(":")
            link = MqttLink(host=host, port=int(port), topic=d["root"]).model_dump()
            data[name] = {"link": link}
    if "station" in data:
        data["station"]["elements"] = elements
        data["station"]["property_unit"] = endpoints.get("ground_truth", {}).get("unit") or None
    for name, extra in over.items():
        data.setdefault(name, {}).update(extra)
    return InstrumentsConfig.model_validate(data)
