"""Mettler Toledo XS/XPR balance simulator (MT-SICS level 0/1 over serial).

Wire: 9600 8N1 by default (``serial.baudrate``), ASCII, every line ends CR LF. Served on a raw pty
whose path is the stable symlink ``<run_dir>/<name>`` and, if ``serial.tcp_port`` is set, as a raw
byte stream on TCP (``socket://host:port``).

Commands and replies (see :mod:`hardware_sims.mtsics` for the full table)::

    S\\r\\n      -> S S     100.0000 g\\r\\n   stable net weight (waits up to stable_timeout_s)
                -> S I | S + | S -          not stable in time | overload | underload
    SI\\r\\n     -> S D      12.3401 g\\r\\n   immediate: S (stable) or D (dynamic, still moving)
    SIR\\r\\n    -> SI replies repeated until any other command (or @)
    Z\\r\\n      -> Z A\\r\\n                 (Z I not stable, Z + / Z - outside ±2 % of capacity)
    ZI          -> ZI S | ZI D
    T\\r\\n      -> T S      12.0000 g\\r\\n   tare (T I, T +, T -)
    TA          -> TA A <tare> g;  TA <value> g presets the tare;  TAC -> TAC A clears it
    I1 / I2 / I3 / I4 -> I1 A "01" ... / I2 A "<model> <capacity> g" / I3 A "<sw>" / I4 A "<sn>"
    @           -> I4 A "<sn>"     reset: cancels pending commands and SIR, clears the tare
    XYZ\\r\\n    -> ES\\r\\n        unknown command (or wrong number of parameters)
    non-ASCII   -> ET             transmission error
    TA abc      -> TA L           parameter not acceptable

The weight is right-aligned in a 10-character field, rounded to ``readability_g``, unit ``g``.

Physics: the pan carries the crucible at world location ``location`` (its ``gross_g``) plus the
reference masses placed by the control channel; without the pan (control ``remove_pan``) the load
cell is in underload. After any load change the reading moves to the new value over ``settle_s``
virtual seconds (``S D`` meanwhile), then it is stable with Gaussian noise ``noise_g``. ``S`` above
capacity answers ``S +`` at once.

Faults (set through the control channel or the config):

* ``no_reply`` / ``late_reply`` / ``garble`` / ``truncate``: applied to each reply line by the
  serial endpoint (a SIR stream is affected line by line).
* ``error``: the next command(s) (``count``) are not executed and answered by code:
  ``1`` -> ``ES``, ``2`` -> ``ET``, ``3`` (or no code) -> ``EL``; any other code ->
  ``<command> I`` (the balance cannot execute it now).
* ``disconnect``: the pty vanishes (symlink removed) for ``duration_s`` and a new one appears
  behind the same symlink; balance state (zero, tare, masses) survives, a half-received line does
  not. ``clear`` of the fault plugs the cable back in at once.

Control actions (:meth:`BalanceSim.control`):

* ``place_mass`` ``{"grams": float, "name": str?}``: put a reference mass on the pan.
* ``remove_mass`` ``{"name": str?}``: take one off (the named one, else the last placed).
* ``remove_pan`` / ``replace_pan``: take the weighing pan off (underload) and put it back.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from .base import DeviceConfig, SerialEndpointConfig, SimContext, SimInstrument
from .faults import FaultKind
from .mtsics import PAN_MASS_G, LoadCell, SicsWeigher, format_weight
from .serial_link import SerialEndpoint


class BalanceConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    model: str = "XS205DU"
    serial_number: str = "B943621745"
    capacity_g: float = Field(default=220.0, gt=0)
    #: Display resolution (d), grams.
    readability_g: float = Field(default=0.0001, gt=0)
    #: Standard deviation of the reading noise once settled, grams.
    noise_g: float = Field(default=0.00005, ge=0)
    #: Virtual seconds the reading takes to settle after the load changes.
    settle_s: float = Field(default=2.0, ge=0)
    #: World location whose crucible sits on the pan.
    location: str = "balance"
    #: Longest ``S``/``Z``/``T`` wait for a stable value before ``S I`` (virtual seconds).
    stable_timeout_s: float = Field(default=10.0, gt=0)
    #: ``SIR`` update interval (virtual seconds; never faster than the baud rate allows).
    update_s: float = Field(default=0.1, gt=0)
    #: Firmware version answered by ``I3`` (and in ``I1``).
    software: str = "2.30"


#: ``error`` fault code -> reply (codes not listed answer ``<command> I``).
ERROR_REPLIES = {1: "ES", 2: "ET", 3: "EL"}


class BalanceSim(SimInstrument):
    """A Mettler Toledo analytical balance on a serial line (MT-SICS)."""

    kind: ClassVar[str] = "balance"
    config: BalanceConfig

    def __init__(self, name: str, config: BalanceConfig, ctx: SimContext) -> None:
        super().__init__(name, config, ctx)
        self.config = config
        self.masses: list[tuple[str, float]] = []
        self.pan_on = True
        self.cell = LoadCell(
            ctx.clock,
            ctx.rng(name),
            self._pan_load,
            capacity_g=config.capacity_g,
            readability_g=config.readability_g,
            noise_g=config.noise_g,
            settle_s=config.settle_s,
        )
        self.sics = SicsWeigher(
            self.cell,
            model=config.model,
            serial_number=config.serial_number,
            software=config.software,
            stable_timeout_s=config.stable_timeout_s,
            baudrate=config.serial.baudrate,
            update_s=config.update_s,
            error_reply=self._error_reply,
        )
        self._endpoint = SerialEndpoint(name, config.serial, ctx.run_dir, self.faults, self.sics)

    # -- physics -------------------------------------------------------------------------------
    def _pan_load(self) -> float:
        """True load on the weighing cell relative to the empty pan, grams."""
        if not self.pan_on:
            return -PAN_MASS_G
        crucible = self.ctx.world.crucible_at(self.config.location)
        load = crucible.gross_g if crucible is not None else 0.0
        return load + sum(g for _, g in self.masses)

    def _error_reply(self, command: str) -> str | None:
        fault = self.faults.take(FaultKind.ERROR)
        if fault is None:
            return None
        code = 3 if fault.code is None else fault.code
        return ERROR_REPLIES.get(code, f"{command} I")

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._endpoint.start()
        self.cell.start()
        self.sics.start()
        await self.apply_initial_faults()

    async def stop(self) -> None:
        await self.sics.stop()
        await self.cell.stop()
        await self._endpoint.stop()

    async def clear_fault(self, kind: FaultKind | None = None) -> None:
        await super().clear_fault(kind)
        if kind in (None, FaultKind.DISCONNECT) and not self._endpoint.connected:
            await self._endpoint.reconnect()

    def endpoint(self) -> dict[str, Any]:
        return dict(self._endpoint.endpoint())

    # -- control channel -----------------------------------------------------------------------
    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "place_mass":
            grams = float(args["grams"])
            if not grams > 0:
                raise ValueError(f"{self.name}: place_mass needs grams > 0, got {grams!r}")
            name = str(args.get("name") or f"M{len(self.masses) + 1}:{grams:g}g")
            if any(n == name for n, _ in self.masses):
                raise ValueError(f"{self.name}: a mass named {name!r} is already on the pan")
            self.masses.append((name, grams))
        elif action == "remove_mass":
            if not self.masses:
                raise ValueError(f"{self.name}: no reference mass on the pan")
            wanted = args.get("name")
            if wanted is None:
                name, grams = self.masses.pop()
            else:
                idx = next((i for i, (n, _) in enumerate(self.masses) if n == wanted), None)
                if idx is None:
                    on_pan = [n for n, _ in self.masses]
                    raise ValueError(f"{self.name}: no mass {wanted!r} on the pan (on: {on_pan})")
                name, grams = self.masses.pop(idx)
        elif action == "remove_pan":
            self.pan_on = False
        elif action == "replace_pan":
            self.pan_on = True
        else:
            return await super().control(action, args)
        self.cell.track()
        return self.state()

    def state(self) -> dict[str, Any]:
        reading = self.cell.read()
        crucible = self.ctx.world.crucible_at(self.config.location)
        d = self.config.readability_g
        return {
            "kind": self.kind,
            "connected": self._endpoint.connected,
            "location": self.config.location,
            "crucible": crucible.id if crucible is not None else None,
            "pan_on": self.pan_on,
            "masses": [{"name": n, "grams": g} for n, g in self.masses],
            "true_load_g": self.cell.true_gross(),
            "zero_g": self.cell.zero_g,
            "tare_g": self.cell.tare_g,
            "reading_g": float(format_weight(reading.net_g, d)),
            "stable": reading.stable,
            "overload": reading.overload,
            "underload": reading.underload,
            "streaming": self.sics.streaming,
            "faults": self.faults.state(),
        }
