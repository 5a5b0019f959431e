"""Keithley 2400 SourceMeter simulator (SCPI over RS-232), as a 4-point resistivity probe.

The probe head sits over the crucible at world location ``config.location`` (the
characterisation station): four spring-loaded tips, the outer pair forcing current, the inner
pair sensing voltage. The 2400 drives them; labd talks to the 2400 over its RS-232 port, served
here on a raw pseudo-terminal (and optionally TCP) by :class:`~.serial_link.SerialEndpoint`.

Sources for the wire behaviour: Keithley *Series 2400 SourceMeter User's Manual*
(2400S-900-01), sections 14 (remote operations, RS-232), 17 (signal-oriented commands), 18
(SCPI reference) and appendix B (status and error messages); pymeasure's
``instruments/keithley/keithley2400.py`` and its tests.

Framing
-------
* 9600 8N1 (the manual's factory setting; the pty ignores the rate).
* Input: a program message ends with CR or LF (either; an empty line between a CR LF pair is
  ignored). ``^C`` (0x03) or ``^X`` (0x18) discards a partly received message, as the manual says
  of RS-232 breaks.
* Output: every response message ends with the configured RS-232 terminator
  (``config.terminator``: ``CR``, ``CRLF``, ``LF`` or ``LFCR``, the four the 2400's
  COMMUNICATION menu offers). Default ``CR``: section 14 says incoming commands are processed
  after the <CR> is received; the factory value is not stated in the pages consulted, so set
  it to whatever the real instrument's menu shows.
* Several message units in one line are separated by ``;``. A unit without a leading colon
  continues the path of the previous one (``:SOUR:FUNC CURR;CURR 0.001`` sets
  ``:SOUR:CURR``); ``*`` commands do not change the path. The replies of all queries in one line
  come back in one response, joined by ``;`` (IEEE 488.2), e.g. ``*OPC?;:OUTP?`` -> ``1;0``.
* Headers are case-insensitive, accept the short or the long form of each mnemonic
  (``:SYSTem:RSENse ON`` = ``:syst:rsen 1``), an optional leading colon, the optional nodes of
  the manual (``[:SENSe[1]]``, ``[:STATe]``, ``[:LEVel][:IMMediate][:AMPLitude]``, ``[:DC]``,
  ``[:ON]``, ``[:NEXT]``) and the numeric suffix ``1`` where the manual has one
  (``OUTPut1``, ``SOURce1``, ``SENSe1``).
* Numbers are sent as ``%+.6E`` (``+1.000000E-03``); booleans as ``1``/``0``.

Commands served
---------------
::

    *IDN?                                   KEITHLEY INSTRUMENTS INC.,MODEL 2400,<sn>,<fw>
    *RST / :SYST:PRES                       defaults below; error queue untouched
    *CLS                                    clears the error queue and the event status register
    *OPC? / *OPC / *WAI                     1 / sets ESR bit 0 / nothing to wait for
    *ESR?                                   event status register (read clears it)
    *ESE <n> *ESE? *SRE <n> *SRE?           enable registers
    *STB?                                   status byte: 4 EAV (error queued), 32 ESB, 64 MSS
    *TST?                                   0
    :SYST:ERR[:NEXT]?                       oldest error, 0,"No error" when empty
    :SYST:ERR:ALL? / :SYST:ERR:COUN?        all errors (queue emptied) / how many
    :SYST:RSEN 1|0|ON|OFF :SYST:RSEN?       4-wire remote sense on/off (*RST: off)
    :SYST:TIME:RES                          timestamp back to zero
    :SOUR:FUNC[:MODE] CURR|VOLT (and ?)     source function (*RST: VOLT)
    :SOUR:CURR[:LEV] <A> (and ?)            current level, -1.05 A..+1.05 A, MIN/MAX/DEF
    :SOUR:VOLT[:LEV] <V> (and ?)            voltage level, -210 V..+210 V, MIN/MAX/DEF
    :SOUR:CLE:AUTO 1|0 (and ?)              auto output-off (*RST: off)
    :SOUR:CLE                               output off
    :SENS:FUNC[:ON] "<f>"[,"<f>"...] (?)    sense functions on: "VOLT[:DC]",
                                            "CURR[:DC]", "RES" (*RST: "CURR:DC")
    :SENS:FUNC:OFF "<f>", :SENS:FUNC:ALL, :SENS:FUNC:OFF:ALL, :SENS:FUNC:CONC 1|0
    :SENS:RES:MODE MAN|AUTO (and ?)         ohms mode (*RST: AUTO, Table 18-6)
    :SENS:VOLT:PROT <V> (and ?)             voltage compliance, 0.2 V..210 V (*RST: 21 V)
    :SENS:CURR:PROT <A> (and ?)             current compliance, 1 nA..1.05 A
                                            (*RST: 105 µA)
    :OUTP[:STAT] ON|OFF|1|0 :OUTP?          output (*RST: off)
    :ROUT:TERM FRON|REAR (and ?)            terminals (status word bit 2)
    :FORM:ELEM VOLT,CURR,RES,TIME,STAT (?)
                                            elements of a reading, always sent in that order
    :READ?                                  measure once, return the reading
    :INIT / :FETC?                          measure once / return the last reading
    :MEAS[:VOLT|:CURR|:RES]?                :CONF:<f> (that sense function only, output
                                            on), then :READ?
    :CONF[:VOLT|:CURR|:RES] (:CONF?)        as the manual's one-shot configure

A reading is the selected elements, comma-separated, each ``%+.6E``:
``<volts>,<amps>,<ohms>,<seconds>,<status word>``, e.g.
``+1.023512E-03,+1.000000E-03,+1.023512E+00,+1.234500E+01,+4.608400E+04``.
As the manual's data-element section says, voltage is the measured value if voltage (or
resistance) is measured, else the programmed source value if voltage is sourced, else
``+9.910000E+37`` (NAN); current likewise; resistance is ``+9.910000E+37`` unless ``"RES"`` is a
sense function. The timestamp counts virtual seconds since power-on (or ``:SYST:TIME:RES``) and
wraps at 99,999.999 s. Status word bits served: 0 OFLO (auto-ohms reading above the 210 MΩ top
range, resistance sent as ``+9.900000E+37``), 2 front terminals, 3 real compliance, 10 auto ohms,
11 V-meas, 12 I-meas, 13 Ω-meas, 14 V-source, 15 I-source, 22 remote sense.

Measuring
---------
Source I (manual ohms): ``V = I * R_load``, limited to the voltage compliance; in compliance the
current that actually flows is ``V_compliance / R_load`` and status bit 3 is set. Source V:
``I = V / R_load``, limited to the current compliance likewise. Manual ohms is the V/I of the
measured values (section 4). Auto ohms (``:SENS:RES:MODE AUTO`` with ``"RES"`` on) sources
current itself, the level of the auto-selected ohms range: 100 mA (20 Ω), 10 mA (200 Ω),
1 mA (2 kΩ), 100 µA (20 kΩ), 10 µA (200 kΩ), 1 µA (2 MΩ, 20 MΩ), 100 nA (200 MΩ).

``R_load`` is the sample's four-point resistance, plus ``config.lead_resistance_ohm`` (leads and
tip contacts) in 2-wire mode: 4-wire sensing (``:SYST:RSEN 1``) removes it, which is why a
4-point probe must select it. No crucible at the location, or an empty one, is an open circuit
(the probe head's insulation, 1 TΩ): in source-I the voltage sits at compliance.

Sample model (documented, not measured data): the dosed powders' atomic fractions ``x_i`` give
an alloy resistivity by a Nordheim-type rule,
``rho = sum_i x_i rho_i + K * (1 - sum_i x_i^2)`` µΩ·cm, with ``rho_i`` the room-temperature
resistivities of the pure elements (:data:`ELEMENT_RESISTIVITY_UOHM_CM`; 50 µΩ·cm for an
element not listed) and ``K = config.nordheim_uohm_cm`` the disorder term (``1 - sum x^2``
generalises Nordheim's ``x(1-x)`` to many components: 0.5 for an equimolar binary, 0.8 for an
equimolar quinary). The sample is a powder compact: its effective resistivity is
``rho * F``, where ``F = config.compact_factor ** (1 - min(1, T_anneal / config.sinter_full_c))``
(loose powder ``F = compact_factor``; a compact annealed at ``sinter_full_c`` or above is dense,
``F = 1``). A collinear equal-spacing probe on a sheet thinner than its tip spacing reads
``V/I = (rho_eff / t) * ln 2 / pi`` with ``t = config.thickness_mm``. Each reading has relative
Gaussian noise ``config.noise``. ``control("set_sample_resistance", {"ohms": R})`` replaces the
model by ``R`` (``None`` returns to it).

Error replies
-------------
A command that fails sends nothing back (a failing query sends no reply, so the host times out,
as on the real instrument) and queues an error for ``:SYST:ERR?``, oldest first, reply
``<code>,"<message>"``:

* ``-101,"Invalid character"`` a byte outside printable ASCII in the message
* ``-102,"Syntax error"`` e.g. an unterminated string, a header with stray characters
* ``-104,"Data type error"`` a number expected and something else sent, or an unquoted function
* ``-108,"Parameter not allowed"`` / ``-109,"Missing parameter"``
* ``-113,"Undefined header"`` a header the 2400 does not know (or a query form it has not)
* ``-222,"Parameter data out of range"`` e.g. ``:SOUR:CURR 2`` (beyond 1.05 A), ``:SOUR:VOLT 300``
* ``-224,"Illegal parameter value"`` e.g. ``:SOUR:FUNC RES``, ``:SENS:FUNC "TEMP"``
* ``-230,"Data corrupt or stale"`` ``:FETC?`` before any reading
* ``-350,"Queue overflow"`` the queue holds 10 errors; an 11th replaces the 10th by -350 and
  later ones are lost until the queue is read
* ``-363,"Input buffer overrun"`` a line longer than 1024 bytes
* ``803,"Not permitted with OUTPUT off"`` ``:READ?`` or ``:INIT`` with the output off and auto
  output-off disabled (the ``*RST`` state): section 17 says the output must then be on before a
  :READ?, and appendix B lists +803 for it. With ``:SOUR:CLE:AUTO ON`` the output turns on for
  the measurement and off after it; ``:MEAS?`` turns it on (and leaves it on unless auto
  output-off is enabled).

A command error (-1xx) also discards the rest of the line; an execution error (-2xx, +8xx) does
not. Errors set event status register bits: -1xx bit 5 (32, CME), -2xx and +8xx bit 4 (16,
EXE), -3xx bit 3 (8, DDE), -4xx bit 2 (4, QYE).

Faults
------
* ``no_reply``: the response is swallowed (the command itself executes).
* ``late_reply``: the response arrives ``delay_s`` wall-clock seconds late.
* ``garble``: bits flipped in a few bytes of the response (length kept; the terminator may be
  hit too).
* ``truncate``: only the first half of the response arrives, without its terminator.
* ``error`` (``code``): the instrument queues ``code`` (``count`` times, default once) as if a
  command had failed, with the manual's message for a known code; ``:SYST:ERR?`` returns it and
  ``*ESR?``/``*STB?`` show it. The fault is spent at once.
* ``disconnect`` (``duration_s``): the pty disappears (symlink removed), comes back after
  ``duration_s`` (``0``: until ``clear_fault``); settings survive, a half-received line is lost.

``state()`` returns the output, source, sense, compliance, 4-wire flag, error queue, last reading,
the sample under the probe, the link and the active faults (see :meth:`ProbeSim.state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field

from .base import DeviceConfig, SerialEndpointConfig, SimContext, SimInstrument
from .faults import Fault, FaultKind
from .serial_link import ByteDevice, SerialEndpoint

log = logging.getLogger(__name__)

Terminator = Literal["CR", "LF", "CRLF", "LFCR"]
TERMINATOR_BYTES: dict[str, bytes] = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n", "LFCR": b"\n\r"}


class ProbeConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    serial_number: str = "1278437"
    firmware: str = "C30   Mar 17 2006 09:29:29/A02  /K/J"
    #: World location whose crucible the probe touches.
    location: str = "station"
    #: Relative noise of a resistance reading.
    noise: float = Field(default=0.002, ge=0)
    #: RS-232 terminator the 2400 appends to every response (front-panel COMMUNICATION menu).
    terminator: Terminator = "CR"
    #: Leads plus tip contact resistance (ohms) seen in 2-wire mode only.
    lead_resistance_ohm: float = Field(default=2.0, ge=0)
    #: Relative spread of the lead/contact resistance from one reading to the next.
    lead_noise: float = Field(default=0.02, ge=0)
    #: Nordheim disorder coefficient K (µΩ·cm).
    nordheim_uohm_cm: float = Field(default=100.0, ge=0)
    #: Resistivity factor of an unsintered powder compact over the dense alloy.
    compact_factor: float = Field(default=2000.0, ge=1)
    #: Anneal temperature (°C) at and above which the compact counts as fully dense.
    sinter_full_c: float = Field(default=1200.0, gt=0)
    #: Sample thickness (mm) in the thin-sheet four-point formula.
    thickness_mm: float = Field(default=0.5, gt=0)
    #: Virtual seconds one source-measure cycle takes (settling plus two 1-PLC conversions).
    reading_s: float = Field(default=0.05, ge=0)


#: Room-temperature resistivity of pure elements, µΩ·cm (CRC Handbook values, rounded).
ELEMENT_RESISTIVITY_UOHM_CM: dict[str, float] = {
    "Ag": 1.59,
    "Al": 2.65,
    "Au": 2.21,
    "Bi": 129.0,
    "Co": 6.24,
    "Cr": 12.5,
    "Cu": 1.68,
    "Fe": 9.71,
    "Ga": 13.6,
    "Hf": 33.1,
    "Ir": 4.71,
    "Mg": 4.39,
    "Mn": 144.0,
    "Mo": 5.34,
    "Nb": 15.2,
    "Ni": 6.93,
    "Pd": 10.5,
    "Pt": 10.6,
    "Re": 17.2,
    "Rh": 4.33,
    "Ru": 7.1,
    "Sn": 11.5,
    "Ta": 13.1,
    "Ti": 42.0,
    "V": 20.1,
    "W": 5.28,
    "Y": 59.6,
    "Zn": 5.9,
    "Zr": 42.1,
}
DEFAULT_RESISTIVITY_UOHM_CM = 50.0

NAN_VALUE = 9.91e37  # the 2400's "not a number": a value neither sourced nor measured
OVERFLOW_VALUE = 9.9e37  # an over-range reading
MAX_CURRENT_A = 1.05
MAX_VOLTAGE_V = 210.0
ERROR_QUEUE_SIZE = 10
OPEN_CIRCUIT_OHM = 1e12
AUTO_OHMS_RANGES: tuple[tuple[float, float], ...] = (
    # (full scale ohms, test current A), Model 2400 auto-ohms ranges
    (21.0, 0.1),
    (210.0, 0.01),
    (2.1e3, 1e-3),
    (2.1e4, 1e-4),
    (2.1e5, 1e-5),
    (2.1e6, 1e-6),
    (2.1e7, 1e-6),
    (2.1e8, 1e-7),
)

ERROR_MESSAGES: dict[int, str] = {
    0: "No error",
    -100: "Command error",
    -101: "Invalid character",
    -102: "Syntax error",
    -103: "Invalid separator",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -112: "Program mnemonic too long",
    -113: "Undefined header",
    -114: "Header suffix out of range",
    -120: "Numeric data error",
    -150: "String data error",
    -200: "Execution error",
    -221: "Settings conflict",
    -222: "Parameter data out of range",
    -224: "Illegal parameter value",
    -230: "Data corrupt or stale",
    -350: "Queue overflow",
    -363: "Input buffer overrun",
    -410: "Query INTERRUPTED",
    -420: "Query UNTERMINATED",
    -440: "Query UNTERMINATED after indefinite response",
    802: "OUTPUT blocked by output enable",
    803: "Not permitted with OUTPUT off",
    810: "OUTPUT blocked by Over Temp",
}


def error_message(code: int) -> str:
    if code in ERROR_MESSAGES:
        return ERROR_MESSAGES[code]
    if -199 <= code <= -100:
        return "Command error"
    if -299 <= code <= -200:
        return "Execution error"
    if -399 <= code <= -300:
        return "Device-specific error"
    if -499 <= code <= -400:
        return "Query error"
    return "Device-dependent error"


def esr_bit(code: int) -> int:
    """The event status register bit an error sets (appendix B's "Event" column)."""
    if -199 <= code <= -100:
        return 32  # CME
    if -299 <= code <= -200 or 800 <= code <= 899:
        return 16  # EXE
    if -399 <= code <= -300 and code != -350:
        return 8  # DDE
    if -499 <= code <= -400:
        return 4  # QYE
    return 0


class ScpiError(Exception):
    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"{code} {error_message(code)} {detail}".strip())
        self.code = code


def fmt(value: float) -> str:
    return f"{value:+.6E}"


def nordheim_resistivity(composition: dict[str, float], k_uohm_cm: float) -> float:
    """Alloy resistivity (µΩ·cm) of atomic fractions ``composition`` (see the module doc)."""
    total = sum(composition.values())
    if total <= 0:
        raise ValueError("empty composition")
    x = {el: f / total for el, f in composition.items()}
    linear = sum(
        f * ELEMENT_RESISTIVITY_UOHM_CM.get(el, DEFAULT_RESISTIVITY_UOHM_CM) for el, f in x.items()
    )
    disorder = 1.0 - sum(f * f for f in x.values())
    return linear + k_uohm_cm * disorder


# -- header matching -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    long: str
    optional: bool
    suffix: bool

    @property
    def short(self) -> str:
        return "".join(c for c in self.long if c.isupper() or c.isdigit())

    def accepts(self, token: str) -> bool:
        word = token
        if self.suffix:
            stripped = word.rstrip("0123456789")
            if stripped != word:
                if word[len(stripped) :] != "1":
                    return False
                word = stripped
        return word in (self.short, self.long.upper())


def _nodes(spec: str) -> tuple[_Node, ...]:
    """``"?SENSe#:FUNCtion:?ON"``: ``?`` marks an optional node, ``#`` a node taking suffix 1."""
    out = []
    for part in spec.split(":"):
        optional = part.startswith("?")
        part = part.lstrip("?")
        suffix = part.endswith("#")
        out.append(_Node(part.rstrip("#"), optional, suffix))
    return tuple(out)


def _match(nodes: tuple[_Node, ...], tokens: list[str]) -> bool:
    if not nodes:
        return not tokens
    head = nodes[0]
    if tokens and head.accepts(tokens[0]) and _match(nodes[1:], tokens[1:]):
        return True
    return head.optional and _match(nodes[1:], tokens)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    for ch in text:
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            buf.append(ch)
        elif ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if quote:
        raise ScpiError(-102, "unterminated string")
    parts.append("".join(buf))
    return parts


# -- instrument state ------------------------------------------------------------------------

SENSE_NAMES = {"VOLT": "VOLT:DC", "CURR": "CURR:DC", "RES": "RES"}


@dataclass
class _Settings:
    """The ``*RST`` state (Tables 18-x of the manual)."""

    source_function: Literal["VOLT", "CURR"] = "VOLT"
    source_current_a: float = 0.0
    source_voltage_v: float = 0.0
    sense_functions: list[str] = field(default_factory=lambda: ["CURR"])
    concurrent: bool = True
    res_mode: Literal["MAN", "AUTO"] = "AUTO"
    compliance_v: float = 21.0
    compliance_a: float = 105e-6
    output: bool = False
    auto_output_off: bool = False
    four_wire: bool = False
    front_terminals: bool = True
    elements: list[str] = field(default_factory=lambda: ["VOLT", "CURR", "RES", "TIME", "STAT"])


@dataclass
class Reading:
    voltage: float
    current: float
    resistance: float
    time: float
    status: int
    compliance: bool

    def render(self, elements: list[str]) -> str:
        values = {
            "VOLT": self.voltage,
            "CURR": self.current,
            "RES": self.resistance,
            "TIME": self.time,
            "STAT": float(self.status),
        }
        order = ["VOLT", "CURR", "RES", "TIME", "STAT"]
        return ",".join(fmt(values[e]) for e in order if e in elements)


Handler = Callable[[list[str], bool], "str | Awaitable[str | None] | None"]


class _Link(ByteDevice):
    """Splits the RS-232 byte stream into program messages, handled one at a time, in order."""

    MAX_LINE = 1024

    def __init__(self, sim: ProbeSim) -> None:
        self.sim = sim
        self._buf = bytearray()
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def on_bytes(self, data: bytes) -> None:
        # Synchronous on purpose: SerialEndpoint runs each chunk in a task of its own, so
        # splitting must not await, or two chunks could interleave in the buffer.
        for b in data:
            if b in (0x03, 0x18):  # ^C / ^X: discard the pending input
                self._buf.clear()
            elif b in (0x0D, 0x0A):
                if self._buf:
                    self.lines.put_nowait(bytes(self._buf))
                    self._buf.clear()
            else:
                self._buf.append(b)
                if len(self._buf) > self.MAX_LINE:
                    self._buf.clear()
                    self.lines.put_nowait(None)  # overrun marker

    def on_connect(self) -> None:
        self._buf.clear()


class ProbeSim(SimInstrument):
    """Keithley 2400 SourceMeter on RS-232, probing the crucible at ``config.location``."""

    kind: ClassVar[str] = "probe"
    config: ProbeConfig

    def __init__(self, name: str, config: ProbeConfig, ctx: SimContext) -> None:
        super().__init__(name, config, ctx)
        self.config = config
        self._rng = ctx.rng(name)
        self._link = _Link(self)
        self._endpoint = SerialEndpoint(name, config.serial, ctx.run_dir, self.faults, self._link)
        self._term = TERMINATOR_BYTES[config.terminator]
        self._s = _Settings()
        self._errors: list[tuple[int, str]] = []
        self._esr = 0
        self._ese = 0
        self._sre = 0
        self._t0 = ctx.clock.now()
        self._last: Reading | None = None
        self._override_ohm: float | None = None
        self._worker: asyncio.Task[None] | None = None
        self._commands: list[tuple[tuple[_Node, ...], Handler]] = self._command_table()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._worker = asyncio.create_task(self._serve(), name=f"{self.name}-scpi")
        await self._endpoint.start()
        await self.apply_initial_faults()

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self._endpoint.stop()

    def endpoint(self) -> dict[str, Any]:
        ep = self._endpoint.endpoint()
        ep["terminator"] = self.config.terminator
        return ep

    async def apply_initial_faults(self) -> None:
        for fault in self.config.faults:
            await self.set_fault(fault)

    async def set_fault(self, fault: Fault) -> None:
        await self.faults.set(fault)
        if fault.kind is FaultKind.ERROR:
            code = fault.code if fault.code is not None else -200
            for _ in range(fault.count or 1):
                self._push_error(code)
            self.faults.clear(FaultKind.ERROR)

    async def clear_fault(self, kind: FaultKind | None = None) -> None:
        self.faults.clear(kind)
        if kind in (None, FaultKind.DISCONNECT):
            await self._endpoint.reconnect()

    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "set_sample_resistance":
            if "ohms" not in args:
                raise ValueError(
                    f"{self.name}: set_sample_resistance needs 'ohms' (a number or null)"
                )
            ohms = args["ohms"]
            if ohms is not None:
                ohms = float(ohms)
                if not ohms > 0 or math.isinf(ohms):
                    raise ValueError(f"{self.name}: sample resistance must be > 0 ohms, got {ohms}")
            self._override_ohm = ohms
            return {"sample_resistance_ohm": self._override_ohm}
        return await super().control(action, args)

    # -- physics -----------------------------------------------------------------------------
    def model_resistance(self) -> float | None:
        """Four-point resistance (ohms) of the sample under the probe, noise-free; None: open."""
        if self._override_ohm is not None:
            return self._override_ohm
        crucible = self.ctx.world.crucible_at(self.config.location)
        if crucible is None:
            return None
        comp = crucible.composition()
        if not comp:
            return None
        rho_uohm_cm = nordheim_resistivity(comp, self.config.nordheim_uohm_cm)
        anneal = crucible.anneal_temperature(self.ctx.world.config.anneal_hold_s) or 0.0
        densified = min(1.0, max(0.0, anneal) / self.config.sinter_full_c)
        factor = self.config.compact_factor ** (1.0 - densified)
        rho_ohm_cm = rho_uohm_cm * 1e-6 * factor
        sheet = rho_ohm_cm / (self.config.thickness_mm / 10.0)
        return sheet * math.log(2) / math.pi

    def _load(self) -> float:
        """Resistance the source drives (ohms) for one reading: an open circuit is 1 TΩ."""
        sample = self.model_resistance()
        if sample is None:
            return OPEN_CIRCUIT_OHM
        r = sample * (1.0 + self._rng.gauss(0.0, self.config.noise))
        if not self._s.four_wire:
            r += self.config.lead_resistance_ohm * (
                1.0 + self._rng.gauss(0, self.config.lead_noise)
            )
        return max(r, 1e-9)

    def _timestamp(self) -> float:
        return (self.ctx.clock.now() - self._t0) % 100_000.0

    async def _measure(self) -> Reading:
        await self.ctx.clock.sleep(self.config.reading_s)
        s = self._s
        r = self._load()
        funcs = set(s.sense_functions)
        auto_ohms = "RES" in funcs and s.res_mode == "AUTO"
        compliance = overflow = False
        source = "CURR" if auto_ohms else s.source_function
        if auto_ohms:
            full_scale, i = next(
                ((fs, cur) for fs, cur in AUTO_OHMS_RANGES if r <= fs), AUTO_OHMS_RANGES[-1]
            )
            v = i * r
            overflow = r > full_scale
        elif s.source_function == "CURR":
            i = s.source_current_a
            v = i * r
            if abs(v) > s.compliance_v:
                compliance = True
                v = math.copysign(s.compliance_v, i)
                i = v / r
        else:
            v = s.source_voltage_v
            i = v / r
            if abs(i) > s.compliance_a:
                compliance = True
                i = math.copysign(s.compliance_a, v)
                v = i * r
        res_on = "RES" in funcs
        # Measured values take priority over source values; neither: NAN (data elements).
        volt_el = v if ("VOLT" in funcs or res_on or source == "VOLT") else NAN_VALUE
        curr_el = i if ("CURR" in funcs or res_on or source == "CURR") else NAN_VALUE
        if not res_on:
            res_el = NAN_VALUE
        elif overflow:
            res_el = OVERFLOW_VALUE
        else:
            res_el = v / i if i != 0 else OVERFLOW_VALUE
        status = 0
        status |= 1 if overflow else 0
        status |= 4 if s.front_terminals else 0
        status |= 8 if compliance else 0
        status |= 1 << 10 if s.res_mode == "AUTO" else 0
        status |= 1 << 11 if "VOLT" in funcs else 0
        status |= 1 << 12 if "CURR" in funcs else 0
        status |= 1 << 13 if res_on else 0
        status |= 1 << 14 if source == "VOLT" else 0
        status |= 1 << 15 if source == "CURR" else 0
        status |= 1 << 22 if s.four_wire else 0
        reading = Reading(volt_el, curr_el, res_el, self._timestamp(), status, compliance)
        self._last = reading
        return reading

    # -- error queue -------------------------------------------------------------------------
    def _push_error(self, code: int) -> None:
        self._esr |= esr_bit(code)
        if len(self._errors) < ERROR_QUEUE_SIZE:
            self._errors.append((code, error_message(code)))
        elif self._errors[-1][0] != -350:
            self._errors[-1] = (-350, error_message(-350))
        log.debug("%s: error %d queued", self.name, code)

    @staticmethod
    def _render_error(entry: tuple[int, str]) -> str:
        return f'{entry[0]},"{entry[1]}"'

    # -- message handling ----------------------------------------------------------------------
    async def _serve(self) -> None:
        while True:
            line = await self._link.lines.get()
            if line is None:
                self._push_error(-363)
                continue
            try:
                await self._execute_line(line)
            except Exception:  # a simulator bug must not stop the instrument; logged loudly
                log.exception("%s: failed on %r", self.name, line)

    async def _execute_line(self, raw: bytes) -> None:
        if any(b < 0x20 or b > 0x7E for b in raw if b != 0x09):
            self._push_error(-101)
            return
        text = raw.decode("ascii")
        try:
            units = _split_outside_quotes(text, ";")
        except ScpiError as exc:
            self._push_error(exc.code)
            return
        replies: list[str] = []
        path: list[str] = []
        for unit in units:
            unit = unit.strip()
            if not unit:
                continue
            try:
                reply, path = await self._execute_unit(unit, path)
            except ScpiError as exc:
                self._push_error(exc.code)
                if -199 <= exc.code <= -100:
                    break
                continue
            if reply is not None:
                replies.append(reply)
        if replies:
            self._endpoint.write(";".join(replies).encode("ascii") + self._term)

    async def _execute_unit(self, unit: str, path: list[str]) -> tuple[str | None, list[str]]:
        header, _, rest = unit.partition(" ")
        if "\t" in header:
            header, _, more = header.partition("\t")
            rest = f"{more} {rest}"
        args_text = rest.strip()
        args = [a.strip() for a in _split_outside_quotes(args_text, ",")] if args_text else []
        if any(a == "" for a in args):
            raise ScpiError(-102, "empty parameter")
        query = header.endswith("?")
        name = header[:-1] if query else header
        if name.startswith("*"):
            return self._common(name.upper(), args, query), path
        absolute = name.startswith(":")
        tokens = [t for t in name.lstrip(":").upper().split(":")]
        if any(not t or not t.replace("_", "").isalnum() for t in tokens):
            raise ScpiError(-102, f"bad header {header!r}")
        if any(len(t) > 12 for t in tokens):
            raise ScpiError(-112)
        full = tokens if absolute else path + tokens
        handler = self._lookup(full)
        if handler is None:
            raise ScpiError(-113, header)
        result = handler(args, query)
        if inspect.isawaitable(result):
            result = await result
        if query and result is None:
            raise ScpiError(-113, header)  # a command-only header asked as a query
        return result, full[:-1]

    def _lookup(self, tokens: list[str]) -> Handler | None:
        for nodes, handler in self._commands:
            if _match(nodes, tokens):
                return handler
        return None

    # -- common commands ---------------------------------------------------------------------
    def _common(self, name: str, args: list[str], query: bool) -> str | None:
        def no_args() -> None:
            if args:
                raise ScpiError(-108)

        if name == "*IDN" and query:
            no_args()
            c = self.config
            return f"KEITHLEY INSTRUMENTS INC.,MODEL 2400,{c.serial_number},{c.firmware}"
        if name == "*RST" and not query:
            no_args()
            self._reset()
            return None
        if name == "*CLS" and not query:
            no_args()
            self._errors.clear()
            self._esr = 0
            return None
        if name == "*OPC":
            no_args()
            if query:
                return "1"
            self._esr |= 1
            return None
        if name == "*WAI" and not query:
            no_args()
            return None
        if name == "*TST" and query:
            return "0"
        if name == "*ESR" and query:
            no_args()
            value, self._esr = self._esr, 0
            return str(value)
        if name in ("*ESE", "*SRE"):
            attr = "_ese" if name == "*ESE" else "_sre"
            if query:
                return str(getattr(self, attr))
            value = self._integer(args, 0, 255)
            setattr(self, attr, value)
            return None
        if name == "*STB" and query:
            no_args()
            return str(self._stb())
        raise ScpiError(-113, name)

    def _stb(self) -> int:
        stb = 4 if self._errors else 0
        if self._esr & self._ese:
            stb |= 32
        if stb & self._sre & ~64:
            stb |= 64
        return stb

    def _reset(self) -> None:
        self._s = _Settings()

    # -- parameter parsing ----------------------------------------------------------------------
    @staticmethod
    def _one(args: list[str]) -> str:
        if not args:
            raise ScpiError(-109)
        if len(args) > 1:
            raise ScpiError(-108)
        return args[0]

    def _number(
        self, args: list[str], lo: float, hi: float, default: float, minimum: float | None = None
    ) -> float:
        word = self._one(args).upper()
        if word in ("MIN", "MINIMUM"):
            return lo if minimum is None else minimum
        if word in ("MAX", "MAXIMUM"):
            return hi
        if word in ("DEF", "DEFAULT"):
            return default
        try:
            value = float(word)
        except ValueError:
            raise ScpiError(-104, word) from None
        if not math.isfinite(value):
            raise ScpiError(-104, word)
        if not lo <= value <= hi:
            raise ScpiError(-222, word)
        return value

    def _integer(self, args: list[str], lo: int, hi: int) -> int:
        value = self._number(args, lo, hi, lo)
        return round(value)

    def _boolean(self, args: list[str]) -> bool:
        word = self._one(args).upper()
        if word == "ON":
            return True
        if word == "OFF":
            return False
        try:
            return round(float(word)) != 0
        except ValueError:
            raise ScpiError(-224, word) from None

    @staticmethod
    def _choice(args: list[str], choices: dict[str, str]) -> str:
        word = ProbeSim._one(args).upper()
        if word not in choices:
            raise ScpiError(-224, word)
        return choices[word]

    @staticmethod
    def _function_list(args: list[str]) -> list[str]:
        if not args:
            raise ScpiError(-109)
        out: list[str] = []
        for arg in args:
            if len(arg) < 2 or arg[0] not in "\"'" or arg[-1] != arg[0]:
                raise ScpiError(-104, f"function names are strings: {arg!r}")
            for item in _split_outside_quotes(arg[1:-1], ","):
                word = item.strip().strip("\"'").upper()
                base, _, dc = word.partition(":")
                name = {
                    "VOLT": "VOLT",
                    "VOLTAGE": "VOLT",
                    "CURR": "CURR",
                    "CURRENT": "CURR",
                    "RES": "RES",
                    "RESISTANCE": "RES",
                }.get(base)
                if name is None or (dc and (name == "RES" or dc != "DC")):
                    raise ScpiError(-224, word)
                out.append(name)
        return out

    @staticmethod
    def _quoted_functions(funcs: list[str]) -> str:
        order = ["VOLT", "CURR", "RES"]
        return ",".join(f'"{SENSE_NAMES[f]}"' for f in order if f in funcs)

    # -- the command tree ----------------------------------------------------------------------
    def _command_table(self) -> list[tuple[tuple[_Node, ...], Handler]]:
        table: list[tuple[str, Handler]] = [
            ("SYSTem:ERRor:?NEXT", self._syst_err),
            ("SYSTem:ERRor:ALL", self._syst_err_all),
            ("SYSTem:ERRor:COUNt", self._syst_err_count),
            ("SYSTem:RSENse", self._syst_rsen),
            ("SYSTem:TIME:RESet", self._syst_time_reset),
            ("SYSTem:PRESet", self._syst_preset),
            ("SOURce#:FUNCtion:?MODE", self._sour_func),
            ("SOURce#:CURRent:?LEVel:?IMMediate:?AMPLitude", self._sour_curr),
            ("SOURce#:VOLTage:?LEVel:?IMMediate:?AMPLitude", self._sour_volt),
            ("SOURce#:CLEar:AUTO", self._sour_clear_auto),
            ("SOURce#:CLEar:?IMMediate", self._sour_clear),
            ("?SENSe#:FUNCtion:CONCurrent", self._sens_func_conc),
            ("?SENSe#:FUNCtion:OFF:ALL", self._sens_func_off_all),
            ("?SENSe#:FUNCtion:OFF", self._sens_func_off),
            ("?SENSe#:FUNCtion:ALL", self._sens_func_all),
            ("?SENSe#:FUNCtion:?ON", self._sens_func),
            ("?SENSe#:RESistance:MODE", self._sens_res_mode),
            ("?SENSe#:VOLTage:?DC:PROTection:?LEVel", self._sens_volt_prot),
            ("?SENSe#:CURRent:?DC:PROTection:?LEVel", self._sens_curr_prot),
            ("OUTPut#:?STATe", self._outp),
            ("ROUTe:TERMinals", self._rout_term),
            ("FORMat:ELEMents:?SENSe#", self._form_elem),
            ("READ", self._read),
            ("FETCh", self._fetch),
            ("INITiate:?IMMediate", self._init),
            ("MEASure:VOLTage:?DC", lambda a, q: self._meas(a, q, "VOLT")),
            ("MEASure:CURRent:?DC", lambda a, q: self._meas(a, q, "CURR")),
            ("MEASure:RESistance", lambda a, q: self._meas(a, q, "RES")),
            ("MEASure", lambda a, q: self._meas(a, q, None)),
            ("CONFigure:VOLTage:?DC", lambda a, q: self._conf(a, q, "VOLT")),
            ("CONFigure:CURRent:?DC", lambda a, q: self._conf(a, q, "CURR")),
            ("CONFigure:RESistance", lambda a, q: self._conf(a, q, "RES")),
            ("CONFigure", lambda a, q: self._conf(a, q, None)),
        ]
        return [(_nodes(spec), handler) for spec, handler in table]

    @staticmethod
    def _query_only(args: list[str], query: bool) -> None:
        if not query:
            raise ScpiError(-113)
        if args:
            raise ScpiError(-108)

    def _syst_err(self, args: list[str], query: bool) -> str:
        self._query_only(args, query)
        return self._render_error(self._errors.pop(0) if self._errors else (0, "No error"))

    def _syst_err_all(self, args: list[str], query: bool) -> str:
        self._query_only(args, query)
        entries = self._errors or [(0, "No error")]
        self._errors = []
        return ",".join(self._render_error(e) for e in entries)

    def _syst_err_count(self, args: list[str], query: bool) -> str:
        self._query_only(args, query)
        return str(len(self._errors))

    def _syst_rsen(self, args: list[str], query: bool) -> str | None:
        if query:
            return "1" if self._s.four_wire else "0"
        self._s.four_wire = self._boolean(args)
        return None

    def _command_only(self, args: list[str], query: bool) -> None:
        if query:
            raise ScpiError(-113)
        if args:
            raise ScpiError(-108)

    def _syst_time_reset(self, args: list[str], query: bool) -> None:
        self._command_only(args, query)
        self._t0 = self.ctx.clock.now()

    def _syst_preset(self, args: list[str], query: bool) -> None:
        self._command_only(args, query)
        self._reset()

    def _sour_func(self, args: list[str], query: bool) -> str | None:
        if query:
            return self._s.source_function
        self._s.source_function = self._choice(  # type: ignore[assignment]
            args, {"CURR": "CURR", "CURRENT": "CURR", "VOLT": "VOLT", "VOLTAGE": "VOLT"}
        )
        return None

    def _sour_curr(self, args: list[str], query: bool) -> str | None:
        if query:
            return fmt(self._s.source_current_a)
        self._s.source_current_a = self._number(args, -MAX_CURRENT_A, MAX_CURRENT_A, 0.0)
        return None

    def _sour_volt(self, args: list[str], query: bool) -> str | None:
        if query:
            return fmt(self._s.source_voltage_v)
        self._s.source_voltage_v = self._number(args, -MAX_VOLTAGE_V, MAX_VOLTAGE_V, 0.0)
        return None

    def _sour_clear_auto(self, args: list[str], query: bool) -> str | None:
        if query:
            return "1" if self._s.auto_output_off else "0"
        self._s.auto_output_off = self._boolean(args)
        return None

    def _sour_clear(self, args: list[str], query: bool) -> None:
        self._command_only(args, query)
        self._s.output = False

    def _sens_func(self, args: list[str], query: bool) -> str | None:
        if query:
            return self._quoted_functions(self._s.sense_functions)
        funcs = self._function_list(args)
        if self._s.concurrent:
            for f in funcs:
                if f not in self._s.sense_functions:
                    self._s.sense_functions.append(f)
        else:
            self._s.sense_functions = [funcs[-1]]
        return None

    def _sens_func_off(self, args: list[str], query: bool) -> str | None:
        if query:
            off = [f for f in ("VOLT", "CURR", "RES") if f not in self._s.sense_functions]
            return self._quoted_functions(off)
        for f in self._function_list(args):
            if f in self._s.sense_functions:
                self._s.sense_functions.remove(f)
        return None

    def _sens_func_all(self, args: list[str], query: bool) -> None:
        self._command_only(args, query)
        self._s.sense_functions = ["VOLT", "CURR", "RES"]
        self._s.concurrent = True

    def _sens_func_off_all(self, args: list[str], query: bool) -> None:
        self._command_only(args, query)
        self._s.sense_functions = []

    def _sens_func_conc(self, args: list[str], query: bool) -> str | None:
        if query:
            return "1" if self._s.concurrent else "0"
        self._s.concurrent = self._boolean(args)
        if not self._s.concurrent and len(self._s.sense_functions) > 1:
            self._s.sense_functions = self._s.sense_functions[-1:]
        return None

    def _sens_res_mode(self, args: list[str], query: bool) -> str | None:
        if query:
            return self._s.res_mode
        self._s.res_mode = self._choice(  # type: ignore[assignment]
            args, {"MAN": "MAN", "MANUAL": "MAN", "AUTO": "AUTO"}
        )
        return None

    def _sens_volt_prot(self, args: list[str], query: bool) -> str | None:
        if query:
            return fmt(self._s.compliance_v)
        self._s.compliance_v = self._number(args, 0.2, MAX_VOLTAGE_V, 21.0)
        return None

    def _sens_curr_prot(self, args: list[str], query: bool) -> str | None:
        if query:
            return fmt(self._s.compliance_a)
        self._s.compliance_a = self._number(args, 1e-9, MAX_CURRENT_A, 105e-6)
        return None

    def _outp(self, args: list[str], query: bool) -> str | None:
        if query:
            return "1" if self._s.output else "0"
        self._s.output = self._boolean(args)
        return None

    def _rout_term(self, args: list[str], query: bool) -> str | None:
        if query:
            return "FRON" if self._s.front_terminals else "REAR"
        side = self._choice(args, {"FRON": "F", "FRONT": "F", "REAR": "R"})
        self._s.front_terminals = side == "F"
        return None

    def _form_elem(self, args: list[str], query: bool) -> str | None:
        names = {
            "VOLT": "VOLT",
            "VOLTAGE": "VOLT",
            "CURR": "CURR",
            "CURRENT": "CURR",
            "RES": "RES",
            "RESISTANCE": "RES",
            "TIME": "TIME",
            "STAT": "STAT",
            "STATUS": "STAT",
        }
        if query:
            return ",".join(
                e for e in ("VOLT", "CURR", "RES", "TIME", "STAT") if e in self._s.elements
            )
        if not args:
            raise ScpiError(-109)
        chosen: list[str] = []
        for arg in args:
            key = arg.upper()
            if key not in names:
                raise ScpiError(-224, arg)
            chosen.append(names[key])
        self._s.elements = chosen
        return None

    async def _cycle(self) -> Reading:
        """One source-measure cycle as the trigger model runs it (output rules of section 17)."""
        s = self._s
        if not s.output:
            if not s.auto_output_off:
                raise ScpiError(803)
            s.output = True
            try:
                return await self._measure()
            finally:
                s.output = False
        reading = await self._measure()
        if s.auto_output_off:
            s.output = False
        return reading

    async def _read(self, args: list[str], query: bool) -> str:
        self._query_only(args, query)
        reading = await self._cycle()
        return reading.render(self._s.elements)

    def _fetch(self, args: list[str], query: bool) -> str:
        self._query_only(args, query)
        if self._last is None:
            raise ScpiError(-230)
        return self._last.render(self._s.elements)

    async def _init(self, args: list[str], query: bool) -> None:
        self._command_only(args, query)
        await self._cycle()

    def _configure(self, function: str | None) -> None:
        s = self._s
        if function is not None:
            s.sense_functions = [function]
        s.output = True

    async def _meas(self, args: list[str], query: bool, function: str | None) -> str:
        self._query_only(args, query)
        self._configure(function)
        return await self._read([], True)

    def _conf(self, args: list[str], query: bool, function: str | None) -> str | None:
        if query:
            if function is not None or args:
                raise ScpiError(-113)
            return self._quoted_functions(self._s.sense_functions)
        if args:
            raise ScpiError(-108)
        self._configure(function)
        return None

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able state.

        ``output_on``, ``source`` (``function``, ``current_a``, ``voltage_v``),
        ``sense_functions`` (``"VOLT"``/``"CURR"``/``"RES"``), ``resistance_mode``,
        ``four_wire``, ``compliance_v``, ``compliance_a``, ``auto_output_off``, ``elements``,
        ``error_queue`` (``[[code, message], ...]``, oldest first), ``event_status``,
        ``last_reading`` (``voltage``, ``current``, ``resistance``, ``time``, ``status``,
        ``compliance``; None before the first), ``sample`` (``crucible``, ``model_ohm``,
        ``override_ohm``), ``terminator``, ``connected``, ``faults``.
        """
        s = self._s
        crucible = self.ctx.world.crucible_at(self.config.location)
        return {
            "output_on": s.output,
            "source": {
                "function": s.source_function,
                "current_a": s.source_current_a,
                "voltage_v": s.source_voltage_v,
            },
            "sense_functions": list(s.sense_functions),
            "resistance_mode": s.res_mode,
            "four_wire": s.four_wire,
            "compliance_v": s.compliance_v,
            "compliance_a": s.compliance_a,
            "auto_output_off": s.auto_output_off,
            "elements": list(s.elements),
            "error_queue": [[code, msg] for code, msg in self._errors],
            "event_status": self._esr,
            "last_reading": asdict(self._last) if self._last else None,
            "sample": {
                "location": self.config.location,
                "crucible": crucible.id if crucible else None,
                "model_ohm": self.model_resistance(),
                "override_ohm": self._override_ohm,
            },
            "terminator": self.config.terminator,
            "connected": self._endpoint.connected,
            "faults": self.faults.state(),
        }
