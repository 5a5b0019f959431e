"""Plan stubs the protocols share: gantry travel and crucible moves, weighing, dosing, heat
treatment, and the record of computed values.

Conventions:

* Failures that a technician must act on are raised as :class:`SampleFailed` with a message
  that says what happened, where the crucible is and what it holds.
* A carried crucible travels at the layout's ``safe_z`` (up, across, down).
* The heat treatment always ends with the heater off (:func:`heat_treatment` wraps the program
  in a finaliser), whether the program completed, failed or was aborted.

Pause, suspend and resume (bluesky 1.15, read in ``run_engine.py``)
--------------------------------------------------------------------

What the RunEngine does:

* A **deferred pause** (``request_pause(defer=True)``) only sets a flag; the next ``checkpoint``
  message turns it into a pause. A plan without checkpoints runs on to its end.
* An **immediate pause** (``request_pause(defer=False)``) cancels the RunEngine's task wherever
  it awaits: the message in progress (a ``wait``, a ``wait_for``, a ``read``) is cut, and on
  resume the plan gets ``None`` as its reply. The futures a ``wait_for`` awaits are *not*
  cancelled (``asyncio.wait`` leaves them running).
* On every pause and every suspension the RunEngine calls ``stop(success=True)`` on each
  movable the run has ``set`` (``_stop_movable_objects``): for the doser that is ``QRA 61 4``
  (the dose ends part-way), for the gantry a feed hold and a soft reset (which on this cell
  opens the gripper: a carried crucible drops where the head is).
* On **resume** (``_rewind``) the messages cached since the last checkpoint are *replayed*;
  every run starts with one (the cache is a fresh deque). Nothing is cached while
  ``rewindable`` is False, and toggling the flag empties the cache.
* A **suspension** (a suspender trips, e.g. the glovebox-O2 interlock of ``labd.safety``)
  cancels the task like an immediate pause, stops the movables, rewinds, waits for the
  condition to clear, replays, and goes on.

Before this was handled, ``make_sample`` had no checkpoint but the run's first: a pause while
dosing replayed the run from its start (the doses were sent again into the same crucible), and
the pause itself stopped the dose and reset the gantry.

What the sample protocols do about it (:func:`protocols.sample.load_plan`):

* The load runs **non-rewindable** (``bpp.rewindable_wrapper(..., False)``): a resume never
  replays a message; the plan goes on from the message that was interrupted.
* Each world-changing **step** (a crucible move: pick, carry, place; a dose: mount the head,
  check its label, dose; a tare; homing; the furnace start; the station measurement) runs as a
  task on the RunEngine's loop, started by :func:`step` and driven through the instrument
  *clients*, never through a movable the RunEngine has ``set``. So nothing a pause or a
  suspension does stops it half-way: the step runs to its end, and the plan, when it goes on,
  awaits that same task (never starts it again) and checks its outcome. While a step runs,
  :data:`STEPS` names it; the daemon's engine turns a "pause now" into a deferred pause then
  (``labd.engine.Engine.pause``), so the technician is told the cell stops after the step.
* Readings that go into documents (balance, doser, station) are taken in the same kind of task
  and then recorded from a :class:`Snapshot`, so an interrupted read is neither lost nor
  repeated.
* A ``checkpoint`` follows every step and every check: these are the **safe points** where a
  deferred pause lands.

Step by step, for one sample (``make_sample``):

=====================  ==================  ==================  ===========================
step                   deferred pause      immediate pause     suspension
=====================  ==================  ==================  ===========================
home (if needed)       after homing        homing completes,   homing completes, then
                                           then paused         the run waits
crucible move (pick,   after the crucible  the move completes  the move completes (the
carry, place)          is placed           (crucible placed),  crucible is placed), then
                                           then paused         the run waits
tare / weigh           after the weighing  the weighing        same as immediate pause
                       is recorded         completes, then
                                           paused; recorded
                                           once on resume
dose (one element)     after the dose is   the dose completes  the dose completes, then
                       recorded and        (never cut, never   the run waits; on resume
                       checked             re-sent); checked   it is checked, the next
                                           on resume           element follows
furnace program        in the wait (one    the furnace goes on the furnace goes on
                       poll)               with its program    with its program
station measurement    after the sample    the measurement     the measurement completes,
                       event               completes, result   the run waits
                                           read on resume
=====================  ==================  ==================  ===========================

A stop, an abort or a halt of a paused or running plan is not a pause: the plan's failure
path sends the doser's stop and turns the heater off (:func:`protocols.sample.load_plan`); a
crucible move in progress is left to finish (resetting GRBL mid-carry would drop the crucible).
If a dose is cut by something else (the doser stopped by the safety layer, ``I 8``), the dose
fails with the mass the doser reports delivered, and the sample fails saying so: a dose is
never repeated.
"""

from __future__ import annotations

import asyncio
import math
import threading
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


class Steps:
    """The world-changing steps in progress (normally one): what :func:`step` runs. Thread-safe;
    read by the daemon's engine to defer a "pause now" until the step is over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, str] = {}
        self._next = 0

    def begin(self, what: str) -> int:
        with self._lock:
            self._next += 1
            self._running[self._next] = what
            return self._next

    def end(self, token: int) -> None:
        with self._lock:
            self._running.pop(token, None)

    def current(self) -> str | None:
        """What runs now (the oldest step), or None between steps."""
        with self._lock:
            return next(iter(self._running.values()), None)


#: The steps in progress in this process (one cell, one RunEngine per daemon).
STEPS = Steps()


def step(factory: Callable[[], Awaitable[Any]], what: str = "") -> Plan:
    """Run ``factory()`` once as a task on the RunEngine's loop and return its result (or raise
    its error). A pause or a suspension does not cut it: the RunEngine only stops *awaiting* it
    (the plan then gets no reply), so the plan awaits the same task again, and never starts it
    twice. While it runs, :data:`STEPS` names it (``what``), until the task itself ends."""
    started: list[asyncio.Future[Any]] = []

    def start() -> asyncio.Future[Any]:
        if started:  # a replay (a rewindable caller): the step is not sent again
            return started[0]
        task = asyncio.ensure_future(factory())
        if what:
            token = STEPS.begin(what)
            task.add_done_callback(lambda _t: STEPS.end(token))
        started.append(task)
        return task

    futures = yield from bps.wait_for([start])
    while futures is None:  # interrupted (pause, suspend): await the step that went on
        futures = yield from bps.wait_for([lambda: started[0]])
    exc = futures[0].exception()
    if exc is not None:
        raise exc
    return futures[0].result()


def call(factory: Callable[[], Awaitable[Any]]) -> Plan:
    """Await ``factory()`` on the RunEngine's loop; return its result or raise its error. Sent
    once (see :func:`step`)."""
    return (yield from step(factory))


def safe_point() -> Plan:
    """A checkpoint between steps: where a deferred pause lands."""
    yield from bps.checkpoint()


class Snapshot:
    """A device's reading taken in a :func:`step`, recorded as an event by a synchronous
    readable of the same name and keys: recording it cannot be cut half-way by a pause, and
    nothing is read twice. One per device and plan (a stream's objects do not change)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.name: str = device.name
        self.parent = None
        self._reading: dict[str, Any] = {}
        self._describe: dict[str, Any] = {}
        self._config: dict[str, Any] = {}
        self._config_describe: dict[str, Any] = {}

    async def take(self, trigger: bool) -> dict[str, Any]:
        """Trigger (if asked) and read the device; keep the reading for :meth:`emit`."""
        dev = self.device
        if trigger:
            await dev.trigger()
        self._reading = dict(await dev.read())
        self._config = dict(await dev.read_configuration())
        if not self._describe:
            self._describe = dict(await dev.describe())
            self._config_describe = dict(await dev.describe_configuration())
        return self._reading

    def read(self) -> dict[str, Any]:
        return self._reading

    def describe(self) -> dict[str, Any]:
        return self._describe

    def read_configuration(self) -> dict[str, Any]:
        return self._config

    def describe_configuration(self) -> dict[str, Any]:
        return self._config_describe

    def emit(self, stream: str) -> Plan:
        yield from bps.create(stream)
        yield from bps.read(self)
        yield from bps.save()


_SNAPSHOTS: dict[int, Snapshot] = {}


def snapshot_of(device: Any) -> Snapshot:
    """The :class:`Snapshot` of ``device`` (one per device object)."""
    snap = _SNAPSHOTS.get(id(device))
    if snap is None or snap.device is not device:
        snap = _SNAPSHOTS[id(device)] = Snapshot(device)
    return snap


def reading(device: Any, stream: str, *, trigger: bool = True, what: str = "") -> Plan:
    """Trigger and read ``device`` in a :func:`step`, record it as one event of ``stream``, and
    return the reading."""
    snap = snapshot_of(device)
    values = yield from step(lambda: snap.take(trigger), what)
    yield from snap.emit(stream)
    return values


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
        yield from step(client.home, "homing the gantry")


def grip(gantry: Any, close: bool) -> Plan:
    """Close (pick) or open (release) the gripper where the head is."""
    yield from step(lambda: gantry.grip(close), "closing the gripper" if close
                    else "opening the gripper")


async def _travel(gantry: Any, layout: CellLayout, destination: str) -> None:
    target = layout.locations[destination].xyz
    safe = layout.safe_z
    client = gantry.client
    if safe is not None:
        x, y, z = await client.position()
        if z < safe - 0.01:
            await client.move_to(x, y, safe)
        if math.dist((x, y), target[:2]) > 0.01:
            await client.move_to(target[0], target[1], safe)
    await client.move_to(*target)


def travel(gantry: Any, layout: CellLayout, destination: str) -> Plan:
    """Move the head to ``destination``: up to ``safe_z``, across, down (one step)."""
    yield from step(lambda: _travel(gantry, layout, destination),
                    f"moving the gantry to {destination}")


def move_crucible(gantry: Any, layout: CellLayout, source: str, destination: str) -> Plan:
    """Pick the crucible at ``source`` and put it down at ``destination``: one step, so a pause
    or a suspension never leaves the crucible in the gripper (see the module docstring). A
    safe point follows."""

    async def carry() -> None:
        await _travel(gantry, layout, source)
        await gantry.grip(True)
        await _travel(gantry, layout, destination)
        await gantry.grip(False)

    yield from step(carry, f"moving the crucible from {source} to {destination}")
    yield from safe_point()


# -- balance -------------------------------------------------------------------------------------
def weigh(balance: Any, stream: str = "balance") -> Plan:
    """One stable weighing, recorded in ``stream``; returns the net weight in g."""
    values = yield from reading(balance, stream, what="weighing")
    return float(values[balance.weight.name]["value"])


def tare(balance: Any) -> Plan:
    """Tare the balance; returns the tare (the load on the pan), g."""
    grams: float = yield from step(balance.do_tare, "taring the balance")
    return grams


# -- doser ---------------------------------------------------------------------------------------
async def _mounted_head(doser: Any, head: int, element: str) -> None:
    info = await doser.client.mount(head)
    substance = (getattr(info, "substance", "") or "").strip()
    first = substance.split()[0] if substance else ""
    if first in ATOMIC_MASS and first != element:
        raise SampleFailed(f"doser head {head} holds {substance!r}, but the layout says it "
                           f"holds {element}: fix the layout or the head; nothing was dosed")


def check_head(doser: Any, head: int, element: str) -> Plan:
    """Refuse a head whose label names another element than the layout says.

    The Quantos head's ``Substance`` is free text; when its first word is an element symbol it
    must be ``element`` (a wrong head ruins the sample), otherwise it is not checked."""
    yield from step(lambda: _mounted_head(doser, head, element), f"mounting doser head {head}")


def dose(doser: Any, head: int, mg: float, stream: str = "doser", element: str = "") -> Plan:
    """Dose ``mg`` with ``head`` (its label checked against ``element`` first, if given) as one
    step: sent once, never cut by a pause or a suspension, never repeated. The doser's reading
    goes to ``stream``. Returns the mass the doser reports it delivered (mg). A failed dose is
    raised as is (its message says how much was dosed anyway)."""

    async def once() -> None:
        await doser.head.set(head)
        if element:
            await _mounted_head(doser, head, element)
        await doser.dose(float(mg), doser.client.settings.dose_timeout_s)

    yield from step(once, f"dosing {mg:.2f} mg{' of ' + element if element else ''} "
                          f"(head {head})")
    values = yield from reading(doser, stream, trigger=False)
    return float(values[doser.last_dose_mg.name]["value"])


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
        # The PV too, through the signal: each poll is a point of the recorded profile (see
        # wait_cooled), so the profile is as dense as the wait, at any clock rate.
        await furnace.temperature.get_value(cached=False)
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
    Raises :class:`FurnaceAlarm` on a sensor break (the PV means nothing then).

    The PV is read through the ``temperature`` signal, not the client, so that every reading
    this wait decides on also reaches the signal's subscribers: while the heat treatment
    monitors the PV, the recorded profile ends with the very reading at which the crucibles were
    released (the monitor's own poll runs on its own period and could end a step earlier)."""
    client = furnace.client

    async def look() -> tuple[FurnaceStatus, float]:
        return await client.status(), await furnace.temperature.get_value(cached=False)

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
