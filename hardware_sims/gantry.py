"""XYZ gantry simulator: GRBL 1.1h over serial, with a gripper on the flood-coolant output.

Modelled on gnea/grbl 1.1h (``doc/markdown/interface.md``, ``commands.md``, ``doc/csv/*`` and the
firmware's ``protocol.c``/``gcode.c``/``report.c``), built with ``VARIABLE_SPINDLE``,
``HOMING_FORCE_SET_ORIGIN`` and the safety-door input pin (``$I`` -> ``[OPT:VZ+,15,128]``),
homing X and Y towards their minimum and Z up (``$23=3``).

Wire
----
115200 8N1 (``serial.baudrate``). Served on a raw pty, stable symlink ``<run_dir>/<name>``, and on
TCP when ``serial.tcp_port`` is set. Everything GRBL sends ends in ``\\r\\n``.

*Connect.* Plugging the cable in (start, or the end of a ``disconnect`` fault) resets the
controller as the DTR auto-reset of an Arduino-based GRBL does: machine position reads
``0.000,0.000,0.000`` (the head has not moved: its physical position is kept, GRBL just does not
know it), the planner is empty, the coolant outputs (gripper) drop, and it prints::

    \\r\\nGrbl 1.1h ['$' for help]\\r\\n
    [MSG:'$H'|'$X' to unlock]\\r\\n            (when $22=1: state Alarm until $H or $X)

The same banner follows a soft reset (Ctrl-X, 0x18), which keeps the machine position.

*Lines.* Every byte other than a real-time command goes to a 128-byte receive buffer (bytes that
arrive while it is full are lost, as on the real controller: stream with character counting or
send-and-wait). CR and LF each end a line; spaces and control characters are dropped, ``(...)`` and
``;...`` comments are removed, letters are upper-cased. **Each CR and each LF ends a line, so a
line sent with CR LF gets a second ``ok`` for the empty line that follows** (as on real GRBL; send
``\\n`` only). Every line gets exactly one ``ok`` or ``error:N``:

=================  ===========================================================================
``$``              ``[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]``
``$$``             ``$0=10`` ... ``$132=100.000`` then ``ok`` (``error:8`` while Run or Hold)
``$x=val``         store a setting (Idle/Alarm only: ``error:8``); unknown ``$x`` -> ``error:3``;
                   ``$20=1`` without ``$22=1`` -> ``error:10``
``$#``             ``[G54:0.000,0.000,0.000]`` ... ``[TLO:0.000]`` ``[PRB:0.000,0.000,0.000:0]``
``$G``             ``[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]``
``$I``             ``[VER:1.1h.20190830:]`` ``[OPT:VZ+,15,128]``
``$N``             ``$N0=`` ``$N1=`` (startup blocks are not stored: ``$Nx=line`` -> ``error:3``)
``$X``             in Alarm: ``[MSG:Caution: Unlocked]`` then ``ok`` (door open: ``error:13``)
``$H``             homing (Idle/Alarm only, else ``error:8``; ``$22=0``: ``error:5``; door open:
                   ``error:13``). The ``ok`` comes when homing is done, at machine zero.
``$C``             check mode on ``[MSG:Enabled]``; off ``[MSG:Disabled]`` then a soft reset
``$SLP``           ``[MSG:Sleeping]``; state Sleep until a reset, which comes back in Alarm
``$J=<g-code>``    jog (Idle/Jog only, ``error:8``): needs F (``error:22``) and axis words;
                   target beyond travel with ``$20=1`` -> ``error:15`` (no alarm); other g-code in
                   the jog line -> ``error:16``
``G0/G1 X Y Z F``  linear moves; ``G4 P<s>`` dwell; ``G20/G21``; ``G90/G91``; ``G93/G94``;
                   ``G17/18/19``; ``G53``; ``G54``-``G59`` (all offsets zero); ``G40 G49 G61
                   G80``; ``M0`` pause, ``M1`` ignored, ``M2/M30`` end (``[MSG:Pgm End]``);
                   ``M3/M4/M5 S``; ``M8`` close the gripper, ``M9`` open it; ``N``, ``T``.
=================  ===========================================================================

Error codes (GRBL's own): 1 expected command letter, 2 bad number format, 3 invalid ``$``
statement, 4 negative value, 5 homing disabled, 8 not idle, 9 g-code locked out in Alarm or Jog,
10 soft limits need homing, 11 line overflow (> 80 characters), 13 door open, 15 jog travel
exceeded, 16 invalid jog command, 20 unsupported command (also ``G2/G3`` arcs, ``G10``,
``G28/G30``, ``G38.x``, ``G43.1``, ``G92``, which this simulator does not model), 21 modal group
violation, 22 feed rate undefined, 23 non-integer command value, 25 repeated word, 26 no axis
words (``G53``), 27 bad line number, 28 ``G4`` without ``P``, 31 axis words with ``G80``,
36 unused words.

*Planner.* A motion line is answered ``ok`` as soon as it is in the 15-block planner (when the
planner is full, the ``ok`` waits for room); motion runs in the background on the virtual clock.
Each block is a trapezoid from rest to rest: the nominal rate is ``F`` (G1; ``G93``: the block
takes 1/F min) or the rapid rate (G0), limited per axis by ``$110-$112``, the acceleration by
``$120-$122`` projected on the direction of travel; axes move together on a straight line. (Real
GRBL blends junctions with ``$11`` junction deviation; here every block stops, so chained moves
take slightly longer.) ``M8``/``M9``, ``G4``, ``M0``, ``M2``/``M30`` wait until the planner is
empty (their ``ok`` comes after the motion before them ended), then act.

*Real-time commands* (single bytes, no line end, no ``ok``, never in the receive buffer):

- ``?`` -> ``<Idle|MPos:0.000,0.000,0.000|FS:0,0>``; states ``Idle Run Hold:0 Hold:1 Jog Alarm
  Door:0..3 Check Home Sleep``; ``FS`` is the current feed (mm/min) and spindle speed; ``|Pn:D``
  while the door is open; ``|WCO:0.000,0.000,0.000`` in the first report after a reset and every
  10th (30th while busy); ``|Ov:100,100,100`` (with ``|A:F`` while the gripper output is on) in
  the report after that and every 10th (20th busy), exactly as GRBL's counters do. No report
  while a hard/soft-limit alarm waits for a reset; during homing one ``?`` is answered when
  homing ends (``<Home|...>``).
- ``!`` feed hold: ``Hold:1`` while decelerating, ``Hold:0`` when stopped (from Idle at once).
  While held, lines are not read (no ``ok`` until resumed).
- ``~`` cycle start: resumes a completed hold, or a closed door (``Door:0`` -> ``Door:3``,
  re-energising the gripper for 1 s, then Run or Idle).
- 0x18 soft reset: stops everything, drops the gripper, empties buffers. In motion (or homing)
  this loses position: ``ALARM:3`` (``ALARM:6`` homing), and the machine needs ``$H``/``$X``.
  A line that was being executed gets its ``ok`` first, then the banner follows.
- 0x84 safety door (as the door switch), 0x85 jog cancel, 0x90-0x97 feed/rapid overrides.

*Alarms* (``ALARM:N``, state Alarm, g-code answered ``error:9`` until ``$X``/``$H``):
1 hard limit and 2 soft limit are critical: ``ALARM:N`` then ``[MSG:Reset to continue]``, and
nothing but Ctrl-X is served (lines wait unanswered and are discarded by the reset, ``?`` is
ignored); after the reset the banner and ``[MSG:'$H'|'$X' to unlock]`` follow. A G0/G1 whose
target leaves the travel (``$20=1``; X 0..$130, Y 0..$131, Z -$132..0) stops the machine in a
controlled way and raises ``ALARM:2`` (position kept). Other alarms reset the controller at once:
``ALARM:N``, banner, unlock message. Alarms 1, 3 and 6-9 mark the position as lost (``homed``
false in :meth:`GantrySim.state`).

*Safety door* (control ``open_door`` / ``close_door``, or 0x84): ``[MSG:Check Door]``; in motion
the machine decelerates (``Door:2``) and stops (``Door:1``); idle it goes to ``Door:1`` at once.
The coolant output is switched off (the gripper opens). Closing gives ``[MSG:Check Door]`` and
``Door:0``; ``~`` resumes. Opening it during homing is ``ALARM:7``.

*Gripper.* ``M8`` closes the gripper at the head's physical position (``World.grip``), ``M9``
opens it (``World.release``). The gripper is spring-open when its output is off
(``gripper_opens_on_coolant_stop``): a reset, an alarm, a reconnect, ``M2`` or an open door drop
what it holds at the current position (onto a location if there is a free one within tolerance,
else onto the floor).

Faults
------
- ``no_reply`` / ``late_reply`` / ``garble`` / ``truncate``: applied to replies (``ok``/``error``
  with whatever the line printed before them, status reports, the banner after Ctrl-X);
  spontaneous push messages (``ALARM:N``, ``[MSG:Check Door]``, the banner on connect) are sent
  untouched.
- ``error`` (``code``, default 20): the next line is not executed and answers ``error:<code>``.
- ``alarm`` (``code``, default 1): raised at once, as above (1 = hard limit switch hit).
- ``disconnect``: the link drops; the machine keeps running while the cable is out; when it comes
  back the controller resets (see *Connect*).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from .base import DeviceConfig, SerialEndpointConfig, SimContext, SimInstrument
from .faults import Fault, FaultKind
from .serial_link import ByteDevice, SerialEndpoint

log = logging.getLogger(__name__)

Vec = tuple[float, float, float]


class GantryConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(
        default_factory=lambda: SerialEndpointConfig(baudrate=115200)
    )
    #: Travel (mm) from the home position, per axis: X 0..x, Y 0..y, Z -z..0 (Z homes up).
    travel_mm: tuple[float, float, float] = (450.0, 300.0, 100.0)
    #: $110-$112, mm/min.
    max_rate_mm_min: tuple[float, float, float] = (6000.0, 6000.0, 1500.0)
    #: $120-$122, mm/s^2.
    acceleration_mm_s2: tuple[float, float, float] = (500.0, 500.0, 200.0)
    #: $22: homing cycle enabled (start-up requires $H or $X, as on the real machine).
    homing_required: bool = True
    #: $20: soft limits.
    soft_limits: bool = True
    #: $25 homing search (seek) rate and $24 locate rate, mm/min.
    homing_seek_mm_min: float = Field(default=2000.0, gt=0)
    homing_feed_mm_min: float = Field(default=200.0, gt=0)
    #: $27 homing pull-off (mm) and $26 switch debounce (ms).
    homing_pulloff_mm: float = Field(default=1.0, ge=0)
    homing_debounce_ms: int = Field(default=250, ge=0, le=255)
    #: Where the head physically is at power-up, in homed machine coordinates (GRBL reads 0,0,0
    #: until it has homed, so ``$X`` without ``$H`` leaves this offset in every move).
    start_position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: The gripper opens whenever the flood-coolant output is off (reset, alarm, door, M2).
    gripper_opens_on_coolant_stop: bool = True


# -- GRBL constants --------------------------------------------------------------------------------
VERSION = "1.1h"
BUILD = "20190830"
BANNER = f"\r\nGrbl {VERSION} ['$' for help]\r\n"
HELP = "[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]\r\n"
PLANNER_BLOCKS = 15
RX_BUFFER = 128
LINE_BUFFER = 80
COOLANT_RESTORE_S = 1.0  # SAFETY_DOOR_COOLANT_DELAY

ERR_LETTER, ERR_NUMBER, ERR_STATEMENT, ERR_NEGATIVE, ERR_HOMING_DISABLED = 1, 2, 3, 4, 5
ERR_IDLE, ERR_LOCK, ERR_SOFT_NEEDS_HOMING, ERR_OVERFLOW, ERR_DOOR = 8, 9, 10, 11, 13
ERR_TRAVEL, ERR_JOG, ERR_UNSUPPORTED, ERR_MODAL, ERR_FEED = 15, 16, 20, 21, 22
ERR_NOT_INTEGER, ERR_REPEATED, ERR_NO_AXIS, ERR_LINE_NUMBER, ERR_NO_P = 23, 25, 26, 27, 28
ERR_AXIS_WORDS, ERR_UNUSED = 31, 36

ALARM_HARD, ALARM_SOFT, ALARM_ABORT, ALARM_HOME_RESET, ALARM_HOME_DOOR = 1, 2, 3, 6, 7
CRITICAL_ALARMS = frozenset({ALARM_HARD, ALARM_SOFT})
POSITION_LOST_ALARMS = frozenset({1, 3, 6, 7, 8, 9})

RT_STATUS, RT_HOLD, RT_START, RT_RESET = 0x3F, 0x21, 0x7E, 0x18
RT_DOOR, RT_JOG_CANCEL = 0x84, 0x85
REALTIME = frozenset({RT_STATUS, RT_HOLD, RT_START, RT_RESET, RT_DOOR, RT_JOG_CANCEL}) | frozenset(
    range(0x90, 0xA2)
)


class GcodeError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _fmt(v: float, decimals: int = 3) -> str:
    text = f"{v:.{decimals}f}"
    return "0" if decimals == 0 and text == "-0" else text.replace("-0.000", "0.000")


def _axes(v: Vec) -> str:
    return ",".join(_fmt(c) for c in v)


def _read_float(text: str, i: int) -> tuple[float, int] | None:
    """GRBL's read_float: optional sign, digits with at most one '.', at least one digit."""
    j = i
    if j < len(text) and text[j] in "+-":
        j += 1
    digits, dot = 0, False
    while j < len(text) and (text[j].isdigit() or (text[j] == "." and not dot)):
        if text[j] == ".":
            dot = True
        else:
            digits += 1
        j += 1
    if digits == 0:
        return None
    return float(text[i:j]), j


# -- motion profile --------------------------------------------------------------------------------
@dataclass
class _Segment:
    """Straight-line motion from ``start`` over ``length`` mm: accelerate from ``v0`` (mm/s) to
    at most ``vp`` at ``a_up``, cruise, decelerate to rest at ``a_down``; starts at virtual ``t0``.
    """

    start: Vec
    unit: Vec
    length: float
    v0: float
    vp: float
    a_up: float
    a_down: float
    t0: float

    @classmethod
    def trapezoid(cls, start: Vec, end: Vec, vmax: float, accel: float, t0: float) -> _Segment:
        d = tuple(e - s for s, e in zip(start, end, strict=True))
        length = math.sqrt(sum(c * c for c in d))
        unit: Vec = (
            (0.0, 0.0, 0.0) if length == 0 else (d[0] / length, d[1] / length, d[2] / length)
        )
        vp = min(vmax, math.sqrt(accel * length))  # triangle when the cruise is never reached
        return cls(start, unit, length, 0.0, vp, accel, accel, t0)

    @classmethod
    def stop(
        cls, start: Vec, unit: Vec, v0: float, accel: float, room: float, t0: float
    ) -> _Segment:
        """Decelerate from ``v0`` to rest, within ``room`` mm (harder if the block ends sooner)."""
        need = v0 * v0 / (2 * accel) if accel > 0 else 0.0
        length = min(need, room)
        a = accel if length >= need or length <= 0 else v0 * v0 / (2 * length)
        return cls(start, unit, length, v0, v0, a, a, t0)

    @property
    def _phases(self) -> tuple[float, float, float, float, float]:
        t1 = (self.vp - self.v0) / self.a_up if self.vp > self.v0 else 0.0
        d1 = (self.vp**2 - self.v0**2) / (2 * self.a_up) if self.vp > self.v0 else 0.0
        t3 = self.vp / self.a_down if self.vp > 0 else 0.0
        d3 = self.vp**2 / (2 * self.a_down) if self.vp > 0 else 0.0
        d2 = max(0.0, self.length - d1 - d3)
        t2 = d2 / self.vp if self.vp > 0 else 0.0
        return t1, d1, t2, d2, t3

    @property
    def duration(self) -> float:
        t1, _, t2, _, t3 = self._phases
        return t1 + t2 + t3

    @property
    def end_time(self) -> float:
        return self.t0 + self.duration

    def at(self, now: float) -> tuple[float, float]:
        """(distance travelled mm, speed mm/s) at virtual time ``now``."""
        t = max(0.0, now - self.t0)
        t1, d1, t2, d2, t3 = self._phases
        if t < t1:
            return self.v0 * t + self.a_up * t * t / 2, self.v0 + self.a_up * t
        if t < t1 + t2:
            return d1 + self.vp * (t - t1), self.vp
        tau = min(t - t1 - t2, t3)
        s = d1 + d2 + self.vp * tau - self.a_down * tau * tau / 2
        return min(s, self.length), max(0.0, self.vp - self.a_down * tau)

    def point(self, s: float) -> Vec:
        return (
            self.start[0] + self.unit[0] * s,
            self.start[1] + self.unit[1] * s,
            self.start[2] + self.unit[2] * s,
        )


@dataclass
class _Block:
    target: Vec
    rate: float | None  # mm/min programmed; None = rapid
    jog: bool = False
    inverse_time: float | None = None  # G93: minutes the block takes


@dataclass
class _Modal:
    motion: int = 0  # 0, 1, 80
    coord: int = 54
    plane: int = 17
    units: int = 21
    distance: int = 90
    feed_mode: int = 94
    program: int | None = None  # 0, 2, 30
    spindle: int = 5
    coolant: bool = False
    tool: int = 0
    feed: float = 0.0
    speed: float = 0.0


@dataclass
class _Words:
    g: list[tuple[int, int]]
    m: list[int]
    values: dict[str, float]


# -- the simulator ---------------------------------------------------------------------------------
class _Port(ByteDevice):
    """The controller's serial port: hands bytes and cable events to the simulator."""

    def __init__(self, sim: GantrySim) -> None:
        self.sim = sim

    async def on_bytes(self, data: bytes) -> None:
        await self.sim.on_bytes(data)

    def on_connect(self) -> None:
        self.sim.on_connect()


class GantrySim(SimInstrument):
    """GRBL 1.1h gantry with a gripper; see the module docstring for the wire protocol.

    Control actions: ``open_door``, ``close_door`` (the safety-door switch), ``state``.
    """

    kind: ClassVar[str] = "gantry"
    config: GantryConfig

    def __init__(self, name: str, config: GantryConfig, ctx: SimContext) -> None:
        SimInstrument.__init__(self, name, config, ctx)
        self.config = config
        self._endpoint = SerialEndpoint(name, config.serial, ctx.run_dir, self.faults, _Port(self))
        self.faults.on_event(self._on_fault)
        c = config
        self.settings: dict[int, float] = {
            0: 10, 1: 25, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 10: 1, 11: 0.010, 12: 0.002, 13: 0,
            20: int(c.soft_limits), 21: 0, 22: int(c.homing_required), 23: 3,
            24: c.homing_feed_mm_min, 25: c.homing_seek_mm_min, 26: c.homing_debounce_ms,
            27: c.homing_pulloff_mm, 30: 1000, 31: 0, 32: 0,
            100: 80.0, 101: 80.0, 102: 400.0,
            110: c.max_rate_mm_min[0], 111: c.max_rate_mm_min[1], 112: c.max_rate_mm_min[2],
            120: c.acceleration_mm_s2[0], 121: c.acceleration_mm_s2[1],
            122: c.acceleration_mm_s2[2],
            130: c.travel_mm[0], 131: c.travel_mm[1], 132: c.travel_mm[2],
        }  # fmt: skip
        # Machine state.
        self.grbl_state = "Alarm" if c.homing_required else "Idle"
        self._mpos: Vec = (0.0, 0.0, 0.0)  # GRBL's machine position (reported)
        self._offset: Vec = c.start_position  # physical position - mpos
        self._seg: _Segment | None = None
        self._seg_jog = False
        self._planner: deque[_Block] = deque()
        self._gc = _Modal()
        self._gc_pos: Vec = (0.0, 0.0, 0.0)  # parser position (end of the last planned block)
        self.homed = False
        self.alarm_code: int | None = None
        self._critical = False
        self._hold_complete = False
        self._door_open = False
        self._door_retracted = False
        self._door_restoring = False
        self._jog_cancel = False
        self._coolant_on = False
        self._f_ovr, self._r_ovr = 100, 100
        self._wco_counter = 0
        self._ovr_counter = 0
        self._report_pending = False
        self.lines_processed = 0
        # Serial receive side.
        self._rx: deque[tuple[bytes, int]] = deque()  # (pre-parsed line, raw bytes it took)
        self._rx_bytes = 0
        self._partial = bytearray()
        self._partial_flags = 0  # 1 overflow, 2 paren comment, 4 semicolon comment
        self._partial_raw = 0  # raw bytes of the line being received (what the RX buffer holds)
        self._current_line: str | None = None
        self._changed = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        self._worker = asyncio.create_task(self._line_worker(), name=f"{self.name}-grbl")
        await self._endpoint.start()
        await self.apply_initial_faults()

    async def stop(self) -> None:
        self._started = False
        for task in [self._worker, self._runner, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._worker, self._runner, *self._tasks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._endpoint.stop()

    def endpoint(self) -> dict[str, Any]:
        return self._endpoint.endpoint()

    async def clear_fault(self, kind: FaultKind | None = None) -> None:
        self.faults.clear(kind)
        if kind in (None, FaultKind.DISCONNECT) and not self._endpoint.connected:
            await self._endpoint.reconnect()

    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "open_door":
            self._set_door(True)
        elif action == "close_door":
            self._set_door(False)
        elif action != "state":
            raise ValueError(
                f"{self.name}: unknown action {action!r} (open_door, close_door, state)"
            )
        return self.state()

    def state(self) -> dict[str, Any]:
        pos = self._physical()
        held = self.ctx.world.held
        return {
            "grbl_state": self._state_text(),
            "position": list(pos),
            "mpos": list(self._position()),
            "target": list(self._planner[-1].target) if self._planner else None,
            "moving": self._seg is not None and self.ctx.clock.now() < self._seg.end_time,
            "planner_blocks": len(self._planner),
            "gripper_closed": self._coolant_on,
            "held": held.id if held else None,
            "alarm": self.alarm_code,
            "homed": self.homed,
            "door_open": self._door_open,
            "lines_processed": self.lines_processed,
            "faults": self.faults.state(),
            "connected": self._endpoint.connected,
        }

    # -- helpers -----------------------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            await self._changed.wait()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{self.name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _reply(self, text: str) -> None:
        self._endpoint.write(text.encode("latin-1"))

    def _push(self, text: str) -> None:
        self._endpoint.write(text.encode("latin-1"), reply=False)

    def _position(self) -> Vec:
        if self._seg is None:
            return self._mpos
        s, _ = self._seg.at(self.ctx.clock.now())
        return self._seg.point(s)

    def _speed(self) -> float:
        return 0.0 if self._seg is None else self._seg.at(self.ctx.clock.now())[1]

    def _physical(self) -> Vec:
        p = self._position()
        return (p[0] + self._offset[0], p[1] + self._offset[1], p[2] + self._offset[2])

    @property
    def _suspended(self) -> bool:
        return self.grbl_state in ("Hold", "Door") or (
            self.grbl_state == "Jog" and self._jog_cancel
        )

    def _state_text(self) -> str:
        st = self.grbl_state
        if st == "Hold":
            return "Hold:0" if self._hold_complete else "Hold:1"
        if st == "Door":
            if self._door_restoring:
                return "Door:3"
            if self._door_retracted:
                return "Door:1" if self._door_open else "Door:0"
            return "Door:2"
        return st

    def _travel_exceeded(self, target: Vec) -> bool:
        tx, ty, tz = (self.settings[130], self.settings[131], self.settings[132])
        x, y, z = target
        return x < 0 or x > tx or y < 0 or y > ty or z > 0 or z < -tz

    def _set_coolant(self, on: bool) -> None:
        """Drive the flood-coolant output: the gripper closes on it, and (spring) opens off it."""
        if on and not self._coolant_on:
            self._coolant_on = True
            self.ctx.world.grip(*self._physical())
        elif not on and self._coolant_on:
            self._coolant_on = False
            if self.config.gripper_opens_on_coolant_stop:
                self.ctx.world.release(*self._physical())

    # -- serial input ------------------------------------------------------------------------------
    def on_connect(self) -> None:
        """Cable plugged in: DTR auto-reset of the controller (a hard reset, position cleared)."""
        self._hard_reset()

    async def on_bytes(self, data: bytes) -> None:
        for b in data:
            if b in REALTIME:
                self._realtime(b)
            elif b in (0x0A, 0x0D):
                self._end_line()
            else:
                self._rx_char(b)

    def _rx_char(self, b: int) -> None:
        if self._rx_bytes + self._partial_raw + 1 >= RX_BUFFER:
            return  # receive buffer full: the byte is lost, as on the real controller
        self._partial_raw += 1
        flags = self._partial_flags
        if flags:
            if b == ord(")") and flags & 2:
                self._partial_flags &= ~2
            return
        if b <= 0x20 or b == ord("/"):
            return
        if b == ord("("):
            self._partial_flags |= 2
        elif b == ord(";"):
            self._partial_flags |= 4
        elif len(self._partial) >= LINE_BUFFER - 1:
            self._partial_flags |= 1
        else:
            self._partial.append(b - 32 if ord("a") <= b <= ord("z") else b)

    def _end_line(self) -> None:
        line = bytes(self._partial) if not self._partial_flags & 1 else b"\x00overflow"
        self._partial.clear()
        self._partial_flags = 0
        self._rx.append((line, self._partial_raw + 1))
        self._rx_bytes += self._partial_raw + 1
        self._partial_raw = 0
        self._notify()

    # -- real-time commands ------------------------------------------------------------------------
    def _realtime(self, b: int) -> None:
        if b == RT_RESET:
            self._soft_reset()
        elif self._critical:
            return  # a hard/soft-limit alarm: only a reset is served
        elif b == RT_STATUS:
            if self.grbl_state == "Home":
                self._report_pending = True
            else:
                self._reply(self._status_report())
        elif self.grbl_state == "Sleep":
            return
        elif b == RT_HOLD:
            self._feed_hold()
        elif b == RT_START:
            self._cycle_start()
        elif b == RT_DOOR:
            self._door_event()
        elif b == RT_JOG_CANCEL:
            if self.grbl_state == "Jog" and not self._jog_cancel:
                self._jog_cancel = True
                self._begin_stop()
        elif 0x90 <= b <= 0x94:
            f = {0x90: 100, 0x91: self._f_ovr + 10, 0x92: self._f_ovr - 10}.get(b)
            f = f if f is not None else self._f_ovr + (1 if b == 0x93 else -1)
            self._f_ovr = max(10, min(200, f))
        elif 0x95 <= b <= 0x97:
            self._r_ovr = {0x95: 100, 0x96: 50, 0x97: 25}[b]
        elif b == 0xA0 and self.grbl_state in ("Idle", "Run", "Hold"):
            self._gc.coolant = not self._gc.coolant
            self._set_coolant(self._gc.coolant)
        self._notify()

    def _status_report(self) -> str:
        parts = [self._state_text(), "MPos:" + _axes(self._position())]
        parts.append(f"FS:{_fmt(self._speed() * 60.0, 0)},{_fmt(self._gc.speed, 0)}")
        if self._door_open:
            parts.append("Pn:D")
        busy = self.grbl_state in ("Home", "Run", "Hold", "Jog", "Door")
        if self._wco_counter > 0:
            self._wco_counter -= 1
        else:
            self._wco_counter = (30 if busy else 10) - 1
            if self._ovr_counter == 0:
                self._ovr_counter = 1
            parts.append("WCO:0.000,0.000,0.000")
        if self._ovr_counter > 0:
            self._ovr_counter -= 1
        else:
            self._ovr_counter = (20 if busy else 10) - 1
            parts.append(f"Ov:{self._f_ovr},{self._r_ovr},100")
            if self._coolant_on or self._gc.spindle != 5:
                acc = {3: "S", 4: "C"}.get(self._gc.spindle, "")
                parts.append("A:" + acc + ("F" if self._coolant_on else ""))
        return "<" + "|".join(parts) + ">\r\n"

    def _feed_hold(self) -> None:
        st = self.grbl_state
        if st in ("Run", "Jog"):
            if st == "Jog":
                self._jog_cancel = True
            else:
                self.grbl_state = "Hold"
                self._hold_complete = False
            self._begin_stop()
        elif st == "Idle":
            self.grbl_state = "Hold"
            self._hold_complete = True

    def _cycle_start(self) -> None:
        st = self.grbl_state
        if st == "Door" and not self._door_open and self._door_retracted:
            if not self._door_restoring:
                self._door_restoring = True
                self._spawn(self._door_restore(), "door-restore")
            return
        if st == "Idle" or (st == "Hold" and self._hold_complete):
            self._gc.program = None if self._gc.program == 0 else self._gc.program
            self._resume()

    def _resume(self) -> None:
        self._hold_complete = False
        if self._planner:
            self.grbl_state = "Jog" if self._planner[0].jog else "Run"
            self._start_runner()
        else:
            self.grbl_state = "Idle"
        self._notify()

    async def _door_restore(self) -> None:
        if self._gc.coolant:
            self._set_coolant(True)
            await self.ctx.clock.sleep(COOLANT_RESTORE_S)
        if not self._door_restoring or self.grbl_state != "Door":
            return  # the door opened again while restoring
        self._door_restoring = False
        self._door_retracted = False
        self._resume()

    def _set_door(self, open_: bool) -> None:
        if open_ == self._door_open:
            return
        self._door_open = open_
        if open_:
            self._door_event()
        elif self.grbl_state == "Door":
            self._push("[MSG:Check Door]\r\n")
        self._notify()

    def _door_event(self) -> None:
        st = self.grbl_state
        if st in ("Alarm", "Check", "Sleep"):
            return
        self._push("[MSG:Check Door]\r\n")
        if st == "Home":
            self._raise_alarm(ALARM_HOME_DOOR)
            return
        if st == "Jog":
            self._jog_cancel = True
            self._begin_stop()
            return
        moving = st == "Run" or (st == "Hold" and not self._hold_complete)
        self.grbl_state = "Door"
        self._door_restoring = False
        if st == "Run":
            self._begin_stop()
        elif not moving:  # idle, a completed hold, or a door that re-opened while restoring
            self._door_retracted = True
            self._set_coolant(False)
        self._notify()

    # -- motion ------------------------------------------------------------------------------------
    def _block_segment(self, blk: _Block, start: Vec) -> _Segment:
        d = [e - s for s, e in zip(start, blk.target, strict=True)]
        length = math.sqrt(sum(c * c for c in d))
        rate_limit, accel = math.inf, math.inf
        for i in range(3):
            if d[i] != 0:
                u = abs(d[i]) / length
                rate_limit = min(rate_limit, self.settings[110 + i] / u)
                accel = min(accel, self.settings[120 + i] / u)
        if blk.jog:
            rate = min(blk.rate or rate_limit, rate_limit)
        elif blk.inverse_time is not None:
            rate = min(length / blk.inverse_time * self._f_ovr / 100.0, rate_limit)
        elif blk.rate is None:
            rate = rate_limit * self._r_ovr / 100.0
        else:
            rate = min(blk.rate * self._f_ovr / 100.0, rate_limit)
        if length == 0:
            accel = 1.0
        return _Segment.trapezoid(start, blk.target, rate / 60.0, accel, self.ctx.clock.now())

    def _start_runner(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_planner(), name=f"{self.name}-motion")

    async def _sleep_until(self, t_end: float) -> None:
        while (left := t_end - self.ctx.clock.now()) > 0:
            await self.ctx.clock.sleep(left)

    async def _run_planner(self) -> None:
        while self._planner and self.grbl_state in ("Run", "Jog") and not self._jog_cancel:
            blk = self._planner[0]
            seg = self._block_segment(blk, self._mpos)
            self._seg = seg
            self._notify()
            await self._sleep_until(seg.end_time)
            self._mpos = blk.target
            self._seg = None
            self._planner.popleft()
            self._notify()
        if not self._planner and self.grbl_state in ("Run", "Jog"):
            self.grbl_state = "Idle"  # cycle stop
            self._notify()

    def _begin_stop(self) -> None:
        """Decelerate the current block to rest (feed hold, door, jog cancel, soft limit)."""
        if self._runner is not None:
            self._runner.cancel()
            self._runner = None
        seg = self._seg
        if seg is None:
            self._spawn(self._after_stop(None), "stop")
            return
        now = self.ctx.clock.now()
        s, v = seg.at(now)
        self._mpos = seg.point(s)
        accel = seg.a_down if seg.a_down > 0 else 1.0
        stop = _Segment.stop(self._mpos, seg.unit, v, accel, seg.length - s, now)
        self._seg = stop
        self._spawn(self._after_stop(stop), "stop")

    async def _after_stop(self, stop: _Segment | None) -> None:
        if stop is not None:
            await self._sleep_until(stop.end_time)
            self._mpos = stop.point(stop.length)
            if self._seg is stop:
                self._seg = None
        if self._planner and self._planner[0].target == self._mpos:
            self._planner.popleft()
        if self._jog_cancel:
            self._jog_cancel = False
            self._planner.clear()
            self._gc_pos = self._mpos
            if self.grbl_state == "Jog":
                self.grbl_state = "Idle"
            if self._door_open and self.grbl_state == "Idle":
                self.grbl_state = "Door"
                self._door_retracted = True
                self._set_coolant(False)
        elif self.grbl_state == "Hold":
            self._hold_complete = True
        elif self.grbl_state == "Door":
            self._door_retracted = True
            self._set_coolant(False)
        self._notify()

    def _kill_motion(self) -> bool:
        """Stop the steppers at once (reset, alarm); True if the machine was moving."""
        moving = self._seg is not None and self._speed() > 0
        moving = moving or self.grbl_state in ("Run", "Jog", "Home")
        self._mpos = self._position()
        self._seg = None
        for task in [self._runner, *self._tasks]:
            if task is not None:
                task.cancel()
        self._runner = None
        self._planner.clear()
        return moving

    # -- resets and alarms -------------------------------------------------------------------------
    def _reinit(self) -> None:
        """What GRBL re-initialises after any reset: parser, planner, buffers, report counters."""
        self._set_coolant(False)
        self._gc = _Modal()
        self._gc_pos = self._mpos
        self._rx.clear()
        self._rx_bytes = 0
        self._partial.clear()
        self._partial_flags = 0
        self._partial_raw = 0
        self._hold_complete = self._jog_cancel = False
        self._door_retracted = self._door_restoring = False
        self._critical = False
        self._report_pending = False
        self._f_ovr = self._r_ovr = 100
        self._wco_counter = self._ovr_counter = 0
        if self._worker is not None:
            self._worker.cancel()
        if self._started:
            self._worker = asyncio.create_task(self._line_worker(), name=f"{self.name}-grbl")

    def _after_banner(self) -> str:
        if self.grbl_state in ("Alarm", "Sleep"):
            self.grbl_state = "Alarm"
            return "[MSG:'$H'|'$X' to unlock]\r\n"
        self.grbl_state = "Idle"
        if self._door_open:
            self.grbl_state = "Door"
            self._door_retracted = True
            return "[MSG:Check Door]\r\n"
        return ""

    def _soft_reset(self, alarm: int | None = None) -> None:
        homing = self.grbl_state == "Home"
        moving = self._kill_motion()
        if alarm is None and (moving or homing):
            alarm = ALARM_HOME_RESET if homing else ALARM_ABORT
        out = ""
        if alarm is not None:
            out += f"ALARM:{alarm}\r\n"
            self._enter_alarm(alarm)
        if self._current_line is not None:
            out += "ok\r\n"  # the interrupted line completes (GRBL prints its status on abort)
            self._current_line = None
        self._reinit()
        out += BANNER + self._after_banner()
        self._reply(out)
        self._notify()

    def _hard_reset(self) -> None:
        """Power-up / DTR reset: position cleared, homing needed, no ALARM message."""
        phys = self._physical()
        self._kill_motion()
        self._current_line = None
        self._mpos = (0.0, 0.0, 0.0)
        self._offset = phys
        self.homed = False
        self.grbl_state = "Alarm" if self.settings[22] else "Idle"
        self.alarm_code = None
        self._reinit()
        self._push(BANNER + self._after_banner())
        self._notify()

    def _enter_alarm(self, code: int) -> None:
        self.grbl_state = "Alarm"
        self.alarm_code = code
        if code in POSITION_LOST_ALARMS:
            self.homed = False

    def _raise_alarm(self, code: int) -> None:
        """A spontaneous alarm: critical ones lock until Ctrl-X, others reset the controller."""
        if code in CRITICAL_ALARMS:
            self._kill_motion()
            self._set_coolant(False)
            self._enter_alarm(code)
            self._critical = True
            self._push(f"ALARM:{code}\r\n[MSG:Reset to continue]\r\n")
            self._notify()
        else:
            self._push(f"ALARM:{code}\r\n")
            self._kill_motion()
            self._enter_alarm(code)
            self._soft_reset_after_alarm()

    def _soft_reset_after_alarm(self) -> None:
        if self._current_line is not None:
            self._reply("ok\r\n")
            self._current_line = None
        self._reinit()
        self._reply(BANNER + self._after_banner())
        self._notify()

    async def _on_fault(self, fault: Fault) -> None:
        if fault.kind is FaultKind.ALARM:
            self._raise_alarm(fault.code if fault.code is not None else ALARM_HARD)

    # -- line processing ---------------------------------------------------------------------------
    async def _line_worker(self) -> None:
        while True:
            await self._until(
                lambda: (
                    bool(self._rx)
                    and not self._critical
                    and not self._suspended
                    and self.grbl_state != "Sleep"
                )
            )
            raw, size = self._rx.popleft()
            self._rx_bytes -= size
            line = raw.decode("latin-1")
            self._current_line = line
            try:
                fault = self.faults.take(FaultKind.ERROR)
                if fault is not None:
                    out, status = "", fault.code if fault.code is not None else ERR_UNSUPPORTED
                else:
                    out, status = await self._execute(line)
            except GcodeError as e:
                out, status = "", e.code
            except Exception:  # a simulator bug: log it loudly, keep serving
                log.exception("%s: failed on line %r", self.name, line)
                self._current_line = None
                continue
            if self._current_line is None:
                continue  # a reset completed this line already
            self._current_line = None
            self.lines_processed += 1
            self._reply(out + ("ok\r\n" if status == 0 else f"error:{status}\r\n"))

    async def _execute(self, line: str) -> tuple[str, int]:
        if line == "\x00overflow":
            return "", ERR_OVERFLOW
        if not line:
            return "", 0
        if line.startswith("$"):
            return await self._system(line)
        if self.grbl_state in ("Alarm", "Jog"):
            return "", ERR_LOCK
        return await self._gcode(line, jog=False)

    # -- $ commands --------------------------------------------------------------------------------
    async def _system(self, line: str) -> tuple[str, int]:
        st = self.grbl_state
        cmd = line[1:2]
        if cmd == "":
            return HELP, 0
        if cmd == "J":
            if st not in ("Idle", "Jog"):
                return "", ERR_IDLE
            if line[2:3] != "=":
                return "", ERR_STATEMENT
            return await self._gcode(line[3:], jog=True)
        if cmd in "$GCX" and len(line) != 2:
            return "", ERR_STATEMENT
        if cmd == "$":
            if st in ("Run", "Hold"):
                return "", ERR_IDLE
            return self._settings_dump(), 0
        if cmd == "G":
            return self._parser_state(), 0
        if cmd == "C":
            if st == "Check":
                self._reply("[MSG:Disabled]\r\nok\r\n")
                self._current_line = None
                self.lines_processed += 1
                self._soft_reset()
                return "", 0
            if st != "Idle":
                return "", ERR_IDLE
            self.grbl_state = "Check"
            return "[MSG:Enabled]\r\n", 0
        if cmd == "X":
            if st == "Alarm":
                if self._door_open:
                    return "", ERR_DOOR
                self.grbl_state = "Idle"
                self.alarm_code = None
                return "[MSG:Caution: Unlocked]\r\n", 0
            return "", 0
        if st not in ("Idle", "Alarm"):
            return "", ERR_IDLE
        if cmd == "#":
            if len(line) != 2:
                return "", ERR_STATEMENT
            out = "".join(f"[G{n}:0.000,0.000,0.000]\r\n" for n in (54, 55, 56, 57, 58, 59, 28, 30))
            return (
                out + "[G92:0.000,0.000,0.000]\r\n[TLO:0.000]\r\n[PRB:0.000,0.000,0.000:0]\r\n",
                0,
            )
        if cmd == "H":
            if not self.settings[22]:
                return "", ERR_HOMING_DISABLED
            if self._door_open:
                return "", ERR_DOOR
            if len(line) != 2:
                return "", ERR_STATEMENT
            return await self._home(), 0
        if cmd == "S":
            if line != "$SLP":
                return "", ERR_STATEMENT
            self._kill_motion()
            self._set_coolant(False)
            self.grbl_state = "Sleep"
            self.homed = False  # steppers de-energised: position no longer guaranteed
            return "[MSG:Sleeping]\r\n", 0
        if cmd == "I":
            if len(line) != 2:
                return "", ERR_STATEMENT  # the build-info string is OEM-locked on this machine
            return f"[VER:{VERSION}.{BUILD}:]\r\n[OPT:VZ+,{PLANNER_BLOCKS},{RX_BUFFER}]\r\n", 0
        if cmd == "N":
            if len(line) != 2:
                return "", ERR_STATEMENT
            return "$N0=\r\n$N1=\r\n", 0
        if cmd == "R":
            return "", ERR_STATEMENT
        return self._store_setting(line)

    def _store_setting(self, line: str) -> tuple[str, int]:
        parsed = _read_float(line, 1)
        if parsed is None:
            return "", ERR_NUMBER
        number, i = parsed
        if line[i : i + 1] != "=":
            return "", ERR_STATEMENT
        value = _read_float(line, i + 1)
        if value is None:
            return "", ERR_NUMBER
        if value[1] != len(line) or number > 255:
            return "", ERR_STATEMENT
        key, v = int(number), value[0]
        if number != key or key not in self.settings:
            return "", ERR_STATEMENT
        if v < 0:
            return "", ERR_NEGATIVE
        if key == 0 and v < 3:
            return "", 6
        if key == 20 and v and not self.settings[22]:
            return "", ERR_SOFT_NEEDS_HOMING
        if key == 22 and not v and self.settings[20]:
            self.settings[20] = 0
        self.settings[key] = v
        return "", 0

    def _settings_dump(self) -> str:
        out = []
        for key, value in self.settings.items():
            is_float = key in (11, 12, 24, 25, 27) or key >= 100
            out.append(f"${key}={_fmt(value) if is_float else int(value)}\r\n")
        return "".join(out)

    def _parser_state(self) -> str:
        g = self._gc
        words = [f"G{g.motion}", f"G{g.coord}", f"G{g.plane}", f"G{g.units}", f"G{g.distance}"]
        words.append(f"G{g.feed_mode}")
        if g.program is not None:
            words.append(f"M{g.program}")
        words += [f"M{g.spindle}", "M8" if g.coolant else "M9", f"T{g.tool}"]
        words += [f"F{_fmt(g.feed, 0)}", f"S{_fmt(g.speed, 0)}"]
        return "[GC:" + " ".join(words) + "]\r\n"

    async def _home(self) -> str:
        """Z up first, then X and Y together: search at $25, pull off, locate at $24, pull off."""
        self.grbl_state = "Home"
        self._notify()
        seek, feed = self.settings[25] / 60.0, self.settings[24] / 60.0
        pulloff, debounce = self.settings[27], self.settings[26] / 1000.0
        phys = list(self._physical())
        home = [0.0, 0.0, 0.0]
        for axes in ((2,), (0, 1)):
            search = max(abs(phys[i] - home[i]) + pulloff for i in axes)
            for duration in (search / seek, pulloff / feed, pulloff / feed, pulloff / feed):
                await self.ctx.clock.sleep(duration + debounce)
            for i in axes:
                phys[i] = home[i]
            self._mpos = tuple(p - o for p, o in zip(phys, self._offset, strict=True))  # type: ignore[assignment]
        self._mpos = (0.0, 0.0, 0.0)
        self._offset = (0.0, 0.0, 0.0)
        self._gc_pos = self._mpos
        self.homed = True
        self.alarm_code = None
        out = ""
        if self._report_pending:
            self._report_pending = False
            out = self._status_report()
        self.grbl_state = "Idle"
        return out

    # -- g-code ------------------------------------------------------------------------------------
    @staticmethod
    def _words(line: str) -> _Words:
        g: list[tuple[int, int]] = []
        m: list[int] = []
        values: dict[str, float] = {}
        i = 0
        while i < len(line):
            letter = line[i]
            if not "A" <= letter <= "Z":
                raise GcodeError(ERR_LETTER)
            parsed = _read_float(line, i + 1)
            if parsed is None:
                raise GcodeError(ERR_NUMBER)
            value, i = parsed
            if letter in "GM":
                ival = int(value)
                mantissa = round(100 * (value - ival))
                if letter == "G":
                    g.append((ival, mantissa))
                else:
                    if mantissa:
                        raise GcodeError(ERR_NOT_INTEGER)
                    m.append(ival)
                continue
            if letter not in "FIJKLNPRSTXYZ":
                raise GcodeError(ERR_UNSUPPORTED)
            if letter in values:
                raise GcodeError(ERR_REPEATED)
            if letter in "FNPTS" and value < 0:
                raise GcodeError(ERR_NEGATIVE)
            values[letter] = value
        return _Words(g, m, values)

    async def _gcode(self, line: str, *, jog: bool) -> tuple[str, int]:
        w = self._words(line)
        gc = self._gc
        groups: dict[str, int] = {}
        motion = gc.motion if not jog else 1
        units, distance, feed_mode = gc.units, gc.distance, (gc.feed_mode if not jog else 94)
        dwell = absolute_override = False

        def group(name: str) -> None:
            if name in groups:
                raise GcodeError(ERR_MODAL)
            groups[name] = 1

        for code, mantissa in w.g:
            if code == 91 and mantissa == 10:
                group("arc_distance")
                continue
            if mantissa:
                raise GcodeError(ERR_UNSUPPORTED if code in (38, 43, 59, 61) else ERR_NOT_INTEGER)
            if code in (0, 1, 80):
                group("motion")
                motion = code
            elif code == 4:
                group("non_modal")
                dwell = True
            elif code == 53:
                group("non_modal")
                absolute_override = True
            elif code in (17, 18, 19):
                group("plane")
            elif code in (20, 21):
                group("units")
                units = code
            elif code in (90, 91):
                group("distance")
                distance = code
            elif code in (93, 94):
                group("feed_mode")
                feed_mode = code
            elif code in (54, 55, 56, 57, 58, 59):
                group("coord")
            elif code in (40, 49, 61):
                group(f"g{code}")
            else:
                raise GcodeError(ERR_UNSUPPORTED)
        coolant, spindle, program = gc.coolant, gc.spindle, None
        for code in w.m:
            if code in (0, 1, 2, 30):
                group("program")
                program = code if code != 1 else None
            elif code in (3, 4, 5):
                group("spindle")
                spindle = code
            elif code in (8, 9):
                group("coolant")
                coolant = code == 8
            else:
                raise GcodeError(ERR_UNSUPPORTED)
        v = dict(w.values)
        if jog and (w.m or set(groups) - {"units", "distance", "non_modal"} or dwell):
            raise GcodeError(ERR_JOG)
        axis_words = {k: v.pop(k) for k in "XYZ" if k in v}
        if "N" in v and v.pop("N") > 9_999_999:
            raise GcodeError(ERR_LINE_NUMBER)
        scale = 25.4 if units == 20 else 1.0
        feed = gc.feed
        if jog:
            if "F" not in v:
                raise GcodeError(ERR_FEED)
            feed = v.pop("F") * scale
        elif feed_mode == 93:
            feed = v.pop("F", 0.0)
        elif "F" in v:
            feed = v.pop("F") * scale
        elif gc.feed_mode == 93:
            feed = 0.0
        speed = v.pop("S", gc.speed)
        tool = int(v.pop("T", gc.tool))
        p_value = v.pop("P", None) if dwell else None
        if dwell and p_value is None:
            raise GcodeError(ERR_NO_P)
        if absolute_override and motion not in (0, 1):
            raise GcodeError(30)
        moving = bool(axis_words) and motion != 80
        if motion == 80 and axis_words:
            raise GcodeError(ERR_AXIS_WORDS)
        if absolute_override and not axis_words:
            raise GcodeError(ERR_NO_AXIS)
        if moving and motion == 1 and feed == 0.0:
            raise GcodeError(ERR_FEED)
        if jog and not axis_words:
            raise GcodeError(ERR_NO_AXIS)
        if v:
            raise GcodeError(ERR_UNUSED)
        target = list(self._gc_pos)
        for i, k in enumerate("XYZ"):
            if k in axis_words:
                value = axis_words[k] * scale
                incremental = distance == 91 and not absolute_override
                target[i] = target[i] + value if incremental else value
        tgt: Vec = (target[0], target[1], target[2])

        if jog:
            if self.settings[20] and self._travel_exceeded(tgt):
                return "", ERR_TRAVEL
            await self._plan(_Block(tgt, feed, jog=True))
            self._gc_pos = tgt
            return "", 0

        # Execute in GRBL's order: feed, spindle, tool, spindle control, coolant, dwell, modes,
        # motion, program flow.
        gc.feed_mode, gc.feed, gc.tool = feed_mode, feed, tool
        gc.speed = speed
        gc.spindle = spindle
        if coolant != gc.coolant:
            await self._synchronize()
            gc.coolant = coolant
            if self.grbl_state != "Check":
                self._set_coolant(coolant)
        if dwell and p_value is not None:
            await self._synchronize()
            if self.grbl_state != "Check":
                await self.ctx.clock.sleep(p_value)
        gc.units, gc.distance = units, distance
        if "motion" in groups:
            gc.motion = motion
        if moving:
            if self.settings[20] and self._travel_exceeded(tgt):
                await self._soft_limit()
                return "", 0
            if self.grbl_state != "Check" and tgt != self._gc_pos:
                inverse = 1.0 / feed if feed_mode == 93 and motion == 1 else None
                rate = None if motion == 0 else feed
                await self._plan(_Block(tgt, rate, inverse_time=inverse))
            self._gc_pos = tgt
        if program is not None:
            await self._synchronize()
            if program == 0:
                gc.program = 0
                if self.grbl_state == "Idle":
                    self.grbl_state = "Hold"
                    self._hold_complete = True
            else:
                self._gc = _Modal(motion=1, units=gc.units, feed=gc.feed, tool=gc.tool)
                if self.grbl_state != "Check":
                    self._set_coolant(False)
                return "[MSG:Pgm End]\r\n", 0
        return "", 0

    async def _synchronize(self) -> None:
        """protocol_buffer_synchronize(): wait until the planner has run empty."""
        await self._until(lambda: not self._planner and self.grbl_state not in ("Run", "Jog"))

    async def _plan(self, blk: _Block) -> None:
        await self._until(lambda: len(self._planner) < PLANNER_BLOCKS)
        self._planner.append(blk)
        if self.grbl_state == "Idle":
            self.grbl_state = "Jog" if blk.jog else "Run"
            self._start_runner()
        self._notify()

    async def _soft_limit(self) -> None:
        """limits_soft_check(): controlled stop if running, then ALARM:2 and wait for a reset."""
        if self.grbl_state == "Run":
            self.grbl_state = "Hold"
            self._hold_complete = False
            self._begin_stop()
            await self._until(lambda: self._hold_complete)
            self._planner.clear()
            self.grbl_state = "Idle"
        self._raise_alarm(ALARM_SOFT)
        await self._until(lambda: not self._critical)
