"""Plan stubs the protocols share: gantry travel and crucible moves, weighing, dosing, heat
treatment, and the record of computed values.

Conventions:

* Failures that a technician must act on are raised as :class:`SampleFailed` with a message
  that says what happened, where the crucible is and what it holds.
* A carried crucible travels at the layout's ``safe_z`` (up, across, down).
* The heat treatment always ends with the heater off (:func:`heat_treatment` wraps the program
  in a finaliser), whether the program completed, failed or was aborted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import FailedStatus, Msg, RequestAbort, RequestStop

from drivers.instruments.furnace import (
    Dwell,
    FurnaceAlarm,
    FurnaceProgram,
    FurnaceStatus,
    Ramp,
    RunMode,
    Step,
)
from drivers.ophyd.balance import tare as balance_tare

from .composition import ATOMIC_MASS
from .layout import CellLayout

Plan = Generator[Msg, Any, Any]


class SampleFailed(RuntimeError):
    """A protocol step failed in a way the technician must look at (the message says how)."""


def why(exc: BaseException) -> str:
    """The message of the error behind ``exc`` (a failed status wraps the driver's error)."""
    while isinstance(exc, FailedStatus) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip() or type(exc).__name__
    return text


def call(factory: Callable[[], Awaitable[Any]]) -> Plan:
    """Await ``factory()`` on the RunEngine's loop; return its result or raise its error."""
    futures = yield from bps.wait_for([factory])
    fut = futures[0]
    exc = fut.exception()
    if exc is not None:
        raise exc
    return fut.result()


def devices_of(devices: Mapping[str, Any], *names: str) -> list[Any]:
    """The named devices, or a clear error naming the missing ones."""
    missing = [n for n in names if devices.get(n) is None]
    if missing:
        raise SampleFailed(f"the cell has no {', '.join(missing)} device (available: "
                           f"{', '.join(sorted(k for k, v in devices.items() if v is not None))})")
    return [devices[n] for n in names]


def layout_of(devices: Mapping[str, Any]) -> CellLayout:
    layout = devices.get("layout")
    if not isinstance(layout, CellLayout):
        raise SampleFailed("the protocols need the cell layout as devices['layout'] "
                           "(protocols.layout.CellLayout)")
    return layout


# -- gantry --------------------------------------------------------------------------------------
def ensure_homed(gantry: Any) -> Plan:
    """Home the gantry if the controller asks for it (after power-up, a reset or an alarm)."""
    client = gantry.client
    if client.needs_homing or client.alarm is not None or client.last_status is None:
        yield from call(client.home)


def grip(gantry: Any, close: bool) -> Plan:
    """Close (pick) or open (release) the gripper where the head is."""
    yield from call(lambda: gantry.grip(close))


def travel(gantry: Any, layout: CellLayout, destination: str) -> Plan:
    """Move the head to ``destination``: up to ``safe_z``, across, down."""
    target = layout.locations[destination].xyz
    safe = layout.safe_z
    if safe is not None:
        x, y, z = yield from call(gantry.client.position)
        if z < safe - 0.01:
            yield from bps.mv(gantry.position, (x, y, safe))
        if math.dist((x, y), target[:2]) > 0.01:
            yield from bps.mv(gantry.position, (target[0], target[1], safe))
    yield from bps.mv(gantry.position, target)


def move_crucible(gantry: Any, layout: CellLayout, source: str, destination: str) -> Plan:
    """Pick the crucible at ``source`` and put it down at ``destination``."""
    yield from travel(gantry, layout, source)
    yield from grip(gantry, True)
    yield from travel(gantry, layout, destination)
    yield from grip(gantry, False)


# -- balance -------------------------------------------------------------------------------------
def weigh(balance: Any, stream: str = "balance") -> Plan:
    """One stable weighing, recorded in ``stream``; returns the net weight in g."""
    readings = yield from bps.trigger_and_read([balance], name=stream)
    return float(readings[balance.weight.name]["value"])


def tare(balance: Any) -> Plan:
    """Tare the balance; returns the tare (the load on the pan), g."""
    grams: float = yield from balance_tare(balance)
    return grams


# -- doser ---------------------------------------------------------------------------------------
def check_head(doser: Any, head: int, element: str) -> Plan:
    """Refuse a head whose label names another element than the layout says.

    The Quantos head's ``Substance`` is free text; when its first word is an element symbol it
    must be ``element`` (a wrong head ruins the sample), otherwise it is not checked."""
    info = yield from call(lambda: doser.client.mount(head))
    substance = (getattr(info, "substance", "") or "").strip()
    first = substance.split()[0] if substance else ""
    if first in ATOMIC_MASS and first != element:
        raise SampleFailed(f"doser head {head} holds {substance!r}, but the layout says it "
                           f"holds {element}: fix the layout or the head; nothing was dosed")


def dose(doser: Any, head: int, mg: float, stream: str = "doser") -> Plan:
    """Dose ``mg`` with ``head``; the doser's reading goes to ``stream``. Returns the mass the
    doser reports it delivered (mg). A failed dose is raised as is (its message says how much
    was dosed anyway)."""
    yield from bps.mv(doser.head, head)
    yield from bps.mv(doser, mg)
    readings = yield from bps.trigger_and_read([doser], name=stream)
    return float(readings[doser.last_dose_mg.name]["value"])


# -- furnace -------------------------------------------------------------------------------------
def anneal_program(anneal_c: float, anneal_s: float, ramp_c_min: float,
                   end_c: float) -> FurnaceProgram:
    """Ramp to ``anneal_c`` at ``ramp_c_min``, hold ``anneal_s``, then step the setpoint down to
    ``end_c`` (the furnace cools freely; the program is COMPLETE at once)."""
    return FurnaceProgram(segments=[
        Ramp(target_c=anneal_c, rate_c_min=ramp_c_min),
        Dwell(duration_s=round(anneal_s)),
        Step(target_c=end_c),
    ])


#: What the RunEngine throws into a plan on abort and stop: not a failure of the heat treatment.
_INTERRUPTIONS = (RequestAbort, RequestStop)


def heater_off(furnace: Any) -> Plan:
    """Programmer reset, setpoint to the safe value, standby."""
    yield from call(furnace.safe_state)


def heat_treatment(furnace: Any, program: FurnaceProgram, *, unload_below_c: float | None = None,
                   stream: str = "furnace", poll_s: float = 0.2) -> Plan:
    """Run ``program`` and wait for the furnace to report it complete, then (if asked) until the
    chamber has cooled below ``unload_below_c``; the heater is off at the end in every case.

    The temperature actually followed is recorded in ``stream`` (a monitor of the PV, one event
    per poll of the controller), the running segment in ``<stream>_segment``, and the program
    that was started in ``<stream>_program`` (one event, its JSON).

    Pause and suspend: the controller runs its program by itself, and a paused *plan* must not
    stop it. So the program is started through the client (the programmer is not a movable the
    RunEngine has set, which it would ``stop()`` -- heater off -- on every pause and suspension),
    and the start is not rewindable (a resume never replays it: that would restart the program).
    The waits then poll the controller every ``poll_s`` wall seconds, each poll after a
    checkpoint: a deferred pause takes effect within one poll, and a resume rewinds into the
    wait, which goes on until the program completes. An abort or any failure still turns the
    heater off (the finaliser). The last checkpoint is the last poll of the cooling wait: a pause
    after the heat treatment rewinds to there unless the caller checkpoints later."""

    def body() -> Plan:
        yield from call(furnace.client.operate)  # leave standby (the last heater-off set it)
        yield from bps.monitor(furnace.temperature, name=stream)
        yield from bps.monitor(furnace.programmer.segment, name=f"{stream}_segment")
        try:
            yield from bpp.rewindable_wrapper(start_program(furnace, program, stream), False)
            yield from wait_program_done(furnace, program, poll_s)
        except _INTERRUPTIONS:
            raise  # an abort or stop stays what it is (the finaliser turns the heater off)
        except Exception as exc:
            raise SampleFailed(
                f"the heat treatment failed: {why(exc)}; heater switched off") from exc
        if unload_below_c is not None:
            try:
                yield from wait_cooled(furnace, unload_below_c, poll_s)
            except _INTERRUPTIONS:
                raise
            except Exception as exc:
                raise SampleFailed(f"waiting for the furnace to cool below {unload_below_c:g} °C "
                                   f"failed: {why(exc)}; heater switched off") from exc
        yield from bps.unmonitor(furnace.programmer.segment)
        yield from bps.unmonitor(furnace.temperature)

    return (yield from bpp.finalize_wrapper(body(), heater_off(furnace)))


def start_program(furnace: Any, program: FurnaceProgram, stream: str = "furnace") -> Plan:
    """Write ``program`` to the controller and run it (through the client, sent once), and
    record it as one event of ``<stream>_program``. Meant to run non-rewindable (see
    :func:`heat_treatment`).

    If a pause or a suspension interrupts the start, the RunEngine resumes the plan without a
    reply; the start itself went on on the loop meanwhile, so its outcome is awaited (never
    re-sent)."""
    started: list[asyncio.Future[None]] = []

    def start() -> asyncio.Future[None]:
        started.append(asyncio.ensure_future(furnace.client.run_program(program)))
        return started[-1]

    futures = yield from bps.wait_for([start])
    while futures is None:  # interrupted (pause, suspend): await the start that went on
        futures = yield from bps.wait_for([lambda: started[-1]])
    exc = futures[0].exception()
    if exc is not None:
        raise exc
    record = Record(f"{stream}_program", {"program": str}, source=f"protocol:{furnace.name}")
    yield from record.emit(program=program.model_dump_json())


def _poll(factory: Callable[[], Awaitable[Any]]) -> Plan:
    """``factory()`` awaited on the RunEngine's loop (its error raised), or None when a pause or
    a suspension interrupted it (the RunEngine then resumes the plan with no reply)."""
    futures = yield from bps.wait_for([factory])
    if futures is None:
        return None
    exc = futures[0].exception()
    if exc is not None:
        raise exc
    return futures[0].result()


def wait_program_done(furnace: Any, program: FurnaceProgram, poll_s: float = 0.2) -> Plan:
    """Wait, a checkpoint before each poll, until the started ``program`` completes (run mode
    COMPLETE, or RESET for an ``end="reset"`` program); returns the run mode. Raises
    :class:`FurnaceAlarm` if the furnace cannot heat, :class:`SampleFailed` if the program was
    reset before it completed."""
    client = furnace.client

    async def look() -> tuple[FurnaceStatus, RunMode]:
        return await client.status(), await client.run_mode()

    while True:
        yield from bps.checkpoint()
        seen = yield from _poll(look)
        if seen is not None:
            status, mode = seen
            if status.fault is not None:
                raise FurnaceAlarm(client.name, "wait for program end", status)
            if mode is RunMode.COMPLETE or (mode is RunMode.RESET and program.end == "reset"):
                return mode
            if mode is RunMode.RESET:
                raise SampleFailed("the furnace program stopped before it completed (run mode "
                                   "RESET: reset on the controller)")
        yield from bps.sleep(poll_s)


def wait_cooled(furnace: Any, below_c: float, poll_s: float = 0.2) -> Plan:
    """Wait, a checkpoint before each poll, until the PV is at or below ``below_c``; returns it.
    Raises :class:`FurnaceAlarm` on a sensor break (the PV means nothing then)."""
    client = furnace.client

    async def look() -> tuple[FurnaceStatus, float]:
        return await client.status(), await client.temperature()

    while True:
        yield from bps.checkpoint()
        seen = yield from _poll(look)
        if seen is not None:
            status, pv = seen
            if status.sensor_break:
                raise FurnaceAlarm(client.name, f"wait for {below_c:g} °C", status)
            if pv <= below_c:
                return pv
        yield from bps.sleep(poll_s)


# -- records -------------------------------------------------------------------------------------
_DTYPES = {float: "number", int: "integer", str: "string", bool: "boolean"}


class Record:
    """A Bluesky readable of values the protocol computed (the ``sample`` event of
    :mod:`labd.samples`): ``set(**values)``, then :meth:`emit` reads it as one event of stream
    ``name``. Data keys are fixed at construction (a stream's keys do not change)."""

    def __init__(self, name: str, keys: Mapping[str, type], *, source: str,
                 units: Mapping[str, str | None] | None = None) -> None:
        self.name = name
        self.parent = None
        self._types = dict(keys)
        self._source = source
        self._units = dict(units or {})
        self._values: dict[str, Any] = {}
        self._time = 0.0

    def set(self, **values: Any) -> None:
        missing = set(self._types) - set(values)
        extra = set(values) - set(self._types)
        if missing or extra:
            raise ValueError(f"record {self.name}: missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
        self._values = {k: self._types[k](v) for k, v in values.items()}
        self._time = time.time()

    def describe(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, typ in self._types.items():
            dk: dict[str, Any] = {"source": f"{self._source}/{key}", "dtype": _DTYPES[typ],
                                  "shape": []}
            unit = self._units.get(key)
            if unit:
                dk["units"] = unit
            out[key] = dk
        return out

    def read(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": v, "timestamp": self._time} for k, v in self._values.items()}

    def emit(self, **values: Any) -> Plan:
        """Set ``values`` and record them as one event of this record's stream."""
        self.set(**values)
        yield from bps.create(self.name)
        yield from bps.read(self)
        yield from bps.save()
