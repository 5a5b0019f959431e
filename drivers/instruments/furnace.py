"""Eurotherm 3216 / EPC3016 furnace controller: protocol client over Modbus (TCP, RTU, RTU/TCP).

The link is whatever :meth:`drivers.links.Links.modbus_device` hands out for the configured
:class:`~drivers.links.ModbusLink`: Modbus TCP (EPC3016, port 502), RTU on an RS-485 line, or RTU
framing through a serial device server. The client does not care which.

Register choices (why)
======================
* **Temperatures, rates and outputs are read and written in the IEEE float region**
  (``0x8000 + 2 * address``, two registers, high word first). The 16-bit region carries an
  *implied* decimal point that depends on the display resolution configured on the instrument
  (850.0 °C reads 8500 at one decimal, 850 at none): a driver that guesses the resolution is off by
  ten the day somebody changes the display. The float region has no such ambiguity. Values read
  are rounded to 0.01 (a float32 has ~7 significant digits; the instrument's own resolution is
  0.1 at best).
* Modes, the status word, segment types and times are plain integers in the 16-bit region (they
  are not in the float region).
* The setpoint written is the *target setpoint* (register 2): it is whichever of SP1 / SP2 /
  remote SP is active, so the furnace goes where we asked whatever the SP select is.

Writes: sent once, then verified
================================
Nothing that changes the furnace is repeated blindly (DESIGN.md). Each write goes out once; the
driver then reads the instrument's state to find out what happened:

* :meth:`Furnace.set_setpoint` / :meth:`Furnace.set_rate`: after the write (answered or not) the
  register is read back. Equal: done (a lost reply is logged and forgiven, because the readback
  proves the write happened). Different after a lost reply: the original error is raised (the
  write did not take; the caller decides). Different after a clean reply: :class:`ProtocolError`.
* :meth:`Furnace.run_program`: the segment table is written and read back (types, targets,
  rates, times) *before* the run command; the run command (2 to register 23) is sent once, and
  if its reply is lost the run mode register says whether the program started: RUN, HOLD,
  HOLDBACK or COMPLETE mean it did (the call returns), RESET means it did not (the error is
  raised, and nothing is re-sent).
* :meth:`Furnace.hold` / :meth:`Furnace.reset_program`: the same check through register 23.

Every error names the device and the command (``furnace: no reply to 'read PV (reg 1, float
0x8002)' within 1 s``); Modbus exception replies arrive as
:class:`~drivers.errors.InstrumentError` with the exception code and its name (``error 3
(ILLEGAL_VALUE)``). Reads are retried ``read_retries`` times by the transport on a timeout or a
bad frame; writes never.

Safe state (what the 3216 allows)
=================================
The 3216 has no "heater enable" register. :meth:`Furnace.heater_off` does, each step attempted
even if an earlier one fails: programmer reset (23 = 1, so no program drives the setpoint),
target setpoint to ``settings.safe_setpoint_c``, and **instrument mode standby** (199 = 1: the
manual's "all outputs off"). Standby survives setpoint writes; :meth:`Furnace.operate` (199 = 0)
returns to normal operation. The over-temperature alarm (alarm 1 on this cell) also cuts the
output in the instrument itself, wired to the heater contactor.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Sequence
from enum import IntEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import (
    DeviceTimeout,
    DriverError,
    InstrumentError,
    InvalidParameter,
    NotConnected,
    ProtocolError,
)
from ..links import Links, ModbusLink
from ..transports.modbus import ModbusDevice

log = logging.getLogger(__name__)

# -- register map (Eurotherm 3216 / EPC3016 Modbus addresses) -----------------------------------
PV, TARGET_SP, MANUAL_OP, WORKING_OP, WORKING_SP = 1, 2, 3, 4, 5
RUN_MODE, SP_RATE, STATUS_WORD = 23, 35, 75
SEGMENT_NUMBER, SEGMENT_TYPE_RUN, PROGRAM_TIME_LEFT, SEGMENT_TIME_LEFT = 56, 29, 58, 63
PROG_PSP, INSTRUMENT_MODE, ACK_ALL = 163, 199, 274
PROGRAM_HEADER, SEGMENT_BASE, SEGMENT_STRIDE, MAX_SEGMENTS = 8328, 8336, 8, 25
FLOAT_BASE = 0x8000

#: Program header values written by :meth:`Furnace.run_program`, from 8328: holdback type off,
#: holdback value 0, ramp units per minute, dwell units seconds, 1 cycle, holdback style 0.
_RAMP_PER_MIN, _DWELL_SECONDS = 1, 0
_END_TYPES = {"dwell": 0, "reset": 1}


def float_address(address: int) -> int:
    """The IEEE-float mirror of a 16-bit parameter address (``1`` -> ``0x8002``)."""
    return FLOAT_BASE + 2 * address


def _float_regs(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def _regs_float(regs: Sequence[int]) -> float:
    return float(struct.unpack(">f", struct.pack(">HH", regs[0], regs[1]))[0])


# -- settings ----------------------------------------------------------------------------------
class FurnaceSettings(BaseModel):
    """Configuration of one Eurotherm 3216 / EPC3016 on a Modbus link."""

    model_config = ConfigDict(extra="forbid")

    link: ModbusLink
    #: Setpoints the driver accepts (°C); checked before anything is sent. Keep them inside the
    #: instrument's own SP limits (registers 111/112), which would refuse with exception 3.
    min_setpoint_c: float = 0.0
    max_setpoint_c: float = Field(default=1100.0, gt=0)
    #: Largest setpoint rate limit / programmer ramp rate accepted, °C/min.
    max_rate_c_min: float = Field(default=600.0, gt=0)
    #: Setpoint used by :meth:`Furnace.heater_off` (the furnace cools towards it).
    safe_setpoint_c: float = 25.0
    #: Which of alarms 1-4 is wired as the over-temperature trip.
    overtemp_alarm: int = Field(default=1, ge=1, le=4)
    #: Read retries on a timeout / bad frame (the transport's; writes are never retried).
    read_retries: int = Field(default=1, ge=0, le=10)
    #: Tolerance for the read-back of a written setpoint or rate, °C (float32 round trip).
    verify_tolerance_c: float = Field(default=0.01, gt=0)

    @model_validator(mode="after")
    def _limits(self) -> FurnaceSettings:
        if self.min_setpoint_c >= self.max_setpoint_c:
            raise ValueError("min_setpoint_c must be below max_setpoint_c")
        if not self.min_setpoint_c <= self.safe_setpoint_c <= self.max_setpoint_c:
            raise ValueError("safe_setpoint_c must lie within the setpoint limits")
        return self


# -- status ------------------------------------------------------------------------------------
class StatusBit(IntEnum):
    """Bits of the instrument status word (register 75), as eurothermlib decodes the 3216's."""

    ALARM1 = 0
    ALARM2 = 1
    ALARM3 = 2
    ALARM4 = 3
    SENSOR_BREAK = 5
    LOOP_BREAK = 6
    HEATER_FAIL = 7
    LOAD_FAIL = 8
    PROGRAM_END = 9
    PV_OUT_OF_RANGE = 10
    NEW_ALARM = 12
    RAMP_RUNNING = 13
    REMOTE_SP_FAIL = 14


class FurnaceStatus(BaseModel):
    """The status word decoded, with the instrument mode (199) and the over-temperature alarm."""

    model_config = ConfigDict(frozen=True)

    word: int
    alarms: tuple[bool, bool, bool, bool]
    sensor_break: bool
    loop_break: bool
    heater_fail: bool
    load_fail: bool
    program_end: bool
    pv_out_of_range: bool
    new_alarm: bool
    ramp_running: bool
    remote_sp_fail: bool
    #: Instrument mode: 0 operating, 1 standby (outputs off), 2 configuration.
    instrument_mode: int
    #: The configured over-temperature alarm (``settings.overtemp_alarm``) is on.
    over_temperature: bool

    @classmethod
    def decode(cls, word: int, instrument_mode: int, overtemp_alarm: int = 1) -> FurnaceStatus:
        def bit(b: StatusBit) -> bool:
            return bool(word >> b & 1)

        alarms = (bit(StatusBit.ALARM1), bit(StatusBit.ALARM2), bit(StatusBit.ALARM3),
                  bit(StatusBit.ALARM4))
        return cls(
            word=word,
            alarms=alarms,
            sensor_break=bit(StatusBit.SENSOR_BREAK),
            loop_break=bit(StatusBit.LOOP_BREAK),
            heater_fail=bit(StatusBit.HEATER_FAIL),
            load_fail=bit(StatusBit.LOAD_FAIL),
            program_end=bit(StatusBit.PROGRAM_END),
            pv_out_of_range=bit(StatusBit.PV_OUT_OF_RANGE),
            new_alarm=bit(StatusBit.NEW_ALARM),
            ramp_running=bit(StatusBit.RAMP_RUNNING),
            remote_sp_fail=bit(StatusBit.REMOTE_SP_FAIL),
            instrument_mode=instrument_mode,
            over_temperature=alarms[overtemp_alarm - 1],
        )

    @property
    def standby(self) -> bool:
        return self.instrument_mode != 0

    @property
    def fault(self) -> str | None:
        """Why the furnace cannot follow its setpoint now, or None."""
        if self.over_temperature:
            return "over-temperature alarm (output cut by the instrument)"
        if self.sensor_break:
            return "thermocouple sensor break (output cut)"
        if self.standby:
            return f"instrument mode {self.instrument_mode} (standby: outputs off)"
        return None


class FurnaceAlarm(InstrumentError):
    """The instrument reports a condition that stops it heating (over-temperature, sensor break,
    standby); ``status`` is the decoded status."""

    def __init__(self, device: str, command: str | None, status: FurnaceStatus) -> None:
        self.status = status
        super().__init__(device, command, f"status 0x{status.word:04x}", status.fault or "alarm")


class RunMode(IntEnum):
    """Programmer run mode (register 23)."""

    RESET = 1
    RUN = 2
    HOLD = 4
    HOLDBACK = 8
    COMPLETE = 16


class ProgramState(BaseModel):
    model_config = ConfigDict(frozen=True)

    mode: RunMode
    #: Running segment (1-based), 0 when reset or complete.
    segment: int
    program_time_left_s: int
    segment_time_left_s: int
    #: The programmer's setpoint, °C.
    programmer_sp_c: float

    @property
    def started(self) -> bool:
        return self.mode is not RunMode.RESET


# -- program segments --------------------------------------------------------------------------
class Ramp(BaseModel):
    """Ramp at ``rate_c_min`` to ``target_c``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["ramp"] = "ramp"
    target_c: float
    rate_c_min: float = Field(gt=0)


class RampTime(BaseModel):
    """Ramp to ``target_c`` in ``duration_s`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["ramp_time"] = "ramp_time"
    target_c: float
    duration_s: int = Field(gt=0, le=65535)


class Dwell(BaseModel):
    """Hold the programmer setpoint for ``duration_s`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["dwell"] = "dwell"
    duration_s: int = Field(gt=0, le=65535)


class Step(BaseModel):
    """Jump the programmer setpoint to ``target_c``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["step"] = "step"
    target_c: float


class End(BaseModel):
    """End of the program (optional as the last segment; the driver adds it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["end"] = "end"


Segment = Annotated[Ramp | RampTime | Dwell | Step | End, Field(discriminator="kind")]
_SEG_TYPE: dict[str, int] = {"end": 0, "ramp": 1, "ramp_time": 2, "dwell": 3, "step": 4}


class FurnaceProgram(BaseModel):
    """A program for the controller's program 1: up to 25 segments, ``End`` only last."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    segments: list[Segment] = Field(min_length=1, max_length=MAX_SEGMENTS)
    #: At the end: ``dwell`` keeps the last programmer setpoint (run mode COMPLETE), ``reset``
    #: hands control back to the loop setpoint (run mode RESET).
    end: Literal["dwell", "reset"] = "dwell"

    @model_validator(mode="after")
    def _end_last(self) -> FurnaceProgram:
        for i, seg in enumerate(self.segments):
            if isinstance(seg, End) and i != len(self.segments) - 1:
                raise ValueError(f"segment {i + 1}: 'end' may only be the last segment")
        if all(isinstance(s, End) for s in self.segments):
            raise ValueError("a program needs at least one segment that is not 'end'")
        return self

    def body(self) -> list[Ramp | RampTime | Dwell | Step]:
        return [s for s in self.segments if not isinstance(s, End)]


# -- client ------------------------------------------------------------------------------------
class Furnace:
    """Protocol client of one Eurotherm 3216 / EPC3016. See the module docstring."""

    def __init__(self, name: str, settings: FurnaceSettings, links: Links) -> None:
        self.name = name
        self.settings = settings
        self.modbus: ModbusDevice = links.modbus_device(name, settings.link)

    # -- low level ------------------------------------------------------------------------------
    async def _read_float(self, address: int, what: str) -> float:
        fa = float_address(address)
        regs = await self.modbus.read_holding_registers(
            fa, 2, command=f"read {what} (reg {address}, float 0x{fa:04x})",
            retries=self.settings.read_retries,
        )
        return round(_regs_float(regs), 2)

    async def _read_int(self, address: int, what: str) -> int:
        regs = await self.modbus.read_holding_registers(
            address, 1, command=f"read {what} (reg {address})",
            retries=self.settings.read_retries,
        )
        return regs[0]

    async def _write_float(self, address: int, value: float, command: str) -> None:
        await self.modbus.write_registers(float_address(address), _float_regs(value),
                                          command=command)

    def _invalid(self, command: str, detail: str) -> InvalidParameter:
        return InvalidParameter(self.name, command, detail)

    async def _write_verified_float(
        self, address: int, value: float, what: str, command: str
    ) -> None:
        """Write once, read back; forgive a lost reply only when the readback proves it."""
        lost: DriverError | None = None
        try:
            await self._write_float(address, value, command)
        except (DeviceTimeout, ProtocolError, NotConnected) as exc:
            lost = exc
        try:
            got = await self._read_float(address, what)
        except DriverError:
            if lost is not None:
                raise lost from None
            raise
        if abs(got - value) <= self.settings.verify_tolerance_c:
            if lost is not None:
                log.warning("%s: %s: reply lost (%s) but the readback shows it was done",
                            self.name, command, lost)
            return
        if lost is not None:
            raise lost
        raise ProtocolError(self.name, command,
                            f"written {value:g} but {what} reads back {got:g}")

    # -- loop -----------------------------------------------------------------------------------
    async def temperature(self) -> float:
        """Process value (thermocouple), °C."""
        return await self._read_float(PV, "PV")

    async def setpoint(self) -> float:
        """Target setpoint, °C (where the loop is going; see :meth:`working_setpoint`)."""
        return await self._read_float(TARGET_SP, "target SP")

    async def working_setpoint(self) -> float:
        """Working setpoint, °C: the rate-limited or programmer setpoint the PID follows now."""
        return await self._read_float(WORKING_SP, "working SP")

    async def set_setpoint(self, celsius: float) -> None:
        """Set the target setpoint (register 2), checked against the configured limits first."""
        command = f"write target SP = {celsius:g} °C (reg {TARGET_SP})"
        lo, hi = self.settings.min_setpoint_c, self.settings.max_setpoint_c
        if not lo <= celsius <= hi:
            raise self._invalid(command, f"setpoint {celsius:g} °C outside {lo:g}..{hi:g} °C")
        await self._write_verified_float(TARGET_SP, float(celsius), "target SP", command)

    async def rate(self) -> float:
        """Setpoint rate limit, °C/min (0 = off: setpoint changes are steps)."""
        return await self._read_float(SP_RATE, "SP rate")

    async def set_rate(self, c_per_min: float) -> None:
        """Set the setpoint rate limit (register 35), °C/min; 0 turns it off."""
        command = f"write SP rate = {c_per_min:g} °C/min (reg {SP_RATE})"
        hi = self.settings.max_rate_c_min
        if not 0 <= c_per_min <= hi:
            raise self._invalid(command, f"rate {c_per_min:g} °C/min outside 0..{hi:g} °C/min")
        await self._write_verified_float(SP_RATE, float(c_per_min), "SP rate", command)

    async def output(self) -> float:
        """Working output, % (0 while an over-temperature alarm or standby cuts it)."""
        return await self._read_float(WORKING_OP, "working output")

    async def status(self) -> FurnaceStatus:
        """Status word (75) decoded, with the instrument mode (199)."""
        word = await self._read_int(STATUS_WORD, "status word")
        mode = await self._read_int(INSTRUMENT_MODE, "instrument mode")
        return FurnaceStatus.decode(word, mode, self.settings.overtemp_alarm)

    async def acknowledge_alarms(self) -> None:
        """Acknowledge all alarms (write 1 to 274). A latched alarm clears only once its cause
        has gone (e.g. PV back below the over-temperature threshold)."""
        await self.modbus.write_register(ACK_ALL, 1,
                                         command=f"acknowledge alarms (reg {ACK_ALL} = 1)")

    async def operate(self) -> None:
        """Leave standby: instrument mode 0 (operating), so the outputs follow the loop again."""
        await self.modbus.write_register(
            INSTRUMENT_MODE, 0, command=f"instrument mode operating (reg {INSTRUMENT_MODE} = 0)"
        )

    async def heater_off(self) -> None:
        """The safe state: programmer reset, setpoint to ``safe_setpoint_c``, standby (outputs
        off). Every step is attempted; the first error is raised at the end."""
        errors: list[DriverError] = []
        steps = (
            self.reset_program,
            lambda: self.set_setpoint(self.settings.safe_setpoint_c),
            lambda: self.modbus.write_register(
                INSTRUMENT_MODE, 1, command=f"instrument mode standby (reg {INSTRUMENT_MODE} = 1)"
            ),
        )
        for step in steps:
            try:
                await step()
            except DriverError as exc:
                log.error("%s: safe state step failed: %s", self.name, exc)
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- programmer -----------------------------------------------------------------------------
    async def run_mode(self) -> RunMode:
        raw = await self._read_int(RUN_MODE, "run mode")
        try:
            return RunMode(raw)
        except ValueError:
            raise ProtocolError(self.name, f"read run mode (reg {RUN_MODE})",
                                f"unknown run mode {raw}") from None

    async def program_state(self) -> ProgramState:
        mode = await self.run_mode()
        segment = await self._read_int(SEGMENT_NUMBER, "segment number")
        prog_left = await self._read_int(PROGRAM_TIME_LEFT, "program time left")
        seg_left = await self._read_int(SEGMENT_TIME_LEFT, "segment time left")
        psp = await self._read_float(PROG_PSP, "programmer SP")
        return ProgramState(mode=mode, segment=segment, program_time_left_s=prog_left,
                            segment_time_left_s=seg_left, programmer_sp_c=psp)

    def _check_program(self, program: FurnaceProgram, command: str) -> None:
        lo, hi = self.settings.min_setpoint_c, self.settings.max_setpoint_c
        rmax = self.settings.max_rate_c_min
        for i, seg in enumerate(program.body(), start=1):
            target = getattr(seg, "target_c", None)
            if target is not None and not lo <= target <= hi:
                raise self._invalid(command, f"segment {i}: target {target:g} °C outside "
                                             f"{lo:g}..{hi:g} °C")
            if isinstance(seg, Ramp) and seg.rate_c_min > rmax:
                raise self._invalid(command, f"segment {i}: rate {seg.rate_c_min:g} °C/min "
                                             f"outside 0..{rmax:g} °C/min")

    async def write_program(self, program: FurnaceProgram) -> None:
        """Write program 1's header and segment table, then read it back. Does not run it."""
        body = program.body()
        await self.modbus.write_registers(
            PROGRAM_HEADER, [0, 0, _RAMP_PER_MIN, _DWELL_SECONDS, 1, 0, _END_TYPES[program.end]],
            command=f"write program header (reg {PROGRAM_HEADER}+7)",
        )
        rows = [*body, End()] if len(body) < MAX_SEGMENTS else body
        for n, seg in enumerate(rows, start=1):
            base = SEGMENT_BASE + SEGMENT_STRIDE * (n - 1)
            await self.modbus.write_register(
                base, _SEG_TYPE[seg.kind], command=f"write segment {n} type {seg.kind} (reg {base})"
            )
            addr, values = _float_block(seg, base)
            if values:
                await self.modbus.write_registers(
                    float_address(addr), [r for v in values for r in _float_regs(v)],
                    command=f"write segment {n} values {values} (reg {addr}, float)",
                )
            if not isinstance(seg, End):
                # no call, no events, no segment holdback
                await self.modbus.write_registers(
                    base + 3, [0, 0, 0], command=f"write segment {n} options (reg {base + 3}+3)"
                )
        await self._verify_program(rows)

    async def _verify_program(self, rows: Sequence[Ramp | RampTime | Dwell | Step | End]) -> None:
        for n, seg in enumerate(rows, start=1):
            base = SEGMENT_BASE + SEGMENT_STRIDE * (n - 1)
            command = f"verify segment {n}"
            seg_type = await self._read_int(base, f"segment {n} type")
            if seg_type != _SEG_TYPE[seg.kind]:
                raise ProtocolError(self.name, command,
                                    f"type reads {seg_type}, written {_SEG_TYPE[seg.kind]}")
            addr, want = _float_block(seg, base)
            if not want:
                continue
            fa = float_address(addr)
            regs = await self.modbus.read_holding_registers(
                fa, 2 * len(want),
                command=f"read segment {n} values (reg {addr}, float 0x{fa:04x})",
                retries=self.settings.read_retries,
            )
            got = [_regs_float(regs[i:i + 2]) for i in range(0, 2 * len(want), 2)]
            tol = self.settings.verify_tolerance_c
            if any(abs(g - w) > tol for g, w in zip(got, want, strict=True)):
                raise ProtocolError(self.name, command, f"values read {got}, written {want}")

    async def run_program(self, segments: FurnaceProgram | Sequence[Segment]) -> None:
        """Write the program, verify it, and run it (run mode 2, sent once).

        Refused (nothing sent but reads) while a program is running or held. A previous
        program's COMPLETE state is reset first. If the run command's reply is lost, the run
        mode says whether the program started; it is never re-sent.
        """
        program = segments if isinstance(segments, FurnaceProgram) else FurnaceProgram(
            segments=list(segments))
        command = f"run program ({len(program.body())} segments)"
        self._check_program(program, command)
        mode = await self.run_mode()
        if mode in (RunMode.RUN, RunMode.HOLD, RunMode.HOLDBACK):
            raise InstrumentError(self.name, command, mode.name,
                                  "a program is already running; reset it first")
        if mode is RunMode.COMPLETE:
            await self.reset_program()
        await self.write_program(program)
        await self.start_program()

    async def start_program(self) -> None:
        """Run the program already in the controller (run mode 2, sent once). If the reply is
        lost, the run mode register says whether it started; RESET means it did not, and the
        original error is raised."""
        await self._set_run_mode(
            RunMode.RUN, {RunMode.RUN, RunMode.HOLDBACK, RunMode.HOLD, RunMode.COMPLETE}
        )

    async def hold(self) -> None:
        """Hold the running program (run mode 4): the programmer setpoint and timers freeze."""
        await self._set_run_mode(RunMode.HOLD, {RunMode.HOLD, RunMode.RESET, RunMode.COMPLETE})

    async def resume(self) -> None:
        """Continue a held program (run mode 2)."""
        await self._set_run_mode(RunMode.RUN, {RunMode.RUN, RunMode.HOLDBACK, RunMode.COMPLETE})

    async def reset_program(self) -> None:
        """Reset the programmer (run mode 1): the loop setpoint takes over again."""
        await self._set_run_mode(RunMode.RESET, {RunMode.RESET})

    async def _set_run_mode(self, mode: RunMode, proof: set[RunMode]) -> None:
        command = f"write run mode {mode.name} (reg {RUN_MODE} = {int(mode)})"
        try:
            await self.modbus.write_register(RUN_MODE, int(mode), command=command)
        except (DeviceTimeout, ProtocolError, NotConnected) as exc:
            # Sent once. Did it happen? The run mode register knows.
            try:
                now = await self.run_mode()
            except DriverError:
                raise exc from None
            if now in proof:
                log.warning("%s: %s: reply lost (%s), run mode now %s: it was done",
                            self.name, command, exc, now.name)
                return
            raise

    # -- waiting --------------------------------------------------------------------------------
    async def wait_for_temperature(
        self, target: float, *, tolerance: float = 2.0, settle_s: float = 1.0,
        timeout: float | None = None, poll_s: float = 0.05,
    ) -> float:
        """Wait (wall seconds) until the PV stays within ``tolerance`` of ``target`` for
        ``settle_s``; raise :class:`FurnaceAlarm` if the instrument stops heating."""
        async with asyncio.timeout(timeout):
            since: float | None = None
            while True:
                status = await self.status()
                if status.fault is not None:
                    raise FurnaceAlarm(self.name, f"wait for {target:g} °C", status)
                pv = await self.temperature()
                now = time.monotonic()
                if abs(pv - target) <= tolerance:
                    since = now if since is None else since
                    if now - since >= settle_s:
                        return pv
                else:
                    since = None
                await asyncio.sleep(poll_s)

    async def wait_program_done(
        self, *, timeout: float | None = None, poll_s: float = 0.05
    ) -> ProgramState:
        """Wait until the program completes (COMPLETE, or RESET after an ``end="reset"``
        program that did start); raise :class:`FurnaceAlarm` on an alarm."""
        async with asyncio.timeout(timeout):
            while True:
                status = await self.status()
                if status.fault is not None:
                    raise FurnaceAlarm(self.name, "wait for program end", status)
                state = await self.program_state()
                if state.mode in (RunMode.COMPLETE, RunMode.RESET):
                    return state
                await asyncio.sleep(poll_s)


def _float_block(
    seg: Ramp | RampTime | Dwell | Step | End, base: int
) -> tuple[int, list[float]]:
    """The float parameters of a segment row at ``base``, as (first address, values): target at
    +1, then at +2 the ramp rate (per minute) or the time in seconds."""
    if isinstance(seg, Ramp):
        return base + 1, [seg.target_c, seg.rate_c_min]
    if isinstance(seg, RampTime):
        return base + 1, [seg.target_c, float(seg.duration_s)]
    if isinstance(seg, Dwell):
        return base + 2, [float(seg.duration_s)]
    if isinstance(seg, Step):
        return base + 1, [seg.target_c]
    return base + 1, []
