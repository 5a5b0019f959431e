"""MT-SICS (Mettler Toledo Standard Interface Command Set) served over a serial line.

Shared by the balance (:mod:`hardware_sims.balance`) and the Quantos doser
(:mod:`hardware_sims.doser`), whose internal balance speaks the same level 0/1 commands.

Framing, as in the MT-SICS reference manual: ASCII, commands in upper case, fields separated by
one space, strings in double quotes, every line (command and reply) ends CR LF. A bare CR or LF
also ends a command line (an empty line between them is ignored).

Commands served by :class:`SicsWeigher` (``<w>`` is the weight right-aligned in a 10-character
field, rounded to the readability, then a space and the unit ``g``)::

    @            -> I4 A "<sn>"              reset: cancels pending commands and SIR, clears tare
    I1           -> I1 A "01" "2.30" "2.30" "" ""    level 0 and 1 implemented, versions
    I2           -> I2 A "<model> <capacity> g"
    I3           -> I3 A "<software version>"
    I4           -> I4 A "<sn>"
    S            -> S S <w> g    stable net weight; waits for stability up to stable_timeout_s
                 -> S I          no stable value in time (or busy)
                 -> S +  / S -   overload (gross above capacity) / underload (pan removed)
    SI           -> S S <w> g | S D <w> g | S + | S -      immediate, stable or dynamic
    SIR          -> SI replies repeated at the update rate, until any other command or @
    Z            -> Z A | Z I | Z + | Z -   zero once stable; +/-: outside the zero-setting range
                    (±2 % of capacity around the power-on zero); zeroing clears the tare
    ZI           -> ZI S | ZI D             zero at once, whether stable (S) or not (D)
    T            -> T S <w> g | T I | T + | T -    tare once stable
    TA           -> TA A <w> g              tare memory;  TA <value> g presets it
    TAC          -> TAC A                   clear the tare
    anything else                      -> ES   (syntax error: unknown command, bad arity)
    bytes that are not printable ASCII -> ET   (transmission error, e.g. line noise, parity)
    a parameter that is wrong          -> <cmd> L   (e.g. TA abc)

Commands are executed one after the other, in the order received (a waiting ``S`` delays what
follows, as on the instrument); ``@`` jumps the queue. A device-specific table of further commands
(the Quantos ``QRA``/``QRD``) is plugged in with :meth:`SicsWeigher.add_command`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

from .clock import VirtualClock
from .serial_link import LineDevice

log = logging.getLogger(__name__)

CRLF = "\r\n"
#: Width of the weight field in weight replies (``S S     100.00 g``).
WEIGHT_FIELD = 10
#: Zero-setting range around the power-on zero, as a fraction of capacity (typical: ±2 %).
ZERO_RANGE = 0.02
#: Mass of the weighing pan (g): taking it off drives the load cell into underload.
PAN_MASS_G = 35.0
#: How often the load cell looks at the world for a load change (virtual s; at least 10 ms wall).
SAMPLE_S = 0.05
SAMPLE_MIN_WALL_S = 0.01

Handler = Callable[[list[str]], Awaitable[None]]


class TransmissionError(ValueError):
    """A command line with bytes that cannot be MT-SICS (answered ``ET``)."""


def split_command(line: bytes) -> list[str]:
    """Tokens of one MT-SICS command line: fields split on spaces, ``"..."`` kept whole.

    Raises :class:`TransmissionError` for bytes outside printable ASCII (the instrument answers
    ``ET``) and :class:`ValueError` for an unterminated string (answered ``ES``).
    """
    if any(b > 0x7E or (b < 0x20 and b != 0x09) for b in line):
        raise TransmissionError(line)
    text = line.decode("ascii")
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise ValueError("unterminated string")
            tokens.append(text[i + 1 : end])
            i = end + 1
        else:
            j = i
            while j < n and text[j] not in " \t":
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


def decimals_of(readability_g: float) -> int:
    """Decimal places shown for a readability ``d`` (0.0001 -> 4, 0.01 -> 2, 1 -> 0)."""
    exponent = Decimal(repr(readability_g)).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def round_to(value: float, readability_g: float) -> float:
    return round(value / readability_g) * readability_g


def format_weight(value_g: float, readability_g: float) -> str:
    """The weight field: rounded to ``d`` and right-aligned in 10 characters."""
    text = f"{round_to(value_g, readability_g):.{decimals_of(readability_g)}f}"
    if text.startswith("-") and float(text) == 0.0:
        text = text[1:]
    return text.rjust(WEIGHT_FIELD)


@dataclass
class Reading:
    """One look at the load cell."""

    net_g: float
    gross_g: float  # load relative to the power-on zero
    stable: bool
    overload: bool
    underload: bool


class LoadCell:
    """A weighing cell: the true load (from the world) as the balance displays it.

    After the load changes the reading moves from the old value to the new one over ``settle_s``
    virtual seconds (``(1 - s)**3`` of the step left at fraction ``s`` of the time), with extra
    jitter while it moves; then it is stable: the true load plus Gaussian noise ``noise_g``, rounded
    to the readability when formatted. Zero and tare are offsets on top of that.
    """

    def __init__(
        self,
        clock: VirtualClock,
        rng: random.Random,
        load: Callable[[], float],
        *,
        capacity_g: float,
        readability_g: float,
        noise_g: float,
        settle_s: float,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self._load = load
        self.capacity_g = capacity_g
        self.readability_g = readability_g
        self.noise_g = noise_g
        self.settle_s = settle_s
        self.zero_g = 0.0
        self.tare_g = 0.0
        self._target = load()
        self._from = self._target
        self._changed = -math.inf
        self._watcher: asyncio.Task[None] | None = None

    # -- load tracking -------------------------------------------------------------------------
    def track(self, disturbed: bool = False) -> None:
        """Look at the true load now; a change starts a new settling phase.

        ``disturbed``: the load is being changed right now (powder falling into the vial), so
        the reading is unstable even if the change so far is below the readability.
        """
        now = self.clock.now()
        load = self._load()
        if disturbed or abs(load - self._target) > self.readability_g / 2:
            self._from = self._mean(now)
            self._target = load
            self._changed = now

    def _mean(self, now: float) -> float:
        dt = now - self._changed
        if self.settle_s <= 0 or dt >= self.settle_s:
            return self._target
        left = (1.0 - dt / self.settle_s) ** 3
        return self._target + (self._from - self._target) * left

    def settles_in(self) -> float:
        """Virtual seconds until the reading is stable (0: it is)."""
        self.track()
        return max(0.0, self._changed + self.settle_s - self.clock.now())

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="loadcell-watch")

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        # A sensor's sampling period: world changes made by other simulators (a crucible put on
        # the pan) start the settling phase within one period of when they happened.
        while True:
            self.track()
            await asyncio.sleep(max(self.clock.to_wall(SAMPLE_S), SAMPLE_MIN_WALL_S))

    # -- reading -------------------------------------------------------------------------------
    def true_gross(self) -> float:
        return self._load()

    def read(self) -> Reading:
        self.track()
        now = self.clock.now()
        stable = self.settle_s <= 0 or now - self._changed >= self.settle_s
        sd = self.noise_g if stable else max(10 * self.noise_g, 2 * self.readability_g)
        raw = self._mean(now) + (self.rng.gauss(0.0, sd) if sd > 0 else 0.0)
        gross = raw - self.zero_g
        return Reading(
            net_g=gross - self.tare_g,
            gross_g=gross,
            stable=stable,
            overload=raw > self.capacity_g,
            underload=raw < -ZERO_RANGE * self.capacity_g,
        )

    async def wait_stable(self, timeout_s: float) -> Reading:
        """Wait (virtual time) until the reading is stable, or ``timeout_s`` passed."""
        deadline = self.clock.now() + timeout_s
        while True:
            reading = self.read()
            if reading.stable or reading.overload or reading.underload:
                return reading
            left = deadline - self.clock.now()
            if left <= 0:
                return reading
            await self.clock.sleep(min(self.settles_in() + 1e-3, left))


class SicsWeigher(LineDevice):
    """MT-SICS level 0/1 over a :class:`~hardware_sims.serial_link.SerialEndpoint`.

    ``error_reply`` is asked before each command: if it returns a reply, that is sent instead
    of executing the command (used for the ``error`` fault). ``on_reset`` is called on ``@``.
    """

    def __init__(
        self,
        cell: LoadCell,
        *,
        model: str,
        serial_number: str,
        software: str,
        stable_timeout_s: float,
        baudrate: int,
        update_s: float = 0.1,
        error_reply: Callable[[str], str | None] | None = None,
        on_reset: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.model = model
        self.serial_number = serial_number
        self.software = software
        self.stable_timeout_s = stable_timeout_s
        self.baudrate = baudrate
        self.update_s = update_s
        self.error_reply = error_reply
        self.on_reset = on_reset
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._current: asyncio.Task[None] | None = None
        self._stream: asyncio.Task[None] | None = None
        self.commands: dict[str, Handler] = {
            "I1": self._i1,
            "I2": self._i2,
            "I3": self._i3,
            "I4": self._i4,
            "S": self._s,
            "SI": self._si,
            "SIR": self._sir,
            "Z": self._z,
            "ZI": self._zi,
            "T": self._t,
            "TA": self._ta,
            "TAC": self._tac,
        }
        self.commands_seen = 0

    def add_command(self, name: str, handler: Handler) -> None:
        self.commands[name] = handler

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="mtsics-worker")

    async def stop(self) -> None:
        for task in (self._stream, self._current, self._worker):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def on_connect(self) -> None:
        self._buf.clear()  # a half line from before the cable was pulled is gone

    @property
    def streaming(self) -> bool:
        return self._stream is not None and not self._stream.done()

    # -- input ---------------------------------------------------------------------------------
    async def on_line(self, line: bytes) -> None:
        # Runs synchronously from the byte handler: order of arrival is kept.
        self.commands_seen += 1
        self._stop_stream()  # SIR ends with whatever comes next
        if line.strip() == b"@":
            while not self._queue.empty():
                self._queue.get_nowait()
            if self._current is not None:
                self._current.cancel()
        self._queue.put_nowait(line)

    async def on_overflow(self) -> None:
        self.reply("ET")

    def _stop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def _work(self) -> None:
        while True:
            line = await self._queue.get()
            self._current = asyncio.create_task(self._execute(line))
            try:
                await self._current
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # the worker itself is stopping
                # else: the command was cancelled by @
            except Exception:  # a simulator bug must not stop the command loop
                log.exception("MT-SICS command %r failed", line)
            finally:
                self._current = None

    async def _execute(self, line: bytes) -> None:
        try:
            tokens = split_command(line)
        except TransmissionError:
            self.reply("ET")
            return
        except ValueError:
            self.reply("ES")
            return
        if not tokens:
            return
        name, args = tokens[0], tokens[1:]
        if self.error_reply is not None:
            forced = self.error_reply(name)
            if forced is not None:
                self.reply(forced)
                return
        if name == "@":
            await self._reset(args)
            return
        handler = self.commands.get(name)
        if handler is None:
            self.reply("ES")
            return
        await handler(args)

    # -- output --------------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        self.endpoint.write((text + CRLF).encode("ascii"))

    def weight_line(self, cmd: str, reading: Reading, value_g: float | None = None) -> str:
        status = "S" if reading.stable else "D"
        value = reading.net_g if value_g is None else value_g
        return f"{cmd} {status} {format_weight(value, self.cell.readability_g)} g"

    def capacity_text(self) -> str:
        return f"{self.cell.capacity_g:.{decimals_of(self.cell.readability_g)}f} g"

    # -- level 0/1 commands --------------------------------------------------------------------
    async def _reset(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
            return
        self.cell.tare_g = 0.0
        if self.on_reset is not None:
            self.on_reset()
        self.reply(f'I4 A "{self.serial_number}"')

    async def _i1(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
        else:
            self.reply(f'I1 A "01" "{self.software}" "{self.software}" "" ""')

    async def _i2(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
        else:
            self.reply(f'I2 A "{self.model} {self.capacity_text()}"')

    async def _i3(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
        else:
            self.reply(f'I3 A "{self.software}"')

    async def _i4(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
        else:
            self.reply(f'I4 A "{self.serial_number}"')

    async def _s(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
            return
        reading = await self.cell.wait_stable(self.stable_timeout_s)
        if reading.overload:
            self.reply("S +")
        elif reading.underload:
            self.reply("S -")
        elif not reading.stable:
            self.reply("S I")
        else:
            self.reply(self.weight_line("S", reading))

    def _immediate_line(self) -> str:
        reading = self.cell.read()
        if reading.overload:
            return "S +"
        if reading.underload:
            return "S -"
        return self.weight_line("S", reading)

    async def _si(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
        else:
            self.reply(self._immediate_line())

    async def _sir(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
            return
        self._stop_stream()
        self._stream = asyncio.create_task(self._repeat(), name="mtsics-sir")

    async def _repeat(self) -> None:
        while True:
            line = self._immediate_line()
            self.reply(line)
            # The update rate, but never faster than the line can carry the reply (10 bits/byte).
            wire_s = (len(line) + 2) * 10 / self.baudrate
            await asyncio.sleep(max(self.cell.clock.to_wall(self.update_s), wire_s))

    async def _z(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
            return
        reading = await self.cell.wait_stable(self.stable_timeout_s)
        if not reading.stable:
            self.reply("Z I")
            return
        self._zero(reading, "Z", "A")

    async def _zi(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
            return
        reading = self.cell.read()
        self._zero(reading, "ZI", "S" if reading.stable else "D")

    def _zero(self, reading: Reading, cmd: str, ok: str) -> None:
        raw = reading.gross_g + self.cell.zero_g  # relative to the power-on zero
        limit = ZERO_RANGE * self.cell.capacity_g
        if raw > limit:
            self.reply(f"{cmd} +")
        elif raw < -limit:
            self.reply(f"{cmd} -")
        else:
            self.cell.zero_g = raw
            self.cell.tare_g = 0.0
            self.reply(f"{cmd} {ok}")

    async def _t(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
            return
        reading = await self.cell.wait_stable(self.stable_timeout_s)
        if reading.overload:
            self.reply("T +")
        elif reading.underload or reading.gross_g < -ZERO_RANGE * self.cell.capacity_g:
            self.reply("T -")
        elif not reading.stable:
            self.reply("T I")
        else:
            self.cell.tare_g = round_to(reading.gross_g, self.cell.readability_g)
            self.reply(f"T S {format_weight(self.cell.tare_g, self.cell.readability_g)} g")

    async def _ta(self, args: list[str]) -> None:
        if args:
            if len(args) != 2 or args[1] != "g":
                self.reply("TA L")
                return
            try:
                value = float(args[0])
            except ValueError:
                self.reply("TA L")
                return
            if not 0.0 <= value <= self.cell.capacity_g or not math.isfinite(value):
                self.reply("TA L")
                return
            self.cell.tare_g = round_to(value, self.cell.readability_g)
        self.reply(f"TA A {format_weight(self.cell.tare_g, self.cell.readability_g)} g")

    async def _tac(self, args: list[str]) -> None:
        if args:
            self.reply("ES")
            return
        self.cell.tare_g = 0.0
        self.reply("TAC A")
