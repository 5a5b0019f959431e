"""Mettler Toledo XS/XPR analytical balance over MT-SICS (serial): protocol client.

Commands used (MT-SICS level 0/1; reply parsing in :mod:`drivers.instruments.mtsics`)::

    S    -> S S <w> <unit>   stable weight      (S I no stable value in time, S + / S - over/under)
    SI   -> S S|D <w> <unit> immediate weight, stable or dynamic
    Z    -> Z A              zero               (Z I busy/unstable, Z + / Z - outside zero range)
    T    -> T S <w> <unit>   tare; the tare weight
    TA   -> TA A <w> <unit>  the tare memory;  TAC -> TAC A clears it
    I2   -> I2 A "<model> <capacity> <unit>";  I4 -> I4 A "<serial number>"

Weights are returned in grams whatever unit the balance shows (g, mg, kg, µg), and
:attr:`Balance.decimals` remembers how many decimals of a gram it prints (its readability).

Retries and world-changing commands:

* ``S``, ``SI``, ``TA``, ``I2``, ``I4`` are reads: retried by the transport on a lost or garbled
  reply (``idempotent=True``). A retried ``S`` is harmless: the balance answers commands in order.
* ``Z`` and ``T`` change what later readings mean. Repeating them is harmless *if nothing moved on
  the pan in between*, which the driver cannot know, so they are sent once. If the reply is lost
  or garbled, the driver asks the balance what happened instead: it sends ``SI`` (which the balance
  executes after the pending ``Z``/``T``, so it sees the result) and, when the reading is stable
  and within two digits of zero, the zero/tare is in effect and the call succeeds (``tare``
  returns the tare memory, read with ``TA``). Otherwise the original error is raised with what the
  balance showed. The postcondition is what the caller wanted, so this is a proof, not a guess.
* ``S I`` is not retried either: the balance had no stable value for its whole stability timeout
  (draught, vibration, a vial still moving), and asking again rarely helps; the caller decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
from .mtsics import Weight, check_reply, decimals, parse_status, parse_weight

log = logging.getLogger(__name__)


class BalanceSettings(BaseModel):
    """Configuration of one balance."""

    model_config = ConfigDict(extra="forbid")

    link: SerialLink
    #: Wire timeout of quick commands (SI, TA, I2, I4), seconds.
    command_timeout_s: float = Field(default=2.0, gt=0)
    #: Wire timeout of commands that wait for a stable weight (S, Z, T), seconds. Make it longer
    #: than the balance's own stability timeout, so the balance's ``S I`` arrives before ours.
    stable_timeout_s: float = Field(default=15.0, gt=0)
    #: Readability (d) in grams, for the precision of readings; None: learnt from the replies.
    readability_g: float | None = Field(default=None, gt=0)


@dataclass(frozen=True)
class BalanceIdentity:
    model: str
    capacity_g: float | None
    serial_number: str


_ZERO_MEANING = {
    "I": "not executed: the balance is busy or unstable (no stable weight in time)",
    "+": "upper limit of the zero-setting range exceeded (too much load on the pan)",
    "-": "lower limit of the zero-setting range exceeded (weighing pan missing?)",
}
_TARE_MEANING = {
    "I": "not executed: the balance is busy or unstable (no stable weight in time)",
    "+": "overload: the load is above the balance's capacity",
    "-": "underload: the load is below the tare range (weighing pan missing?)",
}


class Balance:
    """Protocol client of one MT-SICS balance on its serial link."""

    def __init__(self, name: str, settings: BalanceSettings, links: Links) -> None:
        self.name = name
        self.settings = settings
        self.port = links.serial_port(name, settings.link)
        #: Decimal places of a gram the balance prints (None until the first weight reply).
        self.decimals: int | None = (
            decimals(repr(settings.readability_g)) if settings.readability_g else None
        )

    def _learn(self, w: Weight) -> Weight:
        if self.settings.readability_g is None:
            self.decimals = w.decimals
        return w

    def _timeout(self, cmd: str, timeout: float | None) -> float:
        if timeout is None:
            return self.settings.stable_timeout_s
        if not timeout > 0:
            raise InvalidParameter(self.name, cmd, f"timeout must be > 0 s, got {timeout!r} s")
        return timeout

    # -- reads ------------------------------------------------------------------------------------
    async def stable_weight(self, timeout: float | None = None) -> float:
        """``S``: the next stable net weight in grams.

        Raises :class:`InstrumentError` code ``I`` when the balance found no stable value within
        its stability timeout, ``+``/``-`` on overload/underload; :class:`DeviceTimeout` when
        nothing came within ``timeout`` (default ``stable_timeout_s``).
        """
        t = self._timeout("S (stable weight)", timeout)
        w = await self.port.query(
            "S", timeout=t, command="S (stable weight)", idempotent=True,
            parse=lambda line: parse_weight(self.name, "S (stable weight)", line, "S"),
        )
        return self._learn(w).grams

    async def immediate_weight(self) -> Weight:
        """``SI``: the weight now, stable or not (:attr:`Weight.stable`), in grams."""
        w = await self.port.query(
            "SI", timeout=self.settings.command_timeout_s, command="SI (immediate weight)",
            idempotent=True,
            parse=lambda line: parse_weight(self.name, "SI (immediate weight)", line, "S"),
        )
        return self._learn(w)

    async def tare_value(self) -> float:
        """``TA``: the tare memory, grams (0 when no tare is set)."""
        cmd = "TA (tare value)"

        def parse(line: str) -> float:
            fields = check_reply(self.name, cmd, line, "TA")
            if len(fields) != 3 or fields[0] != "A":
                raise ProtocolError(self.name, cmd, "not a tare value reply", line.encode())
            return parse_weight(self.name, cmd, f"S S {fields[1]} {fields[2]}").grams

        value: float = await self.port.query(
            "TA", timeout=self.settings.command_timeout_s, command=cmd, idempotent=True,
            parse=parse,
        )
        return value

    async def identity(self) -> BalanceIdentity:
        """``I2`` and ``I4``: model, capacity (grams, when the balance states it), serial."""
        t = self.settings.command_timeout_s

        def text(cmd: str, line: str) -> str:
            fields = check_reply(self.name, cmd, line, cmd)
            if len(fields) != 2 or fields[0] != "A":
                raise ProtocolError(self.name, cmd, "expected '<cmd> A \"<text>\"'", line.encode())
            return fields[1]

        i2 = await self.port.query("I2", timeout=t, idempotent=True,
                                   parse=lambda line: text("I2", line))
        i4 = await self.port.query("I4", timeout=t, idempotent=True,
                                   parse=lambda line: text("I4", line))
        parts = i2.split()
        capacity: float | None = None
        model = i2
        if len(parts) >= 3:
            try:
                w = parse_weight(self.name, "I2", f"S S {parts[-2]} {parts[-1]}")
            except DriverError:
                pass
            else:
                capacity, model = w.grams, " ".join(parts[:-2])
        return BalanceIdentity(model=model, capacity_g=capacity, serial_number=i4)

    # -- world-changing commands ------------------------------------------------------------------
    async def zero(self, timeout: float | None = None) -> None:
        """``Z``: set the zero once the weight is stable (clears the tare).

        ``Z I`` -> :class:`InstrumentError` code ``I`` ("not executed, balance busy/unstable");
        ``Z +``/``Z -`` -> outside the zero-setting range. A lost or garbled reply is checked with
        ``SI`` (see the module docstring), never by sending ``Z`` again.
        """
        cmd = "Z (zero)"
        t = self._timeout(cmd, timeout)
        try:
            line = await self.port.query("Z", timeout=t, command=cmd)
            st = parse_status(self.name, cmd, line, "Z")
        except (DeviceTimeout, ProtocolError) as exc:
            await self._confirm(cmd, "Z", exc)
            return
        self._check_zero_tare(cmd, st.letter, _ZERO_MEANING)

    async def tare(self, timeout: float | None = None) -> float:
        """``T``: tare once the weight is stable; returns the tare weight in grams.

        ``T I`` / ``T +`` / ``T -`` -> :class:`InstrumentError` with that code. A lost or garbled
        reply is checked with ``SI`` and ``TA``, never by sending ``T`` again.
        """
        cmd = "T (tare)"
        t = self._timeout(cmd, timeout)
        try:
            line = await self.port.query("T", timeout=t, command=cmd)
            fields = check_reply(self.name, cmd, line, "T")
            if len(fields) == 1:
                self._check_zero_tare(cmd, fields[0], _TARE_MEANING)
            w = parse_weight(self.name, cmd, line, "T")
        except (DeviceTimeout, ProtocolError) as exc:
            await self._confirm(cmd, "T", exc)
            return await self.tare_value()
        return self._learn(w).grams

    async def clear_tare(self) -> None:
        """``TAC``: clear the tare memory. Idempotent (clearing twice is clearing once)."""
        cmd = "TAC (clear tare)"
        line = await self.port.query("TAC", timeout=self.settings.command_timeout_s,
                                     command=cmd, idempotent=True)
        st = parse_status(self.name, cmd, line, "TAC")
        if st.letter != "A":
            raise InstrumentError(self.name, cmd, st.letter, "tare not cleared")

    def _check_zero_tare(self, cmd: str, letter: str, meanings: dict[str, str]) -> None:
        if letter in meanings:
            raise InstrumentError(self.name, cmd, letter, meanings[letter])
        if letter not in ("A", "S"):
            raise ProtocolError(self.name, cmd, f"unexpected status {letter!r}")

    async def _confirm(self, cmd: str, name: str, exc: DriverError) -> None:
        """After a lost/garbled reply to ``Z``/``T``: prove the result from ``SI``, or re-raise.

        The balance executes commands in order, so ``SI`` is answered after the pending
        ``Z``/``T``; a late reply to that command may arrive first and is read here.
        """
        seen = "no answer to SI"
        try:
            async with self.port.session() as s:
                line = await s.query("SI", timeout=self.settings.stable_timeout_s,
                                     command=f"SI (checking {cmd})")
                if line.startswith(name + " "):  # the late reply to Z / T itself
                    letter = line.split()[1]
                    if letter not in ("A", "S"):
                        meanings = _ZERO_MEANING if name == "Z" else _TARE_MEANING
                        raise InstrumentError(self.name, cmd, letter, meanings.get(letter, line))
                    log.warning("%s: the reply to %s came late; it worked", self.name, cmd)
                    await s.read_line(timeout=self.settings.command_timeout_s)  # SI's reply
                    return
                w = parse_weight(self.name, f"SI (checking {cmd})", line, "S")
        except InstrumentError:
            raise
        except (DeviceTimeout, ProtocolError, NotConnected) as check_exc:
            seen = f"checking with SI failed too ({check_exc.detail})"
        else:
            places = w.decimals
            if w.stable and abs(w.grams) <= 2 * 10.0**-places:
                log.warning("%s: reply to %s lost (%s); SI reads %.*f g stable: it took effect",
                            self.name, cmd, exc.detail, places, w.grams)
                return
            seen = f"SI reads {w.grams:.{places}f} g, {'stable' if w.stable else 'dynamic'}"
        detail = f"{exc.detail}; {cmd} was not repeated and its effect is unknown: {seen}"
        if isinstance(exc, DeviceTimeout):
            raise DeviceTimeout(self.name, cmd, exc.timeout, detail) from exc
        raise ProtocolError(self.name, cmd, detail, getattr(exc, "raw", None)) from exc

    async def reset(self) -> str:
        """``@``: cancel pending commands (and clears the tare); returns the serial number."""
        cmd = "@ (reset)"

        def parse(line: str) -> str:
            fields = check_reply(self.name, cmd, line, "I4")
            if len(fields) != 2 or fields[0] != "A":
                raise ProtocolError(self.name, cmd, "expected 'I4 A \"<sn>\"'", line.encode())
            return fields[1]

        sn: str = await self.port.query("@", timeout=self.settings.command_timeout_s,
                                        command=cmd, parse=parse)
        return sn
