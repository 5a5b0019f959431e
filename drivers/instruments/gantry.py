"""GRBL 1.1 XYZ gantry with a gripper on the flood-coolant output (M8 closes, M9 opens).

Protocol (gnea/grbl ``doc/markdown/interface.md``): lines end in ``\\n`` only (GRBL ends a line at
CR *and* at LF, so CR LF would earn a second ``ok``); every line gets exactly one ``ok`` or
``error:N``; a motion line is answered ``ok`` when it enters the planner, *not* when the motion
ends; ``?``, ``!``, ``~`` and Ctrl-X are real-time bytes without a line end, answered (``?`` only)
by ``<State|MPos:x,y,z|FS:f,s|...>`` with optional ``WCO:``, ``Ov:``, ``A:``, ``Pn:`` fields;
``ALARM:N`` and ``[MSG:...]`` lines arrive whenever the controller has something to say.

How the driver uses it:

* **Send-and-wait streaming** (interface.md's simple, safe scheme): one line, then its ``ok``.
  The driver holds the serial link for the whole command (and, for a move, until the motion has
  ended), reading every line that comes: status reports, ``ALARM:N``, the start-up banner, feedback
  messages. Nothing is flushed blindly: lines waiting in the input buffer before a command are
  read and interpreted first (a banner there means the controller was reset or the cable replugged;
  an ``ALARM:N`` means the machine stopped), so no alarm is ever thrown away with stale input.
* **A move completes when the machine reports Idle at the target**, polled with ``?`` every
  ``poll_interval_s`` via :meth:`SerialTransport.write_realtime`. An ``ALARM:N`` read while
  waiting fails the move at once with :class:`InstrumentError` (code N, GRBL's alarm text). Time
  spent in Hold or Door (a feed hold, an open safety door) does not count against the timeout.
* **A move is never re-sent.** If its ``ok`` is lost, the driver asks ``?``: Run/Hold or Idle at
  the target means the line was accepted (the move is then followed to completion); Idle elsewhere
  means it was not, and the call fails with :class:`DeviceTimeout` without sending it again; no
  status either fails with :class:`DeviceTimeout` naming the move. A gripper command whose ``ok``
  is lost is checked the same way with ``$G`` (the parser's coolant state, ``M8``/``M9``).
* **Critical alarms** (1 hard limit, 2 soft limit) lock GRBL until Ctrl-X: nothing else is served,
  not even ``?``. The driver remembers them and refuses further commands at once with the alarm,
  until :meth:`Gantry.soft_reset`; after that (or after any reset that lost the position) GRBL needs
  ``$H`` (:meth:`Gantry.home`) or ``$X`` (:meth:`Gantry.unlock`).
* Targets are checked against the configured travel (X 0..x, Y 0..y, Z -z..0, as GRBL's soft
  limits with Z homing up) before anything is sent: a target outside it raises
  :class:`InvalidParameter`, where GRBL itself would stop the machine with ``ALARM:2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..aio import wait_for
from ..errors import (
    DeviceTimeout,
    DriverError,
    InstrumentError,
    InvalidParameter,
    NotConnected,
    ProtocolError,
)
from ..links import Links, SerialLink
from ..transports.serial import SerialSession, SerialTransport

log = logging.getLogger(__name__)

Vec = tuple[float, float, float]
AXES = "XYZ"

#: gnea/grbl doc/csv/error_codes_en_US.csv (v1.1 descriptions).
ERROR_TEXT: dict[int, str] = {
    1: "G-code words consist of a letter and a value. Letter was not found.",
    2: "Missing the expected G-code word value or numeric value format is not valid.",
    3: "Grbl '$' system command was not recognized or supported.",
    4: "Negative value received for an expected positive value.",
    5: "Homing cycle failure. Homing is not enabled via settings.",
    6: "Minimum step pulse time must be greater than 3usec.",
    7: "An EEPROM read failed. Auto-restoring affected EEPROM to default values.",
    8: "Grbl '$' command cannot be used unless Grbl is IDLE. Ensures smooth operation during a "
    "job.",
    9: "G-code commands are locked out during alarm or jog state.",
    10: "Soft limits cannot be enabled without homing also enabled.",
    11: "Max characters per line exceeded. Received command line was not executed.",
    12: "Grbl '$' setting value cause the step rate to exceed the maximum supported.",
    13: "Safety door detected as opened and door state initiated.",
    14: "Build info or startup line exceeded EEPROM line length limit. Line not stored.",
    15: "Jog target exceeds machine travel. Jog command has been ignored.",
    16: "Jog command has no '=' or contains prohibited g-code.",
    17: "Laser mode requires PWM output.",
    20: "Unsupported or invalid g-code command found in block.",
    21: "More than one g-code command from same modal group found in block.",
    22: "Feed rate has not yet been set or is undefined.",
    23: "G-code command in block requires an integer value.",
    24: "More than one g-code command that requires axis words found in block.",
    25: "Repeated g-code word found in block.",
    26: "No axis words found in block for g-code command or current modal state which requires "
    "them.",
    27: "Line number value is invalid.",
    28: "G-code command is missing a required value word.",
    29: "G59.x work coordinate systems are not supported.",
    30: "G53 only allowed with G0 and G1 motion modes.",
    31: "Axis words found in block when no command or current modal state uses them.",
    32: "G2 and G3 arcs require at least one in-plane axis word.",
    33: "Motion command target is invalid.",
    34: "Arc radius value is invalid.",
    35: "G2 and G3 arcs require at least one in-plane offset word.",
    36: "Unused value words found in block.",
    37: "G43.1 dynamic tool length offset is not assigned to configured tool length axis.",
    38: "Tool number greater than max supported value.",
}

#: gnea/grbl doc/csv/alarm_codes_en_US.csv.
ALARM_TEXT: dict[int, str] = {
    1: "Hard limit has been triggered. Machine position is likely lost due to sudden halt. "
    "Re-homing is highly recommended.",
    2: "Soft limit alarm. G-code motion target exceeds machine travel. Machine position "
    "retained. Alarm may be safely unlocked.",
    3: "Reset while in motion. Machine position is likely lost due to sudden halt. Re-homing is "
    "highly recommended.",
    4: "Probe fail. Probe is not in the expected initial state before starting probe cycle.",
    5: "Probe fail. Probe did not contact the workpiece within the programmed travel.",
    6: "Homing fail. The active homing cycle was reset.",
    7: "Homing fail. Safety door was opened during homing cycle.",
    8: "Homing fail. Pull off travel failed to clear limit switch. Try increasing pull-off "
    "setting or check wiring.",
    9: "Homing fail. Could not find limit switch within search distances. Try increasing max "
    "travel, decreasing pull-off distance, or check wiring.",
}

#: Alarms after which GRBL serves nothing but Ctrl-X.
CRITICAL_ALARMS = frozenset({1, 2})
#: Alarms after which the machine position is not to be trusted: re-home.
POSITION_LOST_ALARMS = frozenset({1, 3, 6, 7, 8, 9})

STATES = ("Idle", "Run", "Hold", "Jog", "Alarm", "Door", "Check", "Home", "Sleep")
_BANNER = re.compile(r"^Grbl \S+ \['\$' for help\]$")
_NUM = r"[-+]?\d+(?:\.\d*)?"
_VEC = re.compile(rf"^({_NUM}),({_NUM}),({_NUM})$")


def error_text(code: int) -> str:
    return ERROR_TEXT.get(code, "unknown error code")


def alarm_text(code: int) -> str:
    return ALARM_TEXT.get(code, "unknown alarm code")


class GantrySettings(BaseModel):
    """The gantry's link and machine parameters (they mirror GRBL's ``$130-$132``,
    ``$110-$112`` and ``$120-$122``; the driver checks targets and feeds against them)."""

    model_config = ConfigDict(extra="forbid")

    link: SerialLink
    #: Travel (mm) per axis from home: X 0..x, Y 0..y, Z -z..0 (Z homes up), as GRBL's soft limits.
    travel_mm: tuple[float, float, float] = (450.0, 300.0, 100.0)
    #: Maximum rate per axis ($110-$112), mm/min: G1 feeds above the slowest moving axis's are
    #: refused (GRBL would clamp them silently).
    max_rate_mm_min: tuple[float, float, float] = (6000.0, 6000.0, 1500.0)
    #: Acceleration per axis ($120-$122), mm/s^2; only used to estimate move timeouts.
    acceleration_mm_s2: tuple[float, float, float] = (500.0, 500.0, 200.0)
    #: Reply timeout for a line (``ok``/``error``) and a status report.
    command_timeout_s: float = Field(default=2.0, gt=0)
    #: Upper bound for ``$H``.
    homing_timeout_s: float = Field(default=120.0, gt=0)
    #: Added to twice the estimated move time to give a move's timeout.
    move_timeout_margin_s: float = Field(default=10.0, ge=0)
    #: How often a move polls ``?`` (GRBL recommends no more than 5 Hz for UIs; a driver waiting
    #: for the end of a move can poll faster: a report costs the controller a few hundred us).
    poll_interval_s: float = Field(default=0.05, gt=0, le=1.0)
    #: Distance (mm) within which the reported position counts as the target (reports carry 3
    #: decimals).
    position_tolerance_mm: float = Field(default=0.01, gt=0)
    #: After opening the port, how long to read the controller's start-up output before the
    #: first command (GRBL stream.py waits 2 s for an Arduino's DTR reset).
    open_settle_s: float = Field(default=2.0, ge=0)
    #: Named positions (machine coordinates, mm), e.g. rack slots and stations.
    locations: dict[str, tuple[float, float, float]] = Field(default_factory=dict)


@dataclass(frozen=True)
class GantryStatus:
    """A parsed status report. ``position`` is the work position (MPos - WCO); ``alarm`` is the
    last alarm code the driver saw while the machine is in Alarm (``None`` otherwise)."""

    state: str
    substate: int | None
    mpos: Vec
    position: Vec
    feed: float
    spindle: float
    pins: str = ""
    alarm: int | None = None
    raw: str = field(default="", compare=False)

    @property
    def moving(self) -> bool:
        return self.state in ("Run", "Jog", "Home") or (self.state == "Hold" and self.substate == 1)


LineKind = Literal[
    "ok", "error", "alarm", "status", "banner", "msg", "feedback", "setting", "blank", "unknown"
]


class Gantry:
    """Protocol client of a GRBL 1.1 gantry. See the module docstring for the protocol rules."""

    def __init__(self, name: str, settings: GantrySettings, links: Links) -> None:
        self.name = name
        self.settings = settings
        # GRBL: LF only; replies end in CR LF (the CR is stripped by the transport).
        self.port: SerialTransport = links.serial_port(
            name, settings.link, write_terminator=b"\n", read_terminator=b"\n"
        )
        self.last_status: GantryStatus | None = None
        #: The last ``ALARM:N`` seen (cleared by ``$X``/``$H`` success or a status that is not
        #: Alarm).
        self.alarm: int | None = None
        #: GRBL serves nothing but Ctrl-X (alarm 1 or 2 was raised).
        self.locked_until_reset = False
        #: GRBL asked for ``$H`` or ``$X`` (banner with the unlock message, or an alarm).
        self.needs_homing = False
        #: Count of controller resets seen (banners): a reset drops the gripper and the planner.
        self.resets_seen = 0
        self.messages: list[str] = []
        self._wco: Vec = (0.0, 0.0, 0.0)
        self._status_event = asyncio.Event()
        self._in_session = False

    # -- line interpretation -------------------------------------------------------------------
    def _parse_status(self, line: str) -> GantryStatus:
        if not (line.startswith("<") and line.endswith(">")):
            raise ValueError("not a status report")
        fields = line[1:-1].split("|")
        state_text = fields[0]
        state, _, sub = state_text.partition(":")
        if state not in STATES or (sub and not sub.isdigit()):
            raise ValueError(f"unknown machine state {state_text!r}")
        mpos: Vec | None = None
        wpos: Vec | None = None
        feed = spindle = 0.0
        pins = ""
        for f in fields[1:]:
            key, sep, value = f.partition(":")
            if not sep:
                raise ValueError(f"malformed field {f!r}")
            if key in ("MPos", "WPos", "WCO"):
                m = _VEC.match(value)
                if m is None:
                    raise ValueError(f"malformed {key} {value!r}")
                vec: Vec = (float(m[1]), float(m[2]), float(m[3]))
                if key == "MPos":
                    mpos = vec
                elif key == "WPos":
                    wpos = vec
                else:
                    self._wco = vec
            elif key in ("FS", "F"):
                parts = value.split(",")
                feed = float(parts[0])
                spindle = float(parts[1]) if len(parts) > 1 else 0.0
            elif key == "Pn":
                pins = value
            # Bf, Ln, Ov, A and any later field: not needed, tolerated.
        wco = self._wco
        if mpos is not None:
            work: Vec = (mpos[0] - wco[0], mpos[1] - wco[1], mpos[2] - wco[2])
        elif wpos is not None:
            work = wpos
            mpos = (wpos[0] + wco[0], wpos[1] + wco[1], wpos[2] + wco[2])
        else:
            raise ValueError("no MPos or WPos field")
        alarm = self.alarm if state == "Alarm" else None
        return GantryStatus(
            state, int(sub) if sub else None, mpos, work, feed, spindle, pins, alarm, line
        )

    def _interpret(self, line: str) -> tuple[LineKind, int | GantryStatus | None]:
        """Classify one received line and update what the driver knows about the controller."""
        if line == "":
            return "blank", None
        if line == "ok":
            return "ok", None
        if line.startswith("error:"):
            return "error", int(line[6:])  # ValueError -> ProtocolError at the caller
        if line.startswith("ALARM:"):
            code = int(line[6:])
            self.alarm = code
            self.needs_homing = self.needs_homing or code in POSITION_LOST_ALARMS
            if code in CRITICAL_ALARMS:
                self.locked_until_reset = True
            log.warning("%s: ALARM:%d (%s)", self.name, code, alarm_text(code))
            return "alarm", code
        if line.startswith("<"):
            status = self._parse_status(line)
            if status.state == "Alarm":
                self.needs_homing = True  # GRBL in Alarm takes no g-code until $H or $X
            else:
                self.alarm = None
                self.locked_until_reset = False
            self.last_status = status
            self._status_event.set()
            self._status_event = asyncio.Event()
            return "status", status
        if _BANNER.match(line):
            # A reset (Ctrl-X, power, or the DTR reset of a replugged cable): planner emptied,
            # gripper output dropped; a critical alarm is over.
            self.resets_seen += 1
            self.locked_until_reset = False
            log.info("%s: controller reset (%s)", self.name, line)
            return "banner", None
        if line.startswith("[MSG:"):
            msg = line[5:-1]
            self.messages.append(msg)
            del self.messages[:-20]
            if msg == "'$H'|'$X' to unlock":
                self.needs_homing = True
            elif msg == "Reset to continue":
                self.locked_until_reset = True
            elif msg == "Caution: Unlocked":
                self.alarm = None
            return "msg", None
        if line.startswith("[") and line.endswith("]"):
            return "feedback", None
        if line.startswith("$") and "=" in line:
            return "setting", None
        return "unknown", None

    def _interpret_reply(
        self, line: str, command: str
    ) -> tuple[LineKind, int | GantryStatus | None]:
        try:
            kind, value = self._interpret(line)
        except ValueError as exc:
            raise ProtocolError(self.name, command, str(exc), line.encode("latin-1")) from exc
        if kind == "unknown":
            raise ProtocolError(self.name, command, "unexpected line", line.encode("latin-1"))
        return kind, value

    # -- link handling -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[SerialSession]:
        async with self.port.session() as s:
            self._in_session = True
            try:
                await self._drain(s)
                yield s
            finally:
                self._in_session = False

    async def _drain(self, s: SerialSession) -> None:
        """Read and interpret the complete lines already received (pushed messages, late replies)
        instead of flushing them: an ``ALARM:N`` or a banner among them matters.

        On a link that is not open (first use, or a cable pulled and back) the port is opened
        first and the controller is given ``open_settle_s`` to print its banner: opening the port
        resets an Arduino-based GRBL (DTR), and a line sent during that reset is lost."""
        settle = 0.0
        if not self.port.is_open:
            await s.write(b"", command="open")
            settle = self.settings.open_settle_s
        deadline = time.monotonic() + settle
        while True:
            try:
                line = await s.read_line(
                    timeout=max(0.0, deadline - time.monotonic()), command="drain"
                )
            except (DeviceTimeout, NotConnected, ProtocolError):
                return
            try:
                kind, _ = self._interpret(line)
            except ValueError:
                kind = "unknown"
            if kind == "unknown":
                log.warning("%s: ignoring unexpected stale line %r", self.name, line)

    def _refuse_if_locked(self, command: str) -> None:
        if self.locked_until_reset:
            code = self.alarm
            raise InstrumentError(
                self.name,
                command,
                code,
                f"{alarm_text(code) if code else 'alarm'}; GRBL serves nothing until a soft "
                "reset (soft_reset()), then $H",
            )

    def _raise_error(self, command: str, code: int) -> None:
        text = error_text(code)
        if code == 9 and self.needs_homing:
            text += " The controller is in Alarm: home ($H) or unlock ($X) first."
        raise InstrumentError(self.name, command, code, text)

    def _raise_alarm(self, command: str, code: int) -> None:
        raise InstrumentError(self.name, command, code, f"ALARM:{code}: {alarm_text(code)}")

    async def _reply(self, s: SerialSession, command: str, deadline: float, timeout: float) -> None:
        """Read lines until this command's ``ok``; ``error:N``/``ALARM:N`` raise."""
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                line = await s.read_line(timeout=remaining, command=command)
            except DeviceTimeout as exc:
                raise DeviceTimeout(self.name, command, timeout, exc.detail) from None
            kind, value = self._interpret_reply(line, command)
            if kind == "ok":
                return
            if kind == "error":
                assert isinstance(value, int)
                if value == 9:
                    # Locked out: Alarm or Jog. Ask which, so the message says what to do (a
                    # replugged cable resets GRBL; the banner may have been lost on reopening).
                    with contextlib.suppress(DriverError):
                        await self._poll(s, command)
                self._raise_error(command, value)
            if kind == "alarm":
                assert isinstance(value, int)
                self._raise_alarm(command, value)
            if kind == "banner":
                raise InstrumentError(
                    self.name,
                    command,
                    None,
                    "the controller reset while the command ran (its line was discarded)",
                )

    async def _line(self, s: SerialSession, line: str, timeout: float | None = None) -> None:
        """Send one line and wait for its ``ok`` (send-and-wait streaming)."""
        self._refuse_if_locked(line)
        t = self.settings.command_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + t
        await s.write(line, command=line)
        await self._reply(s, line, deadline, t)

    async def _poll(
        self, s: SerialSession, command: str, timeout: float | None = None
    ) -> GantryStatus:
        """Send ``?`` and read up to its report; an ``ALARM:N`` on the way raises."""
        t = self.settings.command_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + t
        if self.port.is_open:
            await self.port.write_realtime(b"?", command=command)
        else:
            await s.write(b"?", command=command)
        while True:
            try:
                line = await s.read_line(
                    timeout=max(0.0, deadline - time.monotonic()), command=command
                )
            except DeviceTimeout:
                raise DeviceTimeout(
                    self.name,
                    command,
                    t,
                    f"no status report ('?') within {t:g} s during {command!r}",
                ) from None
            kind, value = self._interpret_reply(line, command)
            if kind == "status":
                assert isinstance(value, GantryStatus)
                return value
            if kind == "alarm":
                assert isinstance(value, int)
                self._raise_alarm(command, value)
            # 'ok' here is a stale or late reply of an earlier line; messages are recorded.

    # -- public API ----------------------------------------------------------------------------
    async def status(self) -> GantryStatus:
        """A fresh status report (``?``). While a critical alarm locks the controller (it answers
        no ``?`` then), returns the last known state as Alarm without asking."""
        if self.locked_until_reset:
            last = self.last_status
            pos = last.mpos if last else (math.nan, math.nan, math.nan)
            work = last.position if last else pos
            return GantryStatus("Alarm", None, pos, work, 0.0, 0.0, "", self.alarm, "")
        if self._in_session and self.port.is_open:
            # Another call holds the link (a move polling, a homing): ask anyway; its reader
            # interprets our report and wakes us.
            event = self._status_event
            await self.port.write_realtime(b"?", command="?")
            t = self.settings.command_timeout_s
            deadline = time.monotonic() + t
            # Wait in slices: if the holder lets go first, our report waits in the buffer and
            # the session below reads it.
            while self._in_session and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await wait_for(event.wait(), min(left, self.settings.poll_interval_s))
                if event.is_set():
                    assert self.last_status is not None
                    return self.last_status
            if self._in_session:
                raise DeviceTimeout(self.name, "?", t, "no status report ('?')")
        async with self._session() as s:
            if self.locked_until_reset:
                return await self.status()
            return await self._poll(s, "?")

    async def position(self) -> Vec:
        """Work position (MPos - WCO), mm."""
        return (await self.status()).position

    async def home(self, timeout: float | None = None) -> GantryStatus:
        """``$H``: run the homing cycle; returns when its ``ok`` arrives (the machine is at its
        home position and Idle). Homing is idempotent, so it is also the recovery after any
        alarm or reset."""
        t = self.settings.homing_timeout_s if timeout is None else timeout
        async with self._session() as s:
            await self._line(s, "$H", timeout=t)
            self.needs_homing = False
            self.alarm = None
            return await self._poll(s, "$H")

    async def unlock(self) -> None:
        """``$X``: leave Alarm without homing (the position may be wrong: prefer :meth:`home`)."""
        async with self._session() as s:
            await self._line(s, "$X")
            self.alarm = None

    def check_target(self, x: float, y: float, z: float, feed: float | None = None) -> Vec:
        """Raise :class:`InvalidParameter` for a target outside the travel or a bad feed."""
        cmd = f"move_to({x:g}, {y:g}, {z:g})"
        tx, ty, tz = self.settings.travel_mm
        wco = self._wco  # the travel is in machine coordinates; targets in work coordinates
        limits = (
            (0.0 - wco[0], tx - wco[0]),
            (0.0 - wco[1], ty - wco[1]),
            (-tz - wco[2], 0.0 - wco[2]),
        )
        for axis, value, (lo, hi) in zip(AXES, (x, y, z), limits, strict=True):
            if not math.isfinite(value) or not lo <= value <= hi:
                raise InvalidParameter(
                    self.name,
                    cmd,
                    f"{axis.lower()}={value!r} mm is outside the travel {lo:g}..{hi:g} mm",
                )
        if feed is not None:
            top = max(self.settings.max_rate_mm_min)
            if not math.isfinite(feed) or not 0 < feed <= top:
                raise InvalidParameter(
                    self.name, cmd, f"feed={feed!r} mm/min is outside 0 (exclusive)..{top:g} mm/min"
                )
        return (float(x), float(y), float(z))

    def _move_timeout(self, start: Vec | None, target: Vec, feed: float | None) -> float:
        if start is None or any(math.isnan(c) for c in start):
            d = self.settings.travel_mm
            delta: Vec = (d[0], d[1], d[2])
        else:
            delta = (
                abs(target[0] - start[0]),
                abs(target[1] - start[1]),
                abs(target[2] - start[2]),
            )
        est = 0.0
        for i in range(3):
            if delta[i] == 0:
                continue
            rate = self.settings.max_rate_mm_min[i] / 60.0
            if feed is not None:
                rate = min(rate, feed / 60.0)
            est = max(est, delta[i] / rate + 2 * rate / self.settings.acceleration_mm_s2[i])
        return 2 * est + self.settings.move_timeout_margin_s

    def _at(self, status: GantryStatus, target: Vec) -> bool:
        return math.dist(status.position, target) <= self.settings.position_tolerance_mm

    async def move_to(
        self, x: float, y: float, z: float, feed: float | None = None, timeout: float | None = None
    ) -> GantryStatus:
        """Move in a straight line to work coordinates (mm; G54, whose offsets are zero on this
        cell, so the same as machine coordinates): ``G90 G0`` (rapid) or ``G90 G1 F<feed>``
        (mm/min). Returns when the machine reports Idle at the target.

        Raises :class:`InvalidParameter` (nothing sent) for a target outside the travel;
        :class:`InstrumentError` for ``error:N`` or an ``ALARM:N`` during the move (at once);
        :class:`DeviceTimeout` if the move does not end in time or its ``ok`` and status are
        lost. The line is never sent twice (see the module docstring)."""
        target = self.check_target(x, y, z, feed)
        words = " ".join(f"{a}{v:.3f}" for a, v in zip(AXES, target, strict=True))
        line = f"G90 G0 {words}" if feed is None else f"G90 G1 {words} F{feed:.1f}"
        start = self.last_status.position if self.last_status else None
        budget = timeout if timeout is not None else self._move_timeout(start, target, feed)
        async with self._session() as s:
            self._refuse_if_locked(line)
            t = self.settings.command_timeout_s
            await s.write(line, command=line)
            try:
                await self._reply(s, line, time.monotonic() + t, t)
            except DeviceTimeout:
                await self._after_lost_ok(s, line, target)
            return await self._wait_idle_at(s, line, target, budget)

    async def _after_lost_ok(self, s: SerialSession, line: str, target: Vec) -> None:
        """The ``ok`` of a move did not come: ask the machine whether it took the line."""
        try:
            st = await self._poll(s, line)
        except DeviceTimeout:
            raise DeviceTimeout(
                self.name,
                line,
                self.settings.command_timeout_s,
                f"no reply to {line!r} and no status report: whether the move was accepted is "
                "unknown (not re-sent)",
            ) from None
        if st.state in ("Run", "Hold", "Door") or (st.state == "Idle" and self._at(st, target)):
            log.warning("%s: 'ok' of %r lost; the machine took it (%s)", self.name, line, st.raw)
            return
        raise DeviceTimeout(
            self.name,
            line,
            self.settings.command_timeout_s,
            f"no reply to {line!r}; the machine is {st.state} at {st.mpos}, so the move was not "
            "accepted (not re-sent)",
        )

    async def _wait_idle_at(
        self, s: SerialSession, line: str, target: Vec, budget: float
    ) -> GantryStatus:
        deadline = time.monotonic() + budget
        interval = self.settings.poll_interval_s
        stray = 0
        while True:
            now = time.monotonic()
            st = await self._poll(s, line)
            if st.state == "Idle":
                if self._at(st, target):
                    return st
                stray += 1
                if stray < 3:  # a report taken just before the cycle started: ask again
                    await asyncio.sleep(interval)
                    continue
                raise InstrumentError(
                    self.name,
                    line,
                    None,
                    f"the machine stopped at {st.mpos}, not at the target {target}",
                )
            if st.state == "Alarm":
                code = self.alarm
                raise InstrumentError(
                    self.name,
                    line,
                    code,
                    f"ALARM:{code}: {alarm_text(code)}" if code else "machine in Alarm",
                )
            if st.state in ("Hold", "Door", "Sleep"):
                deadline += time.monotonic() - now + interval  # a pause does not count
            if time.monotonic() > deadline:
                raise DeviceTimeout(
                    self.name,
                    line,
                    budget,
                    f"move {line!r} not complete within {budget:.1f} s (state {st.state} at "
                    f"{st.mpos})",
                )
            # Wait for the next poll, but read anything the controller pushes meanwhile.
            wait_until = time.monotonic() + interval
            while (left := wait_until - time.monotonic()) > 0:
                try:
                    pushed = await s.read_line(timeout=left, command=line)
                except DeviceTimeout:
                    break
                kind, value = self._interpret_reply(pushed, line)
                if kind == "alarm":
                    assert isinstance(value, int)
                    self._raise_alarm(line, value)
                if kind == "banner":
                    code = self.alarm
                    why = f" (ALARM:{code}: {alarm_text(code)})" if code else ""
                    raise InstrumentError(
                        self.name, line, code, "the controller reset during the move" + why
                    )

    async def gripper(self, close: bool) -> None:
        """Close (``M8``) or open (``M9``) the gripper. GRBL runs it when the planner is empty
        (after the motion before it), and answers ``ok`` then. A lost ``ok`` is checked with
        ``$G`` (the parser's coolant mode) rather than sending the line again."""
        line = "M8" if close else "M9"
        async with self._session() as s:
            self._refuse_if_locked(line)
            t = self.settings.command_timeout_s
            await s.write(line, command=line)
            try:
                await self._reply(s, line, time.monotonic() + t, t)
            except DeviceTimeout:
                modes = await self._parser_modes(s, line)
                if line not in modes:
                    raise DeviceTimeout(
                        self.name,
                        line,
                        t,
                        f"no reply to {line!r}; the parser state ({' '.join(modes)}) shows it "
                        "was not executed (not re-sent)",
                    ) from None

    async def _parser_modes(self, s: SerialSession, command: str) -> list[str]:
        t = self.settings.command_timeout_s
        deadline = time.monotonic() + t
        await s.write("$G", command="$G")
        modes: list[str] | None = None
        while True:
            try:
                line = await s.read_line(
                    timeout=max(0.0, deadline - time.monotonic()), command="$G"
                )
            except DeviceTimeout:
                raise DeviceTimeout(
                    self.name,
                    command,
                    t,
                    f"no reply to {command!r} nor to '$G': whether it ran is unknown (not re-sent)",
                ) from None
            if line.startswith("[GC:") and line.endswith("]"):
                modes = line[4:-1].split()
                continue
            kind, value = self._interpret_reply(line, "$G")
            if kind == "ok" and modes is not None:
                return modes
            if kind == "error":
                assert isinstance(value, int)
                self._raise_error("$G", value)

    async def feed_hold(self) -> None:
        """``!``: decelerate to a stop and hold (state Hold:1, then Hold:0). A move in progress
        keeps waiting; :meth:`resume` continues it."""
        await self._realtime(b"!", "feed hold (!)")

    async def resume(self) -> None:
        """``~``: cycle start, resuming a hold (or a closed safety door)."""
        await self._realtime(b"~", "cycle start (~)")

    async def _realtime(self, byte: bytes, command: str) -> None:
        if self.port.is_open:
            await self.port.write_realtime(byte, command=command)
        else:
            async with self._session() as s:
                await s.write(byte, command=command)

    async def soft_reset(self) -> GantryStatus:
        """Ctrl-X: stop at once and empty the planner and buffers (GRBL's documented way to stop
        and flush). In motion this loses the position (``ALARM:3``); afterwards the machine is
        usually in Alarm and the driver marks it as needing :meth:`home`. Returns the status
        after the reset."""
        command = "soft reset (Ctrl-X)"
        seen = self.resets_seen
        # Not through the lock: a move holding the link must see the reset (and fail with it);
        # its reader may then consume the banner, which ``resets_seen`` tells us.
        if self.port.is_open:
            await self.port.write_realtime(b"\x18", command=command)
        async with self.port.session() as s:
            self._in_session = True
            try:
                if not self.port.is_open:
                    await s.write(b"\x18", command=command)
                t = self.settings.command_timeout_s
                deadline = time.monotonic() + t
                while self.resets_seen == seen:
                    try:
                        line = await s.read_line(
                            timeout=max(0.0, deadline - time.monotonic()), command=command
                        )
                    except DeviceTimeout:
                        raise DeviceTimeout(
                            self.name, command, t, "no start-up banner after the reset"
                        ) from None
                    self._interpret_reply(line, command)
                self.locked_until_reset = False
                st = await self._poll(s, command)
            finally:
                self._in_session = False
        if st.state == "Alarm":
            self.needs_homing = True
        return st


__all__ = [
    "ALARM_TEXT",
    "ERROR_TEXT",
    "Gantry",
    "GantrySettings",
    "GantryStatus",
    "alarm_text",
    "error_text",
]
