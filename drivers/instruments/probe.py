"""Keithley 2400 SourceMeter as a four-point resistivity probe: SCPI over RS-232.

How the 2400 talks, and what the driver does about it:

* **Replies end with the RS-232 terminator chosen on the front panel** (COMMUNICATION menu:
  CR, LF, CRLF or LFCR). The driver reads up to :attr:`ProbeSettings.terminator`; it must match
  the instrument's menu, or every query times out. Commands are sent with
  :attr:`ProbeSettings.command_terminator` (CR: the manual says a command is processed once its
  <CR> is received).
* **A failed command sends nothing back.** The 2400 only queues an error (``SYST:ERR?`` ->
  ``-222,"Parameter data out of range"``); a failed *query* is simply silent. So after every
  command and every query the driver drains ``SYST:ERR?`` (until ``0,"No error"``) while still
  holding the link, and any queued error becomes :class:`~drivers.errors.InstrumentError` with
  the SCPI code and message. A query that times out is followed by ``SYST:ERR?`` as well: if the
  instrument queued an error, the user gets that error (e.g. ``803 Not permitted with OUTPUT
  off``) rather than a bare timeout; if the queue is empty, the timeout stands.
* **Four-wire ohms with our own source current.** ``*RST`` leaves the 2400 in auto-ohms (it
  picks its own test current) and 2-wire sensing, which adds the leads' and tips' resistance to
  every reading. :meth:`Probe.configure_four_wire` selects source-current, manual ohms
  (``:SENS:RES:MODE MAN``, as pymeasure does), the voltage compliance and ``:SYST:RSEN 1``.
* **Source off is the safe state.** Configuration enables auto output-off
  (``:SOUR:CLE:AUTO ON``, manual section 17): the *instrument* turns the output on for each
  ``:READ?`` and off after it, so the sample is never left energised even if the link dies in
  the middle of a measurement. On any failure of a measurement the driver also sends
  ``:OUTP OFF`` (best effort), and :meth:`Probe.output_off` is the device's ``safe_state``.
* **Readings**: ``<V>,<I>,<R>,<time>,<status>`` (``:FORM:ELEM VOLT,CURR,RES,TIME,STAT``);
  ``9.91e37`` is "no value" and ``9.9e37`` an over-range. The status word says whether the
  reading is real: bit 3 compliance, bit 22 remote sense (4-wire), bit 13 ohms measured,
  bit 15 current sourced, bit 10 auto-ohms.
* **Compliance is an error.** A reading taken in compliance is not a resistance of the sample
  (the source could not push the programmed current), so :meth:`Probe.measure_resistance` raises
  :class:`ProbeCompliance` (an :class:`InstrumentError`, code ``"compliance"``, with the flagged
  reading attached as ``.reading``). An open circuit (no crucible under the probe, no contact)
  shows as compliance with an enormous V/I and raises :class:`ProbeCompliance` with code
  ``"open_circuit"``. A plan that wants to record such samples anyway catches it and uses
  ``exc.reading``.
* **Retries**: queries that only read (``*IDN?``, the configuration read-backs) are retried on a
  lost or garbled reply; a query that times out because the instrument refused it is never
  retried (the ``SYST:ERR?`` after it says so). ``:READ?`` is not retried automatically: each one
  sources current through the sample, and the caller decides whether to measure again.
  Configuration commands are sent once; they are idempotent settings, so re-running
  :meth:`Probe.configure_four_wire` after a failure is always safe.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ..errors import (
    DeviceTimeout,
    DriverError,
    InstrumentError,
    InvalidParameter,
    NotConnected,
    ProtocolError,
    retry_read,
)
from ..links import Links, SerialLink
from ..transports.serial import SerialSession, SerialTransport

log = logging.getLogger(__name__)

T = TypeVar("T")

Terminator = Literal["CR", "LF", "CRLF", "LFCR"]
TERMINATORS: dict[str, bytes] = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n", "LFCR": b"\n\r"}

#: The 2400's "not a number": an element neither measured nor sourced.
NO_VALUE = 9.91e37
#: An over-range reading.
OVERFLOW = 9.9e37
#: Source current limits of the Model 2400 (A), and the limit above the 21 V range.
MAX_CURRENT_A = 1.05
MAX_CURRENT_ABOVE_21V_A = 0.105
MIN_CURRENT_A = 1e-9
#: Voltage compliance limits (V).
MIN_COMPLIANCE_V = 0.2
MAX_COMPLIANCE_V = 210.0
LOW_VOLTAGE_RANGE_V = 21.0
#: The 2400's error queue holds 10 entries (plus a -350 overflow marker).
MAX_ERRORS_DRAINED = 32

STATUS_OVERFLOW = 1 << 0
STATUS_COMPLIANCE = 1 << 3
STATUS_AUTO_OHMS = 1 << 10
STATUS_OHMS = 1 << 13
STATUS_I_SOURCE = 1 << 15
STATUS_REMOTE_SENSE = 1 << 22

_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?([Ee][+-]?\d+)?")
_ERROR_REPLY = re.compile(r'([+-]?\d+),"([^"]*)"')
_IDN_MAKER = "KEITHLEY INSTRUMENTS INC."


class ProbeSettings(BaseModel):
    """Configuration of one Keithley 2400 used as a four-point probe."""

    model_config = ConfigDict(extra="forbid")

    link: SerialLink
    #: Terminator the 2400 appends to its replies (its COMMUNICATION menu setting).
    terminator: Terminator = "CR"
    #: Terminator sent after each command (the 2400 processes a command on <CR>).
    command_terminator: Terminator = "CR"
    #: Time allowed for one ``:READ?`` (source settling plus the integration time).
    measure_timeout_s: float = Field(default=5.0, gt=0)
    #: Source current used when :meth:`Probe.measure_resistance` configures the probe itself.
    source_current_a: float = Field(default=1e-3)
    #: Voltage compliance used likewise.
    compliance_v: float = Field(default=21.0)
    #: Highest source current this cell allows (A); at most the 2400's 1.05 A.
    max_current_a: float = Field(default=MAX_CURRENT_A, gt=0, le=MAX_CURRENT_A)
    #: V/I above which a reading in compliance counts as an open circuit (ohms).
    open_circuit_ohm: float = Field(default=1e9, gt=0)
    #: Attempts for read-only queries (lost or garbled replies).
    read_attempts: int = Field(default=3, ge=1)


@dataclass(frozen=True)
class ProbeIdentity:
    manufacturer: str
    model: str
    serial_number: str
    firmware: str


@dataclass(frozen=True)
class ScpiError:
    """One entry of the 2400's error queue."""

    code: int
    message: str


@dataclass(frozen=True)
class FourWireConfig:
    source_current_a: float
    compliance_v: float


@dataclass(frozen=True)
class ProbeReading:
    """One source-measure reading. ``None`` where the 2400 sent its "no value" (9.91e37)."""

    resistance_ohm: float | None
    voltage_v: float | None
    current_a: float | None
    #: The 2400's own timestamp (s since power-on or ``:SYST:TIME:RES``).
    instrument_time_s: float | None
    #: Host wall-clock time (``time.time()``) when the reply arrived.
    timestamp: float
    status: int

    @property
    def compliance(self) -> bool:
        return bool(self.status & STATUS_COMPLIANCE)

    @property
    def overflow(self) -> bool:
        return bool(self.status & STATUS_OVERFLOW)

    @property
    def four_wire(self) -> bool:
        return bool(self.status & STATUS_REMOTE_SENSE)

    @property
    def auto_ohms(self) -> bool:
        return bool(self.status & STATUS_AUTO_OHMS)


class ProbeCompliance(InstrumentError):
    """A reading taken in compliance (code ``"compliance"``) or on an open circuit
    (``"open_circuit"``): not a resistance of the sample. The flagged reading is ``.reading``."""

    def __init__(
        self, device: str, command: str | None, code: str, message: str, reading: ProbeReading
    ) -> None:
        self.reading = reading
        super().__init__(device, command, code, message)


def _number(text: str) -> float:
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"not a number: {text!r}")
    return float(text)


def _value(x: float) -> float | None:
    return None if x >= NO_VALUE * 0.999 else x


def parse_error_reply(line: str) -> ScpiError:
    """``-113,"Undefined header"`` -> ScpiError; ``ValueError`` if it is not one."""
    m = _ERROR_REPLY.fullmatch(line.strip())
    if not m:
        raise ValueError(f"not a SYST:ERR? reply: {line!r}")
    code, message = int(m.group(1)), m.group(2)
    # Code 0 and "No error" go together; a mismatch is a damaged reply, not an error.
    if (code == 0) != (message == "No error"):
        raise ValueError(f"inconsistent SYST:ERR? reply: {line!r}")
    return ScpiError(code, message)


def parse_reading(line: str, timestamp: float | None = None) -> ProbeReading:
    """``<V>,<I>,<R>,<time>,<status>`` (``:FORM:ELEM VOLT,CURR,RES,TIME,STAT``)."""
    parts = line.split(",")
    if len(parts) != 5:
        raise ValueError(f"expected 5 comma-separated values, got {len(parts)}")
    v, i, r, t, stat = (_number(p) for p in parts)
    if stat != int(stat) or not 0 <= stat < 2**24:
        raise ValueError(f"bad status word {stat!r}")
    return ProbeReading(
        resistance_ohm=_value(r),
        voltage_v=_value(v),
        current_a=_value(i),
        instrument_time_s=_value(t),
        timestamp=time.time() if timestamp is None else timestamp,
        status=int(stat),
    )


def parse_identity(line: str) -> ProbeIdentity:
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        raise ValueError(f"expected 4 comma-separated fields, got {len(parts)}")
    maker, model, serial_number, firmware = parts
    if maker != _IDN_MAKER or not re.fullmatch(r"MODEL 24\d\d", model):
        raise ValueError(f"not a Keithley 24xx identity: {line!r}")
    if not serial_number.isalnum() or not all(" " <= c <= "~" for c in firmware):
        raise ValueError(f"malformed serial number or firmware: {line!r}")
    return ProbeIdentity(maker, model, serial_number, firmware)


def _bool_reply(line: str) -> bool:
    if line.strip() not in ("0", "1"):
        raise ValueError(f"expected 0 or 1, got {line!r}")
    return line.strip() == "1"


class Probe:
    """Protocol client of a Keithley 2400 wired as a four-point probe.

    Every public method holds the serial link for its whole exchange (command, reply and the
    ``SYST:ERR?`` drain), so concurrent callers cannot interleave on the wire.
    """

    def __init__(self, name: str, settings: ProbeSettings, links: Links) -> None:
        self.name = name
        self.settings = settings
        self._port = links.serial_port(
            name,
            settings.link,
            write_terminator=TERMINATORS[settings.command_terminator],
            read_terminator=TERMINATORS[settings.terminator],
        )
        #: What :meth:`configure_four_wire` last set; None after a reset or a failed configure.
        self.configured: FourWireConfig | None = None

    @property
    def port(self) -> SerialTransport:
        """The serial transport (its ``stats`` and wire log)."""
        return self._port

    # -- low level ---------------------------------------------------------------------------
    async def _drain(self, s: SerialSession, after: str) -> list[ScpiError]:
        """Read ``SYST:ERR?`` until the queue is empty; return what was queued."""
        found: list[ScpiError] = []
        label = f"SYST:ERR? after {after!r}"
        for _ in range(MAX_ERRORS_DRAINED):
            err = await self._error_reply(s, label)
            if err.code == 0:
                return found
            found.append(err)
        raise ProtocolError(self.name, label, f"error queue not empty after "
                            f"{MAX_ERRORS_DRAINED} reads")

    def _raise_errors(self, command: str, errors: list[ScpiError]) -> None:
        if not errors:
            return
        first = errors[0]
        message = first.message
        if len(errors) > 1:
            more = "; ".join(f"{e.code} {e.message}" for e in errors[1:])
            message += f" (also queued: {more})"
        raise InstrumentError(self.name, command, first.code, message)

    async def _error_reply(self, s: SerialSession, label: str) -> ScpiError:
        """One ``SYST:ERR?``. A line that is not an error reply may be a late reply to an earlier
        query (one that timed out): it is skipped, and the error reply is awaited until the
        timeout; if none comes, the odd line is reported as :class:`ProtocolError`."""
        deadline = time.monotonic() + self._port.timeout
        line = await s.query("SYST:ERR?", command=label)
        first_bad: tuple[str, ValueError] | None = None
        while True:
            try:
                return parse_error_reply(line)
            except ValueError as exc:
                first_bad = first_bad or (line, exc)
                self._port.wire.note(f"not an error reply, skipped: {line!r}")
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise DeviceTimeout(self.name, label, self._port.timeout)
                line = await s.read_line(timeout=remaining, command=label)
            except DeviceTimeout:
                assert first_bad is not None
                bad, exc = first_bad
                raise ProtocolError(
                    self.name, label, str(exc), bad.encode("ascii", "replace")
                ) from None

    async def _error_after_timeout(
        self, s: SerialSession, command: str, exc: DeviceTimeout
    ) -> None:
        """A query timed out: the 2400 is silent on a failed query, so ask ``SYST:ERR?``.

        Raises the queued error as :class:`InstrumentError` (from the timeout), or the timeout
        itself when the queue is empty or the instrument does not answer that either.
        """
        label = f"SYST:ERR? after {command!r}"
        try:
            first = await self._error_reply(s, label)
            if first.code == 0:
                raise exc
            errors = [first, *await self._drain(s, command)]
        except (DeviceTimeout, ProtocolError, NotConnected) as follow_up:
            if follow_up is exc:
                raise
            raise exc from follow_up
        try:
            self._raise_errors(command, errors)
        except InstrumentError as err:
            raise err from exc

    async def _command(self, s: SerialSession, cmd: str) -> None:
        """Send one command, then drain and check the error queue."""
        s.flush_input()
        await s.write(cmd, command=cmd)
        self._raise_errors(cmd, await self._drain(s, cmd))

    async def _query(
        self,
        s: SerialSession,
        cmd: str,
        parse: Callable[[str], T],
        *,
        timeout: float | None = None,
    ) -> T:
        """Send one query, check the error queue, then parse the reply."""
        try:
            line = await s.query(cmd, command=cmd, timeout=timeout)
        except DeviceTimeout as exc:
            await self._error_after_timeout(s, cmd, exc)
            raise  # pragma: no cover - _error_after_timeout always raises
        self._raise_errors(cmd, await self._drain(s, cmd))
        try:
            return parse(line)
        except ValueError as exc:
            raise ProtocolError(self.name, cmd, str(exc), line.encode("ascii", "replace")) from exc

    async def _read_query(self, cmd: str, parse: Callable[[str], T]) -> T:
        """A read-only query, retried on a lost or garbled reply (never on an instrument error)."""

        async def once() -> T:
            async with self._port.session() as s:
                return await self._query(s, cmd, parse)

        return await retry_read(once, attempts=self.settings.read_attempts, backoff=0.05)

    # -- public API --------------------------------------------------------------------------
    async def identify(self) -> ProbeIdentity:
        """``*IDN?``: maker, model, serial number and firmware."""
        return await self._read_query("*IDN?", parse_identity)

    async def errors(self) -> list[ScpiError]:
        """Drain the error queue (oldest first); empty when there was nothing queued."""
        async with self._port.session() as s:
            s.flush_input()
            return await self._drain(s, "errors()")

    async def reset(self) -> list[ScpiError]:
        """``*RST``: the 2400's defaults (output off, 2-wire, auto-ohms). Errors queued before
        the reset are drained first and returned (and logged), so that they are not blamed on
        the reset; ``*OPC?`` then confirms the reset completed."""
        async with self._port.session() as s:
            s.flush_input()
            stale = await self._drain(s, "reset")
            if stale:
                log.warning("%s: errors queued before reset: %s", self.name, stale)
            self.configured = None
            await self._command(s, "*RST")
            await self._query(s, "*OPC?", _one)
            return stale

    def check_four_wire(self, current_a: float, compliance_v: float) -> None:
        """Range-check a four-wire configuration; :class:`InvalidParameter` if out of range."""
        cmd = "configure_four_wire"
        limit = self.settings.max_current_a
        if not isinstance(current_a, (int, float)) or not math.isfinite(current_a):
            raise InvalidParameter(self.name, cmd, f"current_a={current_a!r} is not a number (A)")
        if not isinstance(compliance_v, (int, float)) or not math.isfinite(compliance_v):
            raise InvalidParameter(
                self.name, cmd, f"compliance_v={compliance_v!r} is not a number (V)"
            )
        if not MIN_CURRENT_A <= abs(current_a) <= limit:
            raise InvalidParameter(
                self.name, cmd,
                f"current_a={current_a:g} A out of range: |I| must be {MIN_CURRENT_A:g} A to "
                f"{limit:g} A",
            )
        if not MIN_COMPLIANCE_V <= compliance_v <= MAX_COMPLIANCE_V:
            raise InvalidParameter(
                self.name, cmd,
                f"compliance_v={compliance_v:g} V out of range: {MIN_COMPLIANCE_V:g} V to "
                f"{MAX_COMPLIANCE_V:g} V",
            )
        if compliance_v > LOW_VOLTAGE_RANGE_V and abs(current_a) > MAX_CURRENT_ABOVE_21V_A:
            raise InvalidParameter(
                self.name, cmd,
                f"current_a={current_a:g} A with compliance_v={compliance_v:g} V: above "
                f"{LOW_VOLTAGE_RANGE_V:g} V the 2400 sources at most "
                f"{MAX_CURRENT_ABOVE_21V_A:g} A",
            )

    async def configure_four_wire(self, current_a: float, compliance_v: float) -> FourWireConfig:
        """Source ``current_a`` (A), measure ohms with 4-wire sense, compliance ``compliance_v``.

        Range-checked before anything is sent. Sends, each followed by the ``SYST:ERR?`` check:
        output off, source-current function and level, ``"RES"`` sense in manual ohms, the
        voltage compliance, ``:SYST:RSEN 1``, the reading format and auto output-off.
        """
        self.check_four_wire(current_a, compliance_v)
        commands = [
            ":OUTP OFF",
            ":SOUR:FUNC CURR",
            f":SOUR:CURR {current_a:.6E}",
            ':SENS:FUNC "RES"',
            ":SENS:RES:MODE MAN",
            f":SENS:VOLT:PROT {compliance_v:.6E}",
            ":SYST:RSEN 1",
            ":FORM:ELEM VOLT,CURR,RES,TIME,STAT",
            ":SOUR:CLE:AUTO ON",
        ]
        async with self._port.session() as s:
            self.configured = None
            for cmd in commands:
                await self._command(s, cmd)
            self.configured = FourWireConfig(float(current_a), float(compliance_v))
            return self.configured

    async def measure_resistance(self) -> ProbeReading:
        """One four-wire reading (``:READ?``; the output is on only during the reading).

        Configures the probe first with the settings' source current and compliance if this
        client has not configured it since it was created or reset. Raises
        :class:`ProbeCompliance` for a reading in compliance or on an open circuit, and
        :class:`InstrumentError` if the reading shows the instrument is not in 4-wire,
        source-current, manual-ohms mode (its settings changed behind the driver's back; the
        next call reconfigures).
        """
        if self.configured is None:
            await self.configure_four_wire(
                self.settings.source_current_a, self.settings.compliance_v
            )
        cmd = ":READ?"
        async with self._port.session() as s:
            try:
                reading = await self._query(
                    s, cmd, parse_reading, timeout=self.settings.measure_timeout_s
                )
            except DriverError:
                await self._output_off_after_failure(s)
                raise
        self._check_reading(cmd, reading)
        return reading

    def _check_reading(self, cmd: str, r: ProbeReading) -> None:
        wanted = STATUS_OHMS | STATUS_I_SOURCE | STATUS_REMOTE_SENSE
        if (r.status & wanted) != wanted or r.auto_ohms:
            self.configured = None
            raise InstrumentError(
                self.name, cmd, None,
                f"not a 4-wire source-current manual-ohms reading (status word "
                f"0x{r.status:06X}); the settings changed outside the driver, reconfigure",
            )
        if r.compliance:
            assert self.configured is not None
            v_lim, i_src = self.configured.compliance_v, self.configured.source_current_a
            ratio = r.resistance_ohm
            if ratio is None and r.voltage_v is not None and r.current_a:
                ratio = r.voltage_v / r.current_a
            if ratio is None or ratio >= self.settings.open_circuit_ohm:
                raise ProbeCompliance(
                    self.name, cmd, "open_circuit",
                    f"open circuit: no sample under the probe or no tip contact (V/I "
                    f"{ratio if ratio is not None else float('nan'):.3g} ohm, "
                    f"voltage at the {v_lim:g} V compliance)",
                    r,
                )
            raise ProbeCompliance(
                self.name, cmd, "compliance",
                f"in compliance: the sample (>= {v_lim / abs(i_src):.3g} ohm) needs more than "
                f"{v_lim:g} V at {i_src:g} A; lower the source current or raise the compliance",
                r,
            )
        if r.overflow or r.resistance_ohm is None:
            raise InstrumentError(self.name, cmd, None, f"no resistance value (status word "
                                  f"0x{r.status:06X})")

    async def _output_off_after_failure(self, s: SerialSession) -> None:
        try:
            await self._command(s, ":OUTP OFF")
        except DriverError as exc:
            log.error("%s: could not switch the output off after a failed reading: %s",
                      self.name, exc)

    async def output_off(self) -> None:
        """``:OUTP OFF``: source off, the probe's safe state."""
        async with self._port.session() as s:
            await self._command(s, ":OUTP OFF")

    async def output_on(self) -> bool:
        """``:OUTP?``: whether the source output is on."""
        return await self._read_query(":OUTP?", _bool_reply)

    async def source_current(self) -> float:
        """``:SOUR:CURR?``: the programmed source current (A)."""
        return await self._read_query(":SOUR:CURR?", _number)

    async def compliance_voltage(self) -> float:
        """``:SENS:VOLT:PROT?``: the voltage compliance (V)."""
        return await self._read_query(":SENS:VOLT:PROT?", _number)

    async def four_wire(self) -> bool:
        """``:SYST:RSEN?``: whether 4-wire remote sense is on."""
        return await self._read_query(":SYST:RSEN?", _bool_reply)

    async def close(self) -> None:
        await self._port.close()


def _one(line: str) -> int:
    if line.strip() != "1":
        raise ValueError(f"expected 1, got {line!r}")
    return 1
