"""Eurotherm 3216 / EPC3016 furnace controller simulator (Modbus RTU on a pty, Modbus TCP).

Transports
==========
* **Modbus RTU** on a raw pseudo-terminal, symlink ``<run_dir>/<name>`` (9600 8N1 by default;
  the pty carries no baud rate). Served through :class:`~hardware_sims.serial_link.SerialEndpoint`
  with an RTU frame parser of our own (:mod:`hardware_sims.modbus_rtu`), not through a pymodbus
  RTU server: the faults need byte-level control of what goes back on the line (a frame with a
  bad CRC, half a frame, silence), and an RS-485 slave must stay silent for frames addressed to
  another unit, which pymodbus's server does not do for a ``SimDevice`` (it answers an unknown
  id with an exception). Frames with a bad CRC are dropped silently, as on the instrument.
  Requests to another unit id get no reply at all; unit 0 is broadcast (writes executed, no reply).
* **Modbus TCP** (MBAP framing) on ``tcp_host:tcp_port`` (0 = a free port, reported by
  :meth:`FurnaceSim.endpoint`), served by pymodbus 3.16's ``ModbusTcpServer`` with a
  ``SimDevice`` whose ``action=`` callback reads and writes the same register model as the RTU
  side. The TCP side answers any unit id (the EPC3016's "Unit Identity Type: Loose").

Both transports call :meth:`FurnaceRegisters.read` / :meth:`FurnaceRegisters.write`: one register
model, one physics model.

Function codes
==============
3 read holding registers, 4 read input registers (the same map, as on the 3216), 6 write single
register (reply echoes the request), 16 write multiple registers. Anything else: exception 1.
Exception replies (function | 0x80, code): 1 illegal function; 2 illegal data address (an address
not in the map, a block that runs into one, a read or write that starts in the middle of an IEEE
float); 3 illegal data value (a value out of range — e.g. a setpoint above the setpoint high
limit, ``max_c`` — a bad count, or a write to a read-only parameter: the address exists and can be
read, the value cannot be taken); 4 (or the injected code) with the ``error`` fault.

Registers (16-bit scaled integers)
==================================
Temperatures carry ``config.decimals`` implied decimals (1: 850.0 °C reads 8500), signed 16 bit;
outputs in % and programmer ramp rates carry 1 decimal; modes are plain integers; ``time_t``
values (program/segment times) are integer seconds (the Comms time format in seconds, as
CederGroupHub/alab_control's EPC3016 driver uses them).

====== ==================================== ==== ===============================================
addr   parameter                            acc  notes
====== ==================================== ==== ===============================================
1      PV (Loop.Main.PV)                    RO   chamber temperature + ±0.1 °C noise
2      target SP (Loop.Main.TargetSP)       RW   the active setpoint (SP1/SP2/remote)
3      manual output (Loop.Output.ManualOP) RW   % , used in manual mode (273 = 1)
4      working output                       RO   % , 0 while alarm 1 is latched
5      working SP                           RO   the rate-limited (or programmer) setpoint
6      proportional band                    RW   °C
8, 9   integral / derivative time           RW   seconds (0 turns the term off)
15     SP select                            RW   0 SP1, 1 SP2
22     program number                       RW   only program 1 exists here
23     programmer run mode                  RW   1 reset, 2 run, 4 hold, 8 holdback, 16 complete;
                                                 write 1/2/4 to reset/run/hold (8, 16: exc 3)
24, 25 SP1, SP2                             RW
26     remote SP                            RW   used when 276 = 1
29     running segment type                 RO
35     setpoint rate limit                  RW   °C/min, 0 = off
39     deviation PV - working SP            RO
56     running segment number               RO   0 when reset
58     program time left                    RO   s
63     segment time left                    RO   s
75     instrument status word               RO   see below
111    SP high limit                        RW   <= max_c
112    SP low limit                         RW
160    programmer target SP                 RO
161    programmer segment ramp rate         RO
163    programmer setpoint (PSP)            RO
199    instrument mode                      RW   0 operating, 1 standby, 2 config (outputs off
                                                 unless 0)
273    auto/manual                          RW   0 auto, 1 manual
274    acknowledge all alarms               RW   write 1; reads 0
276    remote/local                         RW   0 local, 1 remote SP
8328+  program 1 header                     RW   8328 holdback type, 8329 holdback value,
                                                 8330 ramp units (0 /s, 1 /min, 2 /h),
                                                 8331 dwell units, 8332 cycles (0 = forever),
                                                 8333 holdback style, 8334 end type (0 dwell,
                                                 1 reset, 2 track), 8335 segments (RO)
8336+  segment n (1..25) at 8336 + 8(n-1)   RW   +0 type (0 end, 1 ramp rate, 2 ramp time,
                                                 3 dwell, 4 step; 5 call: exc 3), +1 target SP,
                                                 +2 ramp rate (1 dp, per ramp unit) or time to
                                                 target / dwell duration (s), +3 call program,
                                                 +4 event outputs, +5 holdback type (0 off,
                                                 1 low, 2 high, 3 band), +6 holdback value
10573  Programmer.Setup.Run                 RW   write 1 = run (reads 1 while running)
10574  Programmer.Setup.Hold                RW   write 1 = hold
10575  Programmer.Setup.Reset               RW   write 1 = reset
====== ==================================== ==== ===============================================

The same float-type parameters (temperatures, outputs, rates, PID terms, segment target / rate /
holdback values) are served as IEEE-754 floats at ``0x8000 + 2 * addr``, two registers, high word
first, read and write (``01 03 80 02 00 02`` reads PV as a float). Integer-only parameters
(modes, status word) are not in the float region (exception 2).

Status word (75), bits as eurothermlib's ``InstrumentStatus`` decodes the 3216's: 0..3 alarms
1..4 (alarm 1 = over-temperature), 5 sensor break, 9 program end, 10 PV out of range (above
``max_c``), 12 new alarm (since the last acknowledge), 13 ramp running (working SP ramping or a
program running).

Physics (virtual clock)
=======================
The working SP moves to the target SP at the rate limit (°C/min; 0 = jump). A PID (Eurotherm
form: output = 100/Pb * (e + 1/Ti ∫e dt - Td dPV/dt), anti-windup) drives the output 0–100 %.
The heater power follows the output with the ``time_constant_s`` lag; the chamber heats at
``max_heating_c_s`` x power and loses heat to ``ambient_c`` (full power settles ~30 % above
``max_c``). That lag makes the PV overshoot: a few °C after a setpoint step, roughly
rate x 1 min at the end of a ramp (about 30 °C after a 30 °C/min ramp; no cutback is
modelled). The PV carries ±0.1 °C uniform noise (``pv_noise_c``). Every update reports the
chamber temperature to the world (``ctx.world.furnace_temperature``), so crucibles in
furnace slots log their heat history.

Alarm 1, over-temperature: PV above ``overtemp_c`` sets bit 0 and latches; the controller cuts the
output to 0 % (an over-temperature trip wired to the heater contactor) while the alarm is active
or latched. Writing 1 to 274 acknowledges: the latch clears once PV is back below the threshold.

Programmer: writing 2 to 23 (or 1 to 10573) runs program 1 from segment 1, starting from the PV
(servo to PV); ramp-rate segments move the programmer SP at the segment rate, ramp-time segments
reach the target in the given time, dwell segments hold, step segments jump, the end segment (or
the 25th) completes the program: run mode 16, status bit 9, the working SP stays at the last
programmer SP (end type 0) or the program resets (end type 1). Hold (4) freezes the programmer
SP and its timers; reset (1) returns control to the loop setpoint (ramping from PV). A segment
holdback (type 1/2/3 with its value) stops the program clock while the PV is outside the band
(run mode 8).

Faults (as seen on the wire)
============================
``no_reply``  the request is executed, its reply swallowed (the master times out).
``late_reply`` the reply comes ``delay_s`` wall-clock seconds late.
``garble``    the reply has corrupted bytes; on RTU its CRC is guaranteed bad.
``truncate``  only the first half of the reply is sent.
``error``     the next request gets exception ``code`` (default 4, slave device failure).
``disconnect`` the pty (symlink removed) and the TCP listener and its connections close; both
              come back (same symlink, same port) after ``duration_s``, or on ``clear_fault``.
``alarm``     forces alarm 1 (over-temperature): bit 0 and 12 set, output off, latched until
              acknowledged (274) — clearing the fault does not acknowledge it.

Control actions (:meth:`FurnaceSim.control`)
============================================
``set_pv {"value": °C, "hold": bool = true}``  put the chamber at ``value``; with ``hold`` the PV
    is pinned there without noise (a thermocouple calibrator in place of the sensor), until
    ``release_pv``. Tests use it to get the manual's literal replies (PV 850.0 -> ``21 34``).
``release_pv {}``  the chamber model takes over again from the pinned value.
``sensor_break {"on": bool}``  open the thermocouple: status bit 5, output 0 %.
``set_ambient {"value": °C}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .base import DeviceConfig, SerialEndpointConfig, SimContext, SimInstrument
from .faults import Fault, FaultKind
from .modbus_rtu import RtuRequestAssembler, crc_ok, with_crc
from .serial_link import ByteDevice, SerialEndpoint

log = logging.getLogger(__name__)


class FurnaceConfig(DeviceConfig):
    #: Modbus RTU on a pseudo-terminal (RS-485 as the 3216 has it).
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    #: Modbus TCP (EPC3016 port 502 in the lab); 0 = a free port.
    tcp_port: int | None = Field(default=0, ge=0, le=65535)
    tcp_host: str = "127.0.0.1"
    unit_id: int = Field(default=1, ge=1, le=247)
    ambient_c: float = 25.0
    max_c: float = Field(default=1200.0, gt=0)
    #: Over-temperature alarm (alarm 1, status bit 0) threshold.
    overtemp_c: float = Field(default=1150.0, gt=0)
    #: First-order lag of the chamber, virtual seconds.
    time_constant_s: float = Field(default=120.0, gt=0)
    #: Heating power at 100 % output, °C per virtual second of rise at ambient.
    max_heating_c_s: float = Field(default=2.0, gt=0)
    #: Decimal places of the scaled-integer registers.
    decimals: int = Field(default=1, ge=0, le=3)
    #: Amplitude of the uniform PV noise, °C.
    pv_noise_c: float = Field(default=0.1, ge=0)
    #: Initial PID terms (registers 6, 8, 9): proportional band °C, integral and derivative s.
    pid_pb_c: float = Field(default=20.0, gt=0)
    pid_ti_s: float = Field(default=200.0, ge=0)
    pid_td_s: float = Field(default=40.0, ge=0)
    #: Physics update period, virtual seconds (integration sub-step).
    step_s: float = Field(default=0.5, gt=0, le=10)


# -- register addresses ------------------------------------------------------------------------
PV, TARGET_SP, MANUAL_OP, WORKING_OP, WORKING_SP = 1, 2, 3, 4, 5
PROP_BAND, INTEGRAL_TIME, DERIVATIVE_TIME = 6, 8, 9
SP_SELECT, PROGRAM_NUMBER, RUN_MODE = 15, 22, 23
SP1, SP2, REMOTE_SP, SEGMENT_TYPE_RUN = 24, 25, 26, 29
SP_RATE, DEVIATION = 35, 39
SEGMENT_NUMBER, PROGRAM_TIME_LEFT, SEGMENT_TIME_LEFT = 56, 58, 63
STATUS_WORD = 75
SP_HIGH, SP_LOW = 111, 112
PROG_TARGET_SP, PROG_RAMP_RATE, PROG_PSP = 160, 161, 163
INSTRUMENT_MODE, AUTO_MAN, ACK_ALL, REMOTE_LOCAL = 199, 273, 274, 276
PROGRAM_HEADER = 8328
SEGMENT_BASE, SEGMENT_STRIDE, MAX_SEGMENTS = 8336, 8, 25
SETUP_RUN, SETUP_HOLD, SETUP_RESET = 10573, 10574, 10575
FLOAT_BASE = 0x8000

# run modes
RESET, RUN, HOLD, HOLDBACK, COMPLETE = 1, 2, 4, 8, 16
# segment types
SEG_END, SEG_RATE, SEG_TIME, SEG_DWELL, SEG_STEP, SEG_CALL = 0, 1, 2, 3, 4, 5
# status word bits
ST_ALARM1, ST_SENSOR_BREAK, ST_PROGRAM_END = 1 << 0, 1 << 5, 1 << 9
ST_PV_RANGE, ST_NEW_ALARM, ST_RAMPING = 1 << 10, 1 << 12, 1 << 13


class _Reject(Exception):
    """A request the instrument refuses with Modbus exception ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _check(cond: bool, code: int = 3) -> None:
    if not cond:
        raise _Reject(code)


def one_of(*allowed: int) -> Callable[[float], None]:
    return lambda v: _check(v in allowed)


def between(lo: float, hi: float) -> Callable[[float], None]:
    return lambda v: _check(lo <= v <= hi)


@dataclass
class Segment:
    type: int = SEG_END
    target: float = 0.0
    #: Ramp rate (per ramp unit) for ramp-rate segments, else seconds.
    value: float = 0.0
    call_program: int = 0
    events: int = 0
    holdback_type: int = 0
    holdback_value: float = 0.0


@dataclass
class Program:
    holdback_type: int = 0
    holdback_value: float = 0.0
    ramp_units: int = 1
    dwell_units: int = 1
    cycles: int = 1
    holdback_style: int = 0
    end_type: int = 0
    segments: list[Segment] = field(default_factory=lambda: [Segment() for _ in range(25)])

    def configured(self) -> int:
        for i, s in enumerate(self.segments):
            if s.type == SEG_END:
                return i + 1
        return MAX_SEGMENTS


class FurnaceModel:
    """Thermal physics, PID loop, alarms and programmer of one controller, on the virtual clock."""

    def __init__(self, config: FurnaceConfig, ctx: SimContext, name: str) -> None:
        self.cfg = config
        self.ctx = ctx
        self.rng = ctx.rng(name)
        self.ambient = config.ambient_c
        self.temp = config.ambient_c  # true chamber temperature
        self.heat = 0.0  # heating power delivered, °C/s
        self.pv = config.ambient_c  # measured
        self.pv_forced: float | None = None
        self.sensor_break = False
        self.sp1 = config.ambient_c
        self.sp2 = config.ambient_c
        self.remote_sp = config.ambient_c
        self.sp_select = 0
        self.remote = 0
        self.sp_high = config.max_c
        self.sp_low = 0.0
        self.rate = 0.0  # °C/min
        self.wsp = config.ambient_c
        self.auto_man = 0
        self.manual_op = 0.0
        self.output = 0.0
        self.inst_mode = 0
        self.pb, self.ti, self.td = config.pid_pb_c, config.pid_ti_s, config.pid_td_s
        self.integral = 0.0
        self.prev_pv = config.ambient_c
        self.alarm1_active = False
        self.alarm1_latched = False
        self.new_alarm = False
        # programmer
        self.program = Program()
        self.run_mode = RESET
        self.segment = 0  # 1-based while running
        self.psp = 0.0
        self.seg_start_sp = 0.0
        self.seg_elapsed = 0.0
        self.cycles_done = 0
        self.last_t = ctx.clock.now()

    # -- setpoints -----------------------------------------------------------------------------
    @property
    def target(self) -> float:
        if self.remote:
            return self.remote_sp
        return self.sp2 if self.sp_select else self.sp1

    def set_target(self, value: float) -> None:
        if self.remote:
            self.remote_sp = value
        elif self.sp_select:
            self.sp2 = value
        else:
            self.sp1 = value

    @property
    def programmer_active(self) -> bool:
        return self.run_mode in (RUN, HOLD, HOLDBACK) or (
            self.run_mode == COMPLETE and self.program.end_type != 1
        )

    @property
    def ramping(self) -> bool:
        return self.run_mode in (RUN, HOLDBACK) or (
            not self.programmer_active and self.rate > 0 and abs(self.wsp - self.target) > 1e-9
        )

    # -- time ----------------------------------------------------------------------------------
    def advance(self) -> None:
        """Integrate the model up to the clock's now, in sub-steps of at most ``step_s``."""
        now = self.ctx.clock.now()
        dt_total = now - self.last_t
        if dt_total <= 0:
            return
        n = max(1, math.ceil(dt_total / self.cfg.step_s))
        dt = dt_total / n
        for _ in range(n):
            self._step(dt)
        self.last_t = now
        self.ctx.world.furnace_temperature(self.pv)

    def _step(self, dt: float) -> None:
        self._programmer(dt)
        self._working_sp(dt)
        self._control(dt)
        # plant: heater power lags the output; chamber gains heat and loses it to ambient
        cfg = self.cfg
        demand = cfg.max_heating_c_s * self.output / 100.0
        self.heat += (demand - self.heat) * min(1.0, dt / cfg.time_constant_s)
        loss = cfg.max_heating_c_s / (1.3 * cfg.max_c - self.ambient)
        self.temp += (self.heat - loss * (self.temp - self.ambient)) * dt
        if self.pv_forced is not None:
            self.temp = self.pv_forced
            self.pv = self.pv_forced
        else:
            self.pv = self.temp + self.rng.uniform(-cfg.pv_noise_c, cfg.pv_noise_c)
        self._alarms()

    def _working_sp(self, dt: float) -> None:
        if self.programmer_active:
            self.wsp = self.psp
            return
        target = self.target
        if self.rate <= 0:
            self.wsp = target
            return
        step = self.rate / 60.0 * dt
        if abs(target - self.wsp) <= step:
            self.wsp = target
        else:
            self.wsp += step if target > self.wsp else -step

    def _control(self, dt: float) -> None:
        pv = self.pv
        d_pv = (pv - self.prev_pv) / dt if dt > 0 else 0.0
        self.prev_pv = pv
        if self.output_inhibited:
            self.output = 0.0
            self.integral = 0.0
            return
        if self.auto_man:
            self.output = self.manual_op
            return
        err = self.wsp - pv
        gain = 100.0 / self.pb
        p = gain * (err - self.td * d_pv)
        i_term = gain * self.integral / self.ti if self.ti > 0 else 0.0
        u = p + i_term
        # conditional integration (anti-windup): integrate unless it drives further into a limit
        if self.ti > 0 and ((0.0 < u < 100.0) or (u >= 100.0 > 0 > err) or (u <= 0.0 < err)):
            self.integral += err * dt
            i_term = gain * self.integral / self.ti
        self.output = min(100.0, max(0.0, p + i_term))

    @property
    def output_inhibited(self) -> bool:
        return self.alarm1_active or self.alarm1_latched or self.sensor_break or self.inst_mode != 0

    def _alarms(self) -> None:
        over = self.pv > self.cfg.overtemp_c
        if over and not self.alarm1_active:
            self.alarm1_latched = True
            self.new_alarm = True
        self.alarm1_active = over

    def force_alarm(self) -> None:
        self.alarm1_latched = True
        self.new_alarm = True
        self.output = 0.0

    def acknowledge(self) -> None:
        self.new_alarm = False
        if not self.alarm1_active:
            self.alarm1_latched = False

    @property
    def status_word(self) -> int:
        word = 0
        if self.alarm1_active or self.alarm1_latched:
            word |= ST_ALARM1
        if self.sensor_break:
            word |= ST_SENSOR_BREAK
        if self.run_mode == COMPLETE:
            word |= ST_PROGRAM_END
        if self.pv > self.cfg.max_c:
            word |= ST_PV_RANGE
        if self.new_alarm:
            word |= ST_NEW_ALARM
        if self.ramping:
            word |= ST_RAMPING
        return word

    # -- programmer ----------------------------------------------------------------------------
    def _seg(self) -> Segment:
        return self.program.segments[self.segment - 1]

    def _rate_per_s(self, seg: Segment) -> float:
        return seg.value / (1.0, 60.0, 3600.0)[self.program.ramp_units]

    def run(self) -> None:
        if self.run_mode in (HOLD, HOLDBACK):
            self.run_mode = RUN
            return
        if self.run_mode == RUN:
            return
        self.cycles_done = 0
        self.psp = self.pv  # servo to PV
        self._enter_segment(1)

    def hold(self) -> None:
        if self.run_mode in (RUN, HOLDBACK):
            self.run_mode = HOLD

    def reset(self) -> None:
        was_program = self.programmer_active
        self.run_mode = RESET
        self.segment = 0
        self.seg_elapsed = 0.0
        if was_program:
            # the loop takes over, ramping from the PV when a rate limit is set
            self.wsp = self.pv if self.rate > 0 else self.target

    def _enter_segment(self, n: int) -> None:
        self.run_mode = RUN
        if n > MAX_SEGMENTS or self.program.segments[n - 1].type == SEG_END:
            self.cycles_done += 1
            if self.program.cycles == 0 or self.cycles_done < self.program.cycles:
                n = 1
                if self.program.segments[0].type == SEG_END:
                    self._complete()
                    return
            else:
                self._complete()
                return
        self.segment = n
        self.seg_start_sp = self.psp
        self.seg_elapsed = 0.0
        if self._seg().type == SEG_STEP:
            self.psp = self._seg().target

    def _complete(self) -> None:
        if self.program.end_type == 1:
            self.reset()
        else:
            self.run_mode = COMPLETE
            self.segment = 0

    def _holdback_ok(self, seg: Segment) -> bool:
        kind, band = seg.holdback_type, seg.holdback_value
        if kind == 0:
            kind, band = self.program.holdback_type, self.program.holdback_value
        dev = self.pv - self.psp
        if kind == 1:
            return dev >= -band
        if kind == 2:
            return dev <= band
        if kind == 3:
            return abs(dev) <= band
        return True

    def _programmer(self, dt: float) -> None:
        if self.run_mode not in (RUN, HOLDBACK):
            return
        seg = self._seg()
        if seg.type in (SEG_RATE, SEG_TIME, SEG_DWELL):
            if not self._holdback_ok(seg):
                self.run_mode = HOLDBACK
                return
            self.run_mode = RUN
        if seg.type == SEG_STEP:
            self._enter_segment(self.segment + 1)
        elif seg.type == SEG_RATE:
            rate = self._rate_per_s(seg)
            delta = seg.target - self.psp
            step = rate * dt
            if rate <= 0 or abs(delta) <= step:
                self.psp = seg.target
                self._enter_segment(self.segment + 1)
            else:
                self.psp += math.copysign(step, delta)
        elif seg.type == SEG_TIME:
            self.seg_elapsed += dt
            if seg.value <= 0 or self.seg_elapsed >= seg.value:
                self.psp = seg.target
                self._enter_segment(self.segment + 1)
            else:
                frac = self.seg_elapsed / seg.value
                self.psp = self.seg_start_sp + (seg.target - self.seg_start_sp) * frac
        elif seg.type == SEG_DWELL:
            self.seg_elapsed += dt
            if self.seg_elapsed >= seg.value:
                self._enter_segment(self.segment + 1)

    def segment_time_left(self) -> float:
        if self.run_mode not in (RUN, HOLD, HOLDBACK) or self.segment == 0:
            return 0.0
        seg = self._seg()
        if seg.type == SEG_RATE:
            rate = self._rate_per_s(seg)
            return abs(seg.target - self.psp) / rate if rate > 0 else 0.0
        if seg.type in (SEG_TIME, SEG_DWELL):
            return max(0.0, seg.value - self.seg_elapsed)
        return 0.0

    def program_time_left(self) -> float:
        if self.run_mode not in (RUN, HOLD, HOLDBACK) or self.segment == 0:
            return 0.0
        left = self.segment_time_left()
        sp = self._seg().target if self._seg().type != SEG_DWELL else self.psp
        for seg in self.program.segments[self.segment :]:
            if seg.type == SEG_END:
                break
            if seg.type == SEG_RATE:
                rate = self._rate_per_s(seg)
                left += abs(seg.target - sp) / rate if rate > 0 else 0.0
                sp = seg.target
            elif seg.type == SEG_TIME:
                left += seg.value
                sp = seg.target
            elif seg.type == SEG_DWELL:
                left += seg.value
            elif seg.type == SEG_STEP:
                sp = seg.target
        return left


# -- parameter table ---------------------------------------------------------------------------
#: How a parameter is coded in the 16-bit region.
TEMP, PCT, RATE1, INT, SECONDS = "temp", "pct", "rate1", "int", "seconds"


@dataclass
class Param:
    name: str
    coding: str
    get: Callable[[], float]
    set: Callable[[float], None] | None = None
    #: Validation of a value to be written (raises _Reject).
    check: Callable[[float], None] | None = None
    #: Also served as an IEEE float at 0x8000 + 2 * addr.
    is_float: bool = True


class FurnaceRegisters:
    """The register map over :class:`FurnaceModel`: both transports read and write through it."""

    def __init__(self, model: FurnaceModel, decimals: int) -> None:
        self.m = model
        self.decimals = decimals
        self.params: dict[int, Param] = {}
        self._build()

    # -- table ---------------------------------------------------------------------------------
    def _build(self) -> None:
        m = self.m
        p = self.params

        def temp_range(v: float) -> None:
            _check(m.sp_low <= v <= m.sp_high)

        def setter(attr: str, obj: object = m) -> Callable[[float], None]:
            return lambda v: setattr(obj, attr, v)

        def int_setter(attr: str, obj: object = m) -> Callable[[float], None]:
            return lambda v: setattr(obj, attr, int(v))

        def set_target(v: float) -> None:
            old_target = m.target
            if m.rate > 0 and abs(m.wsp - old_target) < 1e-9 and not m.programmer_active:
                m.wsp = m.pv  # servo to PV: the ramp starts from the measured value
            m.set_target(v)

        p[PV] = Param("PV", TEMP, lambda: m.pv)
        p[TARGET_SP] = Param("TargetSP", TEMP, lambda: m.target, set_target, temp_range)
        p[MANUAL_OP] = Param(
            "ManualOP", PCT, lambda: m.manual_op, setter("manual_op"), between(0, 100)
        )
        p[WORKING_OP] = Param("WorkingOutput", PCT, lambda: m.output)
        p[WORKING_SP] = Param("WorkingSP", TEMP, lambda: m.wsp)
        p[PROP_BAND] = Param("PropBand", TEMP, lambda: m.pb, setter("pb"), between(0.1, 9999))
        p[INTEGRAL_TIME] = Param("IntegralTime", INT, lambda: m.ti, setter("ti"), between(0, 9999))
        p[DERIVATIVE_TIME] = Param(
            "DerivativeTime", INT, lambda: m.td, setter("td"), between(0, 9999)
        )
        p[SP_SELECT] = Param(
            "SPSelect", INT, lambda: m.sp_select, int_setter("sp_select"), one_of(0, 1), False
        )
        p[PROGRAM_NUMBER] = Param("ProgramNumber", INT, lambda: 1, lambda v: None, one_of(1), False)
        p[RUN_MODE] = Param(
            "RunMode", INT, lambda: m.run_mode, self._set_run_mode, one_of(RESET, RUN, HOLD), False
        )
        p[SP1] = Param("SP1", TEMP, lambda: m.sp1, setter("sp1"), temp_range)
        p[SP2] = Param("SP2", TEMP, lambda: m.sp2, setter("sp2"), temp_range)
        p[REMOTE_SP] = Param("RemoteSP", TEMP, lambda: m.remote_sp, setter("remote_sp"), temp_range)
        p[SEGMENT_TYPE_RUN] = Param(
            "SegmentType", INT, lambda: m._seg().type if m.segment else 0, is_float=False
        )
        p[SP_RATE] = Param("SPRateUp", TEMP, lambda: m.rate, setter("rate"), between(0, 9999))
        p[DEVIATION] = Param("Deviation", TEMP, lambda: m.pv - m.wsp)
        p[SEGMENT_NUMBER] = Param("SegmentNumber", INT, lambda: m.segment, is_float=False)
        p[PROGRAM_TIME_LEFT] = Param(
            "ProgramTimeLeft", SECONDS, m.program_time_left, is_float=False
        )
        p[SEGMENT_TIME_LEFT] = Param(
            "SegmentTimeLeft", SECONDS, m.segment_time_left, is_float=False
        )
        p[STATUS_WORD] = Param("InstStatusWord", INT, lambda: m.status_word, is_float=False)
        p[SP_HIGH] = Param(
            "SPHighLimit",
            TEMP,
            lambda: m.sp_high,
            setter("sp_high"),
            lambda v: _check(m.sp_low <= v <= m.cfg.max_c),
        )
        p[SP_LOW] = Param(
            "SPLowLimit", TEMP, lambda: m.sp_low, setter("sp_low"), lambda v: _check(v <= m.sp_high)
        )
        p[PROG_TARGET_SP] = Param(
            "Programmer.TargetSP", TEMP, lambda: m._seg().target if m.segment else 0.0
        )
        p[PROG_RAMP_RATE] = Param(
            "Programmer.RampRate",
            RATE1,
            lambda: m._seg().value if m.segment and m._seg().type == SEG_RATE else 0.0,
        )
        p[PROG_PSP] = Param("Programmer.PSP", TEMP, lambda: m.psp)
        p[INSTRUMENT_MODE] = Param(
            "InstrumentMode",
            INT,
            lambda: m.inst_mode,
            int_setter("inst_mode"),
            one_of(0, 1, 2),
            False,
        )
        p[AUTO_MAN] = Param(
            "AutoMan", INT, lambda: m.auto_man, self._set_auto_man, one_of(0, 1), False
        )
        p[ACK_ALL] = Param("GlobalAck", INT, lambda: 0, self._ack, one_of(0, 1), False)
        p[REMOTE_LOCAL] = Param(
            "RemoteLoc", INT, lambda: m.remote, int_setter("remote"), one_of(0, 1), False
        )
        prog = m.program
        hdr = PROGRAM_HEADER
        p[hdr] = Param(
            "Program.1.HoldbackType",
            INT,
            lambda: prog.holdback_type,
            int_setter("holdback_type", prog),
            one_of(0, 1, 2, 3),
            False,
        )
        p[hdr + 1] = Param(
            "Program.1.HoldbackValue",
            TEMP,
            lambda: prog.holdback_value,
            setter("holdback_value", prog),
            between(0, 9999),
        )
        p[hdr + 2] = Param(
            "Program.1.RampUnits",
            INT,
            lambda: prog.ramp_units,
            int_setter("ramp_units", prog),
            one_of(0, 1, 2),
            False,
        )
        p[hdr + 3] = Param(
            "Program.1.DwellUnits",
            INT,
            lambda: prog.dwell_units,
            int_setter("dwell_units", prog),
            one_of(0, 1, 2),
            False,
        )
        p[hdr + 4] = Param(
            "Program.1.ProgramCycles",
            INT,
            lambda: prog.cycles,
            int_setter("cycles", prog),
            between(0, 999),
            False,
        )
        p[hdr + 5] = Param(
            "Program.1.HoldbackStyle",
            INT,
            lambda: prog.holdback_style,
            int_setter("holdback_style", prog),
            one_of(0, 1),
            False,
        )
        p[hdr + 6] = Param(
            "Program.1.ProgramEndType",
            INT,
            lambda: prog.end_type,
            int_setter("end_type", prog),
            one_of(0, 1, 2),
            False,
        )
        p[hdr + 7] = Param("Program.1.NumConfSegments", INT, prog.configured, is_float=False)
        for n in range(1, MAX_SEGMENTS + 1):
            self._segment_params(n, prog.segments[n - 1], temp_range)
        p[SETUP_RUN] = Param(
            "Programmer.Setup.Run",
            INT,
            lambda: int(m.run_mode == RUN),
            lambda v: m.run() if v else None,
            one_of(0, 1),
            False,
        )
        p[SETUP_HOLD] = Param(
            "Programmer.Setup.Hold",
            INT,
            lambda: int(m.run_mode == HOLD),
            lambda v: m.hold() if v else None,
            one_of(0, 1),
            False,
        )
        p[SETUP_RESET] = Param(
            "Programmer.Setup.Reset",
            INT,
            lambda: int(m.run_mode == RESET),
            lambda v: m.reset() if v else None,
            one_of(0, 1),
            False,
        )

    def _segment_params(self, n: int, seg: Segment, temp_range: Callable[[float], None]) -> None:
        base = SEGMENT_BASE + SEGMENT_STRIDE * (n - 1)
        p = self.params

        def set_attr(attr: str, cast: Callable[[float], Any] = float) -> Callable[[float], None]:
            return lambda v: setattr(seg, attr, cast(v))

        def check_type(v: float) -> None:
            _check(v in (SEG_END, SEG_RATE, SEG_TIME, SEG_DWELL, SEG_STEP))
            # the running segment cannot be changed under the programmer
            _check(not (self.m.segment == n and self.m.run_mode in (RUN, HOLD, HOLDBACK)))

        p[base] = Param(
            f"Segment.{n}.SegmentType",
            INT,
            lambda: seg.type,
            set_attr("type", int),
            check_type,
            False,
        )
        p[base + 1] = Param(
            f"Segment.{n}.TargetSetpoint",
            TEMP,
            lambda: seg.target,
            set_attr("target"),
            temp_range,
        )
        # +2 is the ramp rate (1 dp) of a ramp-rate segment, else a time in seconds
        p[base + 2] = Param(
            f"Segment.{n}.RampRate|TimeToTarget|Duration",
            "segvalue",
            lambda: seg.value,
            set_attr("value"),
            lambda v: _check(0 <= v <= 1e7),
        )
        p[base + 3] = Param(
            f"Segment.{n}.CallProgram",
            INT,
            lambda: seg.call_program,
            set_attr("call_program", int),
            between(0, 1),
            False,
        )
        p[base + 4] = Param(
            f"Segment.{n}.EventOutput",
            INT,
            lambda: seg.events,
            set_attr("events", int),
            between(0, 255),
            False,
        )
        p[base + 5] = Param(
            f"Segment.{n}.HoldbackType",
            INT,
            lambda: seg.holdback_type,
            set_attr("holdback_type", int),
            one_of(0, 1, 2, 3),
            False,
        )
        p[base + 6] = Param(
            f"Segment.{n}.HoldbackValue",
            TEMP,
            lambda: seg.holdback_value,
            set_attr("holdback_value"),
            between(0, 9999),
        )

    def _set_run_mode(self, v: float) -> None:
        {RESET: self.m.reset, RUN: self.m.run, HOLD: self.m.hold}[int(v)]()

    def _set_auto_man(self, v: float) -> None:
        m = self.m
        if int(v) and not m.auto_man:
            m.manual_op = m.output  # bumpless transfer to manual
        m.auto_man = int(v)

    def _ack(self, v: float) -> None:
        if int(v) == 1:
            self.m.acknowledge()

    # -- coding --------------------------------------------------------------------------------
    def _scale(self, param: Param, addr: int) -> int:
        if param.coding == TEMP:
            return self.decimals
        if param.coding in (PCT, RATE1):
            return 1
        if param.coding == "segvalue":
            seg = self.m.program.segments[(addr - SEGMENT_BASE) // SEGMENT_STRIDE]
            return 1 if seg.type == SEG_RATE else 0
        return 0

    def _encode_int(self, param: Param, addr: int) -> int:
        value = param.get()
        scaled = round(value * 10 ** self._scale(param, addr))
        if param.coding == SECONDS or (param.coding == "segvalue" and scaled >= 0):
            return max(0, min(0xFFFF, scaled))
        scaled = max(-0x8000, min(0x7FFF, scaled))
        return scaled & 0xFFFF

    def _decode_int(self, param: Param, addr: int, raw: int) -> float:
        if param.coding == "segvalue":
            return raw / 10 ** self._scale(param, addr)
        signed = raw - 0x10000 if raw & 0x8000 else raw
        if param.coding == INT:
            return float(raw) if raw <= 0x7FFF else float(signed)
        return signed / 10 ** self._scale(param, addr)

    # -- access --------------------------------------------------------------------------------
    def addresses(self) -> list[tuple[int, int]]:
        """(address, register count) of every mapped location, both regions."""
        out = [(a, 1) for a in self.params]
        out += [(FLOAT_BASE + 2 * a, 2) for a, prm in self.params.items() if prm.is_float]
        return sorted(out)

    def _locate(self, addr: int, count: int) -> list[tuple[int, Param, bool]]:
        """The parameters covering ``count`` registers at ``addr``: (param addr, param, float)."""
        out: list[tuple[int, Param, bool]] = []
        if addr >= FLOAT_BASE:
            off = addr - FLOAT_BASE
            _check(off % 2 == 0 and count % 2 == 0, 2)
            for i in range(count // 2):
                pa = off // 2 + i
                prm = self.params.get(pa)
                _check(prm is not None and prm.is_float, 2)
                assert prm is not None
                out.append((pa, prm, True))
            return out
        for i in range(count):
            prm = self.params.get(addr + i)
            _check(prm is not None, 2)
            assert prm is not None
            out.append((addr + i, prm, False))
        return out

    def read(self, addr: int, count: int) -> list[int] | int:
        """Registers at ``addr``, or a Modbus exception code."""
        if not 1 <= count <= 125 or addr + count > 0x10000:
            return 3
        try:
            located = self._locate(addr, count)
        except _Reject as exc:
            return exc.code
        self.m.advance()
        regs: list[int] = []
        for pa, prm, as_float in located:
            if as_float:
                hi, lo = struct.unpack(">HH", struct.pack(">f", float(prm.get())))
                regs += [hi, lo]
            else:
                regs.append(self._encode_int(prm, pa))
        return regs

    def write(self, addr: int, values: list[int]) -> int | None:
        """Write ``values`` at ``addr``; None, or a Modbus exception code (nothing written)."""
        count = len(values)
        if not 1 <= count <= 123:
            return 3
        try:
            located = self._locate(addr, count)
            self.m.advance()
            decoded: list[tuple[Param, float]] = []
            for i, (pa, prm, as_float) in enumerate(located):
                if as_float:
                    raw = struct.pack(">HH", values[2 * i], values[2 * i + 1])
                    value = struct.unpack(">f", raw)[0]
                    _check(math.isfinite(value))
                else:
                    value = self._decode_int(prm, pa, values[i])
                _check(prm.set is not None)  # read-only: the value cannot be taken
                if prm.check is not None:
                    prm.check(value)
                decoded.append((prm, value))
        except _Reject as exc:
            return exc.code
        for prm, value in decoded:
            assert prm.set is not None
            prm.set(value)
        return None


# -- transports --------------------------------------------------------------------------------
class _RtuDevice(ByteDevice):
    """The RS-485 side: assemble RTU frames from the pty, answer the ones for our unit."""

    def __init__(self, sim: FurnaceSim) -> None:
        self.sim = sim
        self.assembler = RtuRequestAssembler(self._on_frame, sim.config.serial.baudrate)

    async def on_bytes(self, data: bytes) -> None:
        await self.assembler.feed(data)

    def on_connect(self) -> None:
        self.assembler.reset()

    async def _on_frame(self, frame: bytes) -> None:
        if not crc_ok(frame):
            log.debug("%s: frame with bad CRC dropped: %s", self.sim.name, frame.hex(" "))
            return
        unit, fc, data = frame[0], frame[1], frame[2:-2]
        if unit not in (0, self.sim.config.unit_id):
            return  # another slave on the bus: stay silent
        reply_pdu = self.sim.handle_pdu(fc, data)
        if unit == 0:
            return  # broadcast: executed, never answered
        await self.sim.send_rtu(with_crc(bytes([unit]) + reply_pdu))


class _FurnaceTcpServer(ModbusTcpServer):
    """pymodbus's TCP server, with a per-connection packet hook that applies reply faults."""

    def __init__(self, sim: FurnaceSim, device: SimDevice, address: tuple[str, int]) -> None:
        super().__init__(device, address=address)
        self._sim = sim

    def callback_new_connection(self):  # type: ignore[no-untyped-def]
        handler = super().callback_new_connection()
        handler.trace_packet = functools.partial(self._sim._tcp_packet, handler)
        return handler


def _exception_pdu(fc: int, code: int) -> bytes:
    return bytes([(fc | 0x80) & 0xFF, code & 0xFF])


class FurnaceSim(SimInstrument):
    """Eurotherm 3216 / EPC3016 on Modbus RTU (pty) and Modbus TCP; see the module docstring."""

    kind: ClassVar[str] = "furnace"
    config: FurnaceConfig

    def __init__(self, name: str, config: FurnaceConfig, ctx: SimContext) -> None:
        super().__init__(name, config, ctx)
        self.model = FurnaceModel(config, ctx, name)
        self.registers = FurnaceRegisters(self.model, config.decimals)
        self._rtu = _RtuDevice(self)
        self._endpoint = SerialEndpoint(name, config.serial, ctx.run_dir, self.faults, self._rtu)
        self._simdevice = SimDevice(
            id=0,  # any unit id on TCP ("Loose" unit identity)
            simdata=[
                SimData(address=a, values=[0] * n, datatype=DataType.REGISTERS)
                for a, n in self.registers.addresses()
            ],
            action=self._action,
        )
        self._tcp: _FurnaceTcpServer | None = None
        self._tcp_port: int | None = None
        self._tcp_reconnect: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.faults.on_event(self._on_fault)
        self.requests = 0

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.model.last_t = self.ctx.clock.now()
        await self._endpoint.start()
        if self.config.tcp_port is not None:
            await self._open_tcp()
        self._loop_task = asyncio.create_task(self._physics_loop(), name=f"{self.name}-physics")
        await self.apply_initial_faults()

    async def stop(self) -> None:
        if self._tcp_reconnect:
            self._tcp_reconnect.cancel()
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self._close_tcp()
        await self._endpoint.stop()
        self._rtu.assembler.reset()

    async def _open_tcp(self) -> None:
        port = self._tcp_port if self._tcp_port is not None else self.config.tcp_port or 0
        server = _FurnaceTcpServer(self, self._simdevice, (self.config.tcp_host, port))
        await server.serve_forever(background=True)
        sockets = server.transport.sockets  # type: ignore[union-attr]
        self._tcp_port = int(sockets[0].getsockname()[1])
        self._tcp = server

    async def _close_tcp(self) -> None:
        if self._tcp is not None:
            await self._tcp.shutdown()
            self._tcp = None

    async def _physics_loop(self) -> None:
        while True:
            self.model.advance()
            # ~20 updates per wall second, never coarser than 5 virtual seconds
            await asyncio.sleep(min(0.05, self.ctx.clock.to_wall(5.0)))

    def endpoint(self) -> dict[str, Any]:
        ep: dict[str, Any] = dict(self._endpoint.endpoint())
        ep["protocol"] = "modbus-rtu"
        ep["unit_id"] = self.config.unit_id
        if self._tcp_port is not None:
            ep["modbus_tcp"] = f"{self.config.tcp_host}:{self._tcp_port}"
            ep["tcp_host"] = self.config.tcp_host
            ep["tcp_port"] = self._tcp_port
        return ep

    def state(self) -> dict[str, Any]:
        m = self.model
        m.advance()
        return {
            "pv": m.pv,
            "chamber_c": m.temp,
            "target_sp": m.target,
            "working_sp": m.wsp,
            "sp1": m.sp1,
            "sp2": m.sp2,
            "remote_sp": m.remote_sp,
            "output": m.output,
            "heater_on": m.output > 0,
            "rate_c_min": m.rate,
            "auto_manual": "manual" if m.auto_man else "auto",
            "instrument_mode": m.inst_mode,
            "status_word": m.status_word,
            "alarms": {
                "overtemp_active": m.alarm1_active,
                "overtemp_latched": m.alarm1_latched,
                "new_alarm": m.new_alarm,
                "sensor_break": m.sensor_break,
            },
            "run_mode": m.run_mode,
            "program": {
                "state": {
                    RESET: "reset",
                    RUN: "run",
                    HOLD: "hold",
                    HOLDBACK: "holdback",
                    COMPLETE: "complete",
                }[m.run_mode],
                "segment": m.segment,
                "psp": m.psp,
                "time_left_s": m.program_time_left(),
            },
            "pv_forced": m.pv_forced is not None,
            "connected": self._endpoint.connected,
            "requests": self.requests,
            "virtual_time_s": self.ctx.clock.now(),
            "faults": self.faults.state(),
        }

    # -- control -------------------------------------------------------------------------------
    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        m = self.model
        m.advance()
        if action == "set_pv":
            value = float(args["value"])
            m.temp = m.pv = m.prev_pv = value
            m.heat = m.cfg.max_heating_c_s / (1.3 * m.cfg.max_c - m.ambient) * (value - m.ambient)
            m.pv_forced = value if args.get("hold", True) else None
        elif action == "release_pv":
            m.pv_forced = None
        elif action == "sensor_break":
            m.sensor_break = bool(args.get("on", True))
        elif action == "set_ambient":
            m.ambient = float(args["value"])
        else:
            raise ValueError(f"{self.name}: unknown action {action!r}")
        return self.state()

    async def set_fault(self, fault: Fault) -> None:
        if fault.kind is FaultKind.ERROR and fault.code is not None and not 1 <= fault.code <= 255:
            raise ValueError(f"Modbus exception code must be 1..255, got {fault.code}")
        await super().set_fault(fault)

    async def clear_fault(self, kind: FaultKind | None = None) -> None:
        await super().clear_fault(kind)
        if kind in (None, FaultKind.DISCONNECT):
            await self._endpoint.reconnect()
            if self._tcp_reconnect:
                self._tcp_reconnect.cancel()
            if self._tcp is None and self.config.tcp_port is not None:
                await self._open_tcp()

    async def _on_fault(self, fault: Fault) -> None:
        if fault.kind is FaultKind.ALARM:
            self.model.advance()
            self.model.force_alarm()
        elif fault.kind is FaultKind.DISCONNECT and self.config.tcp_port is not None:
            self._rtu.assembler.reset()
            await self._close_tcp()
            if fault.duration_s > 0:
                self._tcp_reconnect = asyncio.create_task(self._tcp_back(fault.duration_s))

    async def _tcp_back(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._tcp is None:
            await self._open_tcp()

    # -- request handling ----------------------------------------------------------------------
    def _error_fault(self) -> int | None:
        fault = self.faults.take(FaultKind.ERROR)
        if fault is None:
            return None
        return fault.code if fault.code is not None else int(ExcCodes.DEVICE_FAILURE)

    def handle_pdu(self, fc: int, data: bytes) -> bytes:
        """Execute one request PDU (RTU side); return the reply PDU (function code first)."""
        self.requests += 1
        if fc not in (3, 4, 6, 16):
            return _exception_pdu(fc, 1)
        if (code := self._error_fault()) is not None:
            return _exception_pdu(fc, code)
        if fc in (3, 4):
            if len(data) != 4:
                return _exception_pdu(fc, 3)
            addr, count = struct.unpack(">HH", data)
            regs = self.registers.read(addr, count)
            if isinstance(regs, int):
                return _exception_pdu(fc, regs)
            return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *regs)
        if fc == 6:
            if len(data) != 4:
                return _exception_pdu(fc, 3)
            addr, value = struct.unpack(">HH", data)
            rc = self.registers.write(addr, [value])
            if rc is not None:
                return _exception_pdu(fc, rc)
            return bytes([fc]) + data  # echo of the request
        # fc 16
        if len(data) < 5:
            return _exception_pdu(fc, 3)
        addr, count, nbytes = struct.unpack(">HHB", data[:5])
        if nbytes != 2 * count or len(data) != 5 + nbytes:
            return _exception_pdu(fc, 3)
        values = list(struct.unpack(f">{count}H", data[5:]))
        rc = self.registers.write(addr, values)
        if rc is not None:
            return _exception_pdu(fc, rc)
        return bytes([fc]) + data[:4]

    async def send_rtu(self, frame: bytes) -> None:
        """Send a reply frame on the pty, applying the reply faults at byte level."""
        fault = self.faults.take_reply_fault()
        if fault is not None:
            if fault.kind is FaultKind.NO_REPLY:
                return
            if fault.kind is FaultKind.LATE_REPLY:
                await asyncio.sleep(fault.delay_s)
            elif fault.kind is FaultKind.GARBLE:
                garbled = bytearray(self.faults.garble(frame))
                if crc_ok(bytes(garbled)):
                    garbled[-1] ^= 0x5A  # a garbled reply must fail the master's CRC check
                frame = bytes(garbled)
            elif fault.kind is FaultKind.TRUNCATE:
                frame = self.faults.truncate(frame)
        self._endpoint.write(frame, reply=False)

    async def _action(
        self,
        fc: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus SimDevice action (TCP side): the same register model as the RTU side."""
        if fc not in (3, 4, 6, 16):
            return ExcCodes.ILLEGAL_FUNCTION
        # fc 6 calls the action twice (write, then the read-back for the echo): count one request
        if set_values is not None or fc in (3, 4):
            self.requests += 1
            if (code := self._error_fault()) is not None:
                return _exc(code)
        if set_values is not None:
            rc = self.registers.write(address, [int(v) for v in set_values])
            return None if rc is None else _exc(rc)
        regs = self.registers.read(address, count)
        if isinstance(regs, int):
            return _exc(regs)
        off = address - start
        registers[off : off + count] = regs
        return None

    def _tcp_packet(self, handler: Any, sending: bool, data: bytes) -> bytes:
        """Per-connection packet hook of the TCP server: reply faults on MBAP frames."""
        if not sending:
            return data
        fault = self.faults.take_reply_fault()
        if fault is None:
            return data
        if fault.kind is FaultKind.NO_REPLY:
            return b""
        if fault.kind is FaultKind.LATE_REPLY:
            loop = asyncio.get_running_loop()
            loop.call_later(fault.delay_s, self._late_tcp_send, handler, data)
            return b""
        if fault.kind is FaultKind.GARBLE:
            return self.faults.garble(data)
        return self.faults.truncate(data)

    @staticmethod
    def _late_tcp_send(handler: Any, data: bytes) -> None:
        if handler.transport is not None:
            handler.send(data)


def _exc(code: int) -> ExcCodes:
    try:
        return ExcCodes(code)
    except ValueError:
        # not a standard code: pymodbus still frames it (the action's result is only truth-tested)
        return code  # type: ignore[return-value]
