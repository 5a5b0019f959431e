"""Mettler Toledo Quantos powder doser (QB1 + QS30 sampler) over MT-SICS: protocol client.

Commands used (the Quantos' MT-SICS extensions; reply parsing in :mod:`drivers.instruments.mtsics`,
error codes as in the public RobInHoodPy driver ``mettler_quantos_qb1.py``)::

    QRD 1 1 5 <mg>   -> QRD 1 1 5 A          set the target mass (0.10..250000 mg; L: refused)
    QRD 2 3 7        -> QRD 2 3 7 <n> A      front door position (2 closed, 3 open, 9 running)
    QRD 2 4 11       -> B, XML, A            the mounted dosing head's data (I 1: none mounted)
    QRD 2 4 12       -> B, XML, A            the last dose's sample data (content dosed, mg)
    QRA 61 1         -> QRA 61 1 B, then QRA 61 1 A | QRA 61 1 I <n>     dose the target
    QRA 61 4         -> B, A                 stop a running dose (the dose answers I 8)
    QRA 60 7 3|2     -> QRA 60 7 B, A | I n  open / close the front door
    QRA 60 8 <0..30> -> QRA 60 8 B, A | I n  move the sampler
    QRA 60 2 4|3     -> QRA 60 2 B, A | I n  lock / unlock the dosing-head pin (mount / unmount)
    S                -> S S <w> g            the built-in balance (net: each dose tares first)

Actions answer twice: ``B`` (accepted) at once, then ``A`` (done) or ``I <n>`` (failed); an
action that cannot start answers ``I <n>`` at once. :data:`QUANTOS_ERRORS` gives the meanings.

**A dose is never re-sent.** ``QRA 61 1`` moves powder; sent twice, it doses twice. When its reply
is lost (no ``B`` and no final line by the timeout), garbled, or the link drops mid-dose, the
driver asks the instrument what happened instead:

1. Is a job still running? It re-sets the *same* target (``QRD 1 1 5 <mg>``), which the Quantos
   refuses with ``I 2`` while a job runs and accepts (changing nothing) otherwise.
2. Did a dose start? The head's ``Dosing_counter`` (``QRD 2 4 11``) is compared with its value
   before the dose.
3. If it started and is over, how much was dosed: ``Content`` of the sample data (``QRD 2 4 12``).

and raises the error of the lost reply (:class:`DoseTimeout`, :class:`DoseGarbled`,
:class:`DoseLinkLost`) carrying a :class:`DoseCheck` with what is known, and saying it in the
message. Whether to retry is the plan's decision, with that knowledge.

Other actions: door moves are checked the same way (``QRD 2 3 7`` tells where the door is; the
call succeeds if the door ended where it was asked to); pin moves are checked with ``QRD 2 4 11``
(mounted or not); a sampler move has no read-back in the protocol, so a lost reply there raises and
marks the mounted head as unknown (the next :meth:`Doser.dose` re-mounts). Settings
(``QRD 1 1 5``) and queries are idempotent and retried.

Mounting: the protocol cannot say *which* sampler position the mounted head came from, so the
driver remembers the head it mounted itself; when it does not know (after start-up or a lost
reply) it unlocks the pin, moves the sampler to the head and locks the pin again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from xml.etree import ElementTree

from pydantic import BaseModel, ConfigDict, Field

from ..errors import (
    DeviceTimeout,
    DriverError,
    InstrumentError,
    InvalidParameter,
    NotConnected,
    ProtocolError,
)
from ..links import Links, SerialLink
from ..transports.serial import SerialSession
from .mtsics import Status, parse_status, parse_weight

log = logging.getLogger(__name__)

#: Quantos error codes of ``I <n>`` replies.
QUANTOS_ERRORS: dict[int, str] = {
    1: "not mounted (no dosing head locked in)",
    2: "another job is running",
    3: "timeout",
    4: "not selected",
    5: "not allowed at the moment (front door open, no vial, or no target set)",
    6: "weight not stable",
    7: "powder flow error (the head may be empty)",
    8: "stopped by external action",
    9: "safe position error",
    10: "head not allowed",
    11: "head limit reached (no dosages left)",
    12: "head expiry date reached",
    13: "sampler blocked",
}

#: Protocol limits of the target mass (``QRD 1 1 5``), mg.
TARGET_MIN_MG = 0.10
TARGET_MAX_MG = 250000.0
SAMPLER_POSITIONS = 30
DOOR_POSITIONS = {2: "closed", 3: "open", 8: "not detected", 9: "running"}


class DoserSettings(BaseModel):
    """Configuration of one Quantos."""

    model_config = ConfigDict(extra="forbid")

    #: The real Quantos wants 9600 8N1 with XON/XOFF (``xonxoff: true``).
    link: SerialLink
    #: Wire timeout of settings, queries and the first (``B``) reply of an action, seconds.
    command_timeout_s: float = Field(default=2.0, gt=0)
    #: Longest wait for a dose's final reply, seconds.
    dose_timeout_s: float = Field(default=120.0, gt=0)
    #: Longest wait for a door, sampler or pin move's final reply, seconds.
    move_timeout_s: float = Field(default=30.0, gt=0)
    #: Largest dose the cell allows in one go, mg (the protocol allows up to 250 g).
    max_dose_mg: float = Field(default=5000.0, ge=TARGET_MIN_MG, le=TARGET_MAX_MG)
    #: Per-head limits (sampler position -> mg) overriding ``max_dose_mg``.
    head_max_mg: dict[int, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class HeadInfo:
    """``QRD 2 4 11``: the mounted dosing head."""

    head_id: str
    substance: str
    lot_id: str
    content_mg: float | None
    remaining_mg: float | None
    dose_limit: int | None
    dosing_counter: int | None
    remaining_dosages: int | None


@dataclass(frozen=True)
class SampleData:
    """``QRD 2 4 12``: the last dose."""

    sample_id: str
    substance: str
    target_mg: float | None
    content_mg: float | None
    valid: bool | None


@dataclass(frozen=True)
class DoseResult:
    head: int
    substance: str
    target_mg: float
    dosed_mg: float
    #: The Quantos' own verdict (within its tolerance), when it gave one.
    valid: bool | None


@dataclass
class DoseCheck:
    """What the driver found out after losing a dose's reply."""

    #: A job is still running on the doser (None: could not ask).
    running: bool | None = None
    #: The dosing counter advanced: a dose started (None: could not tell).
    started: bool | None = None
    #: Mass dosed according to the doser's sample data (None: unknown or still dosing).
    dosed_mg: float | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts: list[str] = []
        if self.running:
            parts.append("a dosing job is still running (stop() ends it)")
        if self.started is True:
            parts.append("the dose started (dosing counter advanced)")
        elif self.started is False:
            parts.append("no dose started (dosing counter unchanged)")
        if self.dosed_mg is not None:
            parts.append(f"the doser reports {self.dosed_mg:g} mg dosed")
        parts.extend(self.notes)
        return "; ".join(parts) or "nothing could be found out"


class DoseFailed(InstrumentError):
    """The dose ended with ``I <n>``; ``dosed_mg`` is what the doser reports it delivered."""

    def __init__(
        self, device: str, command: str, code: int | None, message: str,
        head: int, target_mg: float, dosed_mg: float | None,
    ) -> None:
        self.head = head
        self.target_mg = target_mg
        self.dosed_mg = dosed_mg
        amount = "unknown" if dosed_mg is None else f"{dosed_mg:g} mg"
        super().__init__(device, command, code,
                         f"{message}; dosed {amount} of {target_mg:g} mg with head {head}")


class DoseTimeout(DeviceTimeout):
    """No final reply to ``QRA 61 1`` in time; ``check`` says what is known. Not re-sent."""

    def __init__(self, device: str, command: str, timeout: float, check: DoseCheck) -> None:
        self.check = check
        super().__init__(device, command, timeout,
                         f"no final reply to {command!r} within {timeout:g} s; the dose was not "
                         f"re-sent: {check.describe()}")


class DoseGarbled(ProtocolError):
    """A garbled reply to ``QRA 61 1``; ``check`` says what is known. Not re-sent."""

    def __init__(self, device: str, command: str, raw: bytes | None, check: DoseCheck) -> None:
        self.check = check
        super().__init__(device, command,
                         f"garbled reply during the dose; it was not re-sent: {check.describe()}",
                         raw)


class DoseLinkLost(NotConnected):
    """The link dropped during a dose; ``check`` says what is known. Not re-sent."""

    def __init__(self, device: str, command: str, check: DoseCheck) -> None:
        self.check = check
        super().__init__(device, None,
                         f"link lost during {command!r}; the dose was not re-sent: "
                         f"{check.describe()}")
        self.command = command


class _Refused(InstrumentError):
    """An action answered ``I <n>`` at once, without ``B``: it did not start."""


def _mg_text(mg: float) -> str:
    return f"{mg:.3f}".rstrip("0").rstrip(".")


def _float(el: ElementTree.Element, tag: str) -> float | None:
    node = el.find(tag)
    if node is None or node.text is None:
        return None
    return float(node.text)


def _int(el: ElementTree.Element, tag: str) -> int | None:
    node = el.find(tag)
    if node is None or node.text is None:
        return None
    return int(node.text)


def _text(el: ElementTree.Element, tag: str) -> str:
    node = el.find(tag)
    return (node.text or "") if node is not None else ""


class Doser:
    """Protocol client of one Quantos on its serial link."""

    def __init__(self, name: str, settings: DoserSettings, links: Links) -> None:
        self.name = name
        self.settings = settings
        self.port = links.serial_port(name, settings.link)
        #: Sampler position of the head this driver mounted (None: unknown or none).
        self.mounted: int | None = None
        self.target_mg: float | None = None
        self.last_dose: DoseResult | None = None
        self._dosing = False

    # -- checks -----------------------------------------------------------------------------------
    def max_dose_mg(self, head: int) -> float:
        return self.settings.head_max_mg.get(head, self.settings.max_dose_mg)

    def check_dose(self, head: int, mg: float, command: str = "dose") -> None:
        """Raise :class:`InvalidParameter` unless ``head`` and ``mg`` are acceptable."""
        if not isinstance(head, int) or not 1 <= head <= SAMPLER_POSITIONS:
            raise InvalidParameter(
                self.name, command,
                f"head {head!r} is not a sampler position (1..{SAMPLER_POSITIONS})")
        self._check_mg(mg, self.max_dose_mg(head), command, f" for head {head}")

    def _check_mg(self, mg: float, high: float, command: str, what: str = "") -> None:
        if not isinstance(mg, int | float) or not TARGET_MIN_MG <= mg <= high:
            raise InvalidParameter(
                self.name, command,
                f"mass {mg!r} mg is outside {TARGET_MIN_MG:g}..{high:g} mg{what}")

    @staticmethod
    def _positive(name: str, timeout: float | None, default: float, command: str) -> float:
        if timeout is None:
            return default
        if not timeout > 0:
            raise InvalidParameter(name, command, f"timeout must be > 0 s, got {timeout!r} s")
        return timeout

    def _error(self, command: str, st: Status) -> InstrumentError:
        if st.letter == "L":
            return InstrumentError(self.name, command, "L", "parameter not accepted")
        code = st.code
        meaning = QUANTOS_ERRORS.get(code, "unknown error") if code is not None else "not executed"
        return InstrumentError(self.name, command, code, meaning)

    # -- settings and queries ---------------------------------------------------------------------
    async def set_target(self, mg: float) -> None:
        """``QRD 1 1 5 <mg>``: the target of the next dose (idempotent: retried if lost)."""
        cmd = "QRD 1 1 5 (set target)"
        self._check_mg(mg, TARGET_MAX_MG, cmd)
        await self._setting(f"QRD 1 1 5 {_mg_text(mg)}", "QRD 1 1 5", cmd, idempotent=True)
        self.target_mg = float(mg)

    async def _setting(
        self, wire: str, reply_name: str, cmd: str, *, idempotent: bool,
        timeout: float | None = None,
    ) -> Status:
        line = await self.port.query(
            wire, timeout=timeout or self.settings.command_timeout_s, command=cmd,
            idempotent=idempotent,
        )
        st = parse_status(self.name, cmd, line, reply_name)
        if st.letter != "A":
            raise self._error(cmd, st)
        return st

    async def door_position(self) -> str:
        """``QRD 2 3 7``: ``closed``, ``open``, ``running`` or ``not detected``."""
        cmd = "QRD 2 3 7 (door position)"
        st = await self._setting("QRD 2 3 7", "QRD 2 3 7", cmd, idempotent=True)
        if len(st.values) != 1 or not st.values[0].isdigit():
            raise ProtocolError(self.name, cmd, f"unexpected door position {st.values!r}")
        code = int(st.values[0])
        if code not in DOOR_POSITIONS:
            raise ProtocolError(self.name, cmd, f"unknown door position code {code}")
        return DOOR_POSITIONS[code]

    async def _xml(
        self, wire: str, cmd: str, idempotent: bool = True
    ) -> ElementTree.Element | None:
        """A ``B``, XML lines, ``A`` query; None when it answers ``I <n>`` (nothing to show)."""
        done = (f"{wire} A", f"{wire} I", f"{wire} L", "ES", "ET", "EL")
        lines = await self.port.query_lines(
            wire, until=lambda line: line.strip().startswith(done),
            timeout=self.settings.command_timeout_s, command=cmd, idempotent=idempotent,
        )
        first = parse_status(self.name, cmd, lines[0], wire)
        if first.letter == "I":
            return None
        if first.letter != "B" or len(lines) < 3:
            raise ProtocolError(self.name, cmd, f"unexpected reply {lines[0]!r}")
        last = parse_status(self.name, cmd, lines[-1], wire)
        if last.letter != "A":
            raise self._error(cmd, last)
        body = "\n".join(lines[1:-1])
        try:
            return ElementTree.fromstring(body)
        except ElementTree.ParseError as exc:
            raise ProtocolError(self.name, cmd, f"bad XML: {exc}", body.encode()) from exc

    async def head_info(self, *, idempotent: bool = True) -> HeadInfo | None:
        """``QRD 2 4 11``: the mounted head's data; None when no head is mounted."""
        cmd = "QRD 2 4 11 (head data)"
        el = await self._xml("QRD 2 4 11", cmd, idempotent)
        if el is None:
            return None
        try:
            return HeadInfo(
                head_id=_text(el, "Head_ID"), substance=_text(el, "Substance"),
                lot_id=_text(el, "Lot_ID"), content_mg=_float(el, "Content"),
                remaining_mg=_float(el, "Rem._quantity"), dose_limit=_int(el, "Dose_limit"),
                dosing_counter=_int(el, "Dosing_counter"),
                remaining_dosages=_int(el, "Rem._dosages"),
            )
        except ValueError as exc:
            raise ProtocolError(self.name, cmd, f"bad head data: {exc}") from exc

    async def sample_data(self, *, idempotent: bool = True) -> SampleData | None:
        """``QRD 2 4 12``: the last dose's data; None before any dose."""
        cmd = "QRD 2 4 12 (sample data)"
        el = await self._xml("QRD 2 4 12", cmd, idempotent)
        if el is None:
            return None
        validity = _text(el, "Validity")
        try:
            return SampleData(
                sample_id=_text(el, "Sample_ID"), substance=_text(el, "Substance"),
                target_mg=_float(el, "Target_quantity"), content_mg=_float(el, "Content"),
                valid={"Valid": True, "Invalid": False}.get(validity),
            )
        except ValueError as exc:
            raise ProtocolError(self.name, cmd, f"bad sample data: {exc}") from exc

    async def weight_g(self) -> float:
        """``S``: stable net weight on the built-in balance, grams (the last dose, after one)."""
        cmd = "S (stable weight)"
        w = await self.port.query(
            "S", timeout=self.settings.command_timeout_s * 5, command=cmd, idempotent=True,
            parse=lambda line: parse_weight(self.name, cmd, line, "S"),
        )
        return w.grams

    # -- two-phase actions ------------------------------------------------------------------------
    async def _action(
        self, s: SerialSession, wire: str, reply_name: str, cmd: str, timeout: float
    ) -> Status:
        """Send a two-phase action in the held session; return its final status (``A``).

        ``I <n>`` (at once or at the end) raises :class:`InstrumentError`. A lost ``B`` is not
        an error by itself: the final reply is awaited until ``timeout`` either way.
        """
        deadline = time.monotonic() + timeout
        try:
            line: str | None = await s.query(wire, timeout=self.settings.command_timeout_s,
                                             command=cmd)
        except DeviceTimeout:
            line = None  # B lost (or very late): wait for the final reply all the same
        started = line is None  # unknown, so never "refused at once"
        while True:
            if line is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeviceTimeout(self.name, cmd, timeout,
                                        f"no final reply to {cmd!r} within {timeout:g} s")
                line = await s.read_line(timeout=remaining, command=cmd)
            if wire != "QRA 61 4" and line.startswith("QRA 61 4 "):  # a stop sent meanwhile
                line = None
                continue
            try:
                st = parse_status(self.name, cmd, line, reply_name)
            except InstrumentError as exc:  # ES / ET / EL
                if started:
                    raise
                raise _Refused(self.name, cmd, exc.code, exc.message) from exc
            if st.letter in ("I", "L"):
                err = self._error(cmd, st)
                if started:
                    raise err
                raise _Refused(self.name, cmd, err.code, err.message)
            if st.letter == "A":
                return st
            if st.letter != "B":
                raise ProtocolError(self.name, cmd, f"unexpected status {st.letter!r}",
                                    line.encode())
            started = True
            line = None

    async def door(self, open: bool, timeout: float | None = None) -> None:
        """``QRA 60 7 3|2``: open or close the front door; returns when it is there.

        A lost or garbled reply is checked with ``QRD 2 3 7``: the call succeeds if the door is
        where it was asked to go (a door move is idempotent in effect), else it raises.
        """
        want = "open" if open else "closed"
        cmd = f"QRA 60 7 {3 if open else 2} ({want} door)"
        t = self._positive(self.name, timeout, self.settings.move_timeout_s, cmd)
        try:
            async with self.port.session() as s:
                await self._action(s, f"QRA 60 7 {3 if open else 2}", "QRA 60 7", cmd, t)
        except (DeviceTimeout, ProtocolError, NotConnected) as exc:
            where = await self._door_settled(t)
            if where == want:
                log.warning("%s: %s lost its reply (%s) but the door is %s", self.name, cmd,
                            exc.detail, where)
                return
            raise type(exc)(*_rebuild(exc, f"the door is {where}")) from exc

    async def _door_settled(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        try:
            while True:
                where = await self.door_position()
                if where != "running" or time.monotonic() > deadline:
                    return where
                await asyncio.sleep(0.1)
        except DriverError as exc:
            return f"unknown (QRD 2 3 7 failed: {exc.detail})"

    async def sampler(self, position: int, timeout: float | None = None) -> None:
        """``QRA 60 8 <0..30>``: move the sampler (0 is home). Not checkable after a lost reply:
        raises, and the mounted head becomes unknown."""
        cmd = f"QRA 60 8 {position} (sampler)"
        if not isinstance(position, int) or not 0 <= position <= SAMPLER_POSITIONS:
            raise InvalidParameter(self.name, "QRA 60 8 (sampler)",
                                   f"position {position!r} is outside 0..{SAMPLER_POSITIONS}")
        t = self._positive(self.name, timeout, self.settings.move_timeout_s, cmd)
        try:
            async with self.port.session() as s:
                await self._action(s, f"QRA 60 8 {position}", "QRA 60 8", cmd, t)
        except (DeviceTimeout, ProtocolError, NotConnected):
            self.mounted = None
            raise

    async def pin(self, lock: bool, timeout: float | None = None) -> None:
        """``QRA 60 2 4|3``: lock (mount the head at the sampler position) or unlock the pin.

        A lost or garbled reply is checked with ``QRD 2 4 11`` (mounted or not).
        """
        cmd = f"QRA 60 2 {4 if lock else 3} ({'lock' if lock else 'unlock'} pin)"
        t = self._positive(self.name, timeout, self.settings.move_timeout_s, cmd)
        try:
            async with self.port.session() as s:
                await self._action(s, f"QRA 60 2 {4 if lock else 3}", "QRA 60 2", cmd, t)
        except (DeviceTimeout, ProtocolError, NotConnected) as exc:
            try:
                mounted = await self.head_info() is not None
            except DriverError as check:
                raise type(exc)(*_rebuild(exc, f"checking failed: {check.detail}")) from exc
            if mounted == lock:
                log.warning("%s: %s lost its reply but took effect", self.name, cmd)
                return
            raise type(exc)(*_rebuild(exc, "the head is " + ("" if mounted else "not ")
                                      + "mounted")) from exc

    async def mount(self, head: int) -> HeadInfo:
        """Mount the head at sampler position ``head`` (unlocking another one first)."""
        if not isinstance(head, int) or not 1 <= head <= SAMPLER_POSITIONS:
            raise InvalidParameter(self.name, "mount",
                                   f"head {head!r} is not a sampler position (1..30)")
        current = await self.head_info()
        if current is not None and self.mounted == head:
            return current
        self.mounted = None
        if current is not None:
            await self.pin(lock=False)
        await self.sampler(head)
        await self.pin(lock=True)
        info = await self.head_info()
        if info is None:
            raise InstrumentError(self.name, "mount", 1,
                                  f"no head mounted after locking the pin at position {head}")
        self.mounted = head
        return info

    async def unmount(self) -> None:
        await self.pin(lock=False)
        self.mounted = None

    async def stop(self) -> None:
        """``QRA 61 4``: stop a running dose (it then ends with ``I 8``).

        While :meth:`dose` holds the link waiting for its final reply, the stop is written past
        the link's lock and its replies are skipped by the waiting dose.
        """
        if self._dosing:
            await self.port.write_realtime(b"QRA 61 4\r\n", command="QRA 61 4 (stop)")
            return
        async with self.port.session() as s:
            await self._action(s, "QRA 61 4", "QRA 61 4", "QRA 61 4 (stop)",
                               self.settings.command_timeout_s)

    async def safe_state(self) -> None:
        """Stop any dose, then close the front door (both are tried; the first error is raised).

        Closing the door assumes nothing (a gripper) is in the doorway: the daemon's safety layer
        calls this once motion has stopped.
        """
        errors: list[DriverError] = []
        try:
            await self.stop()
        except DriverError as exc:
            errors.append(exc)
        deadline = time.monotonic() + self.settings.dose_timeout_s
        while self._dosing and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the dose sees its I 8 and releases the link
        try:
            await self.door(open=False)
        except DriverError as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    # -- dosing -----------------------------------------------------------------------------------
    async def dose(self, head: int, mg: float, timeout: float | None = None) -> DoseResult:
        """Dose ``mg`` of the powder in ``head`` into the vial; return what was delivered.

        Mounts the head if needed, sets the target, starts ``QRA 61 1`` and follows its two-phase
        reply for up to ``timeout`` (default ``dose_timeout_s``). ``I <n>`` raises
        :class:`DoseFailed` with the code, its meaning and the mass dosed anyway (``I 7``: the
        head ran out). A lost/garbled reply raises :class:`DoseTimeout` / :class:`DoseGarbled` /
        :class:`DoseLinkLost` with what the instrument says happened; ``QRA 61 1`` is never
        re-sent.
        """
        cmd = "QRA 61 1 (dose)"
        self.check_dose(head, mg, cmd)
        t = self._positive(self.name, timeout, self.settings.dose_timeout_s, cmd)
        info = await self.mount(head)
        if info.remaining_mg is not None and info.remaining_mg < mg:
            log.warning("%s: head %d reports %g mg left, less than the %g mg asked", self.name,
                        head, info.remaining_mg, mg)
        await self.set_target(mg)
        counter = info.dosing_counter
        self._dosing = True
        lost: DriverError | None = None
        try:
            async with self.port.session() as s:
                await self._action(s, "QRA 61 1", "QRA 61 1", cmd, t)
        except _Refused as exc:  # did not start: nothing dosed
            self._dosing = False
            raise DoseFailed(self.name, cmd, exc.code, exc.message, head, float(mg),
                             0.0) from exc
        except InstrumentError as exc:
            self._dosing = False
            dosed = await self._dosed_after_failure(counter)
            raise DoseFailed(self.name, cmd, exc.code, exc.message, head, float(mg),
                             dosed) from exc
        except (DeviceTimeout, ProtocolError, NotConnected) as exc:
            lost = exc
        finally:
            self._dosing = False
        if lost is not None:
            check = await self._investigate(counter, float(mg))
            if isinstance(lost, DeviceTimeout):
                raise DoseTimeout(self.name, cmd, t, check) from lost
            if isinstance(lost, ProtocolError):
                raise DoseGarbled(self.name, cmd, lost.raw, check) from lost
            raise DoseLinkLost(self.name, cmd, check) from lost
        dosed_mg, valid = await self._dosed_after_success(cmd)
        result = DoseResult(head=head, substance=info.substance, target_mg=float(mg),
                            dosed_mg=dosed_mg, valid=valid)
        self.last_dose = result
        return result

    async def _dosed_after_success(self, cmd: str) -> tuple[float, bool | None]:
        try:
            sample = await self.sample_data()
            if sample is not None and sample.content_mg is not None:
                return sample.content_mg, sample.valid
            raise ProtocolError(self.name, "QRD 2 4 12", "no sample data after a dose")
        except DriverError as first:
            try:
                return await self.weight_g() * 1000.0, None
            except DriverError as second:
                raise type(second)(*_rebuild(
                    second, f"the dose completed ({cmd} A) but its mass could not be read "
                    f"(sample data: {first.detail})")) from second

    async def _dosed_after_failure(self, counter_before: int | None) -> float | None:
        """Mass dosed by a dose that ended with ``I <n>``: 0 if the head's dosing counter did
        not advance (it never started dispensing), else the sample data's ``Content``."""
        try:
            info = await self.head_info()
            if (info is not None and info.dosing_counter is not None
                    and counter_before is not None and info.dosing_counter == counter_before):
                return 0.0
            sample = await self.sample_data()
        except DriverError as exc:
            log.warning("%s: cannot read the failed dose's data: %s", self.name, exc)
            return None
        return sample.content_mg if sample is not None else None

    async def _investigate(self, counter_before: int | None, target_mg: float) -> DoseCheck:
        """After a lost dose reply: ask (once each, no retries) what happened."""
        check = DoseCheck()
        try:
            try:
                await self._setting(f"QRD 1 1 5 {_mg_text(target_mg)}", "QRD 1 1 5",
                                    "QRD 1 1 5 (job probe)", idempotent=False)
                check.running = False
            except InstrumentError as exc:
                if exc.code != 2:
                    raise
                check.running = True
            info = await self.head_info(idempotent=False)
            if info is not None and info.dosing_counter is not None and counter_before is not None:
                check.started = info.dosing_counter > counter_before
            if check.started and not check.running:
                sample = await self.sample_data(idempotent=False)
                if sample is not None:
                    check.dosed_mg = sample.content_mg
        except DriverError as exc:
            check.notes.append(f"could not ask the doser ({exc.detail})")
        return check


def _rebuild(exc: DriverError, extra: str) -> tuple[object, ...]:
    """Constructor arguments to re-raise ``exc``'s class with ``extra`` added to its detail."""
    detail = f"{exc.detail}; {extra}"
    if isinstance(exc, DeviceTimeout):
        return (exc.device, exc.command, exc.timeout, detail)
    if isinstance(exc, ProtocolError):
        return (exc.device, None, detail, exc.raw)
    if isinstance(exc, InstrumentError):
        return (exc.device, exc.command, exc.code, f"{exc.message}; {extra}")
    return (exc.device, None, detail)
