"""Asyncio serial transport: line-based query/reply and frame-based exchanges, with reconnection.

Opens a device path or any pyserial URL: ``/dev/ttyUSB0``, a pty path (the simulators publish a
stable symlink), ``socket://host:port`` (a serial device server, or a simulator's TCP side),
``rfc2217://host:port``, ``loop://``. Ports with a file descriptor (device paths, ptys) and
``socket://`` go through ``serial_asyncio_fast.create_serial_connection``, which opens a
``socket://`` URL as an asyncio TCP connection of its own; handlers without a file descriptor
(``rfc2217://``, ``loop://``) are served by a reader thread.

Usage::

    port = SerialTransport("balance", "/run/labd-sim/balance", baudrate=9600, timeout=1.0)
    line = await port.query("S", idempotent=True)         # 'S S     100.00 g'
    grams = await port.query("S", parse=parse_weight)     # parse raises ProtocolError/ValueError
    async with port.session() as s:                       # hold the link for a two-phase reply
        assert (await s.query("QRA 61 1")).endswith("B")
        done = await s.read_line(timeout=120, command="QRA 61 1")   # 'QRA 61 1 A'
    await port.write_realtime(b"?")                       # GRBL real-time byte, no lock, no reply
    frame = await port.exchange(b"\\x01\\x03...", expect=rtu_parser)   # binary frames

Conventions:

* **One lock per link.** Every call takes the transport's lock; :meth:`SerialTransport.session`
  holds it across several calls (a command and its late second reply).
* **Stale input is flushed before each query/exchange** (the in-memory buffer and, for a real
  port, the kernel's input queue via ``tcflush``), so a late reply to an earlier command never
  answers a new one. Flushed bytes go to the wire log and to ``on_unsolicited`` if given.
  ``read_line`` and ``query_lines`` never flush: they continue a reply already asked for.
* **Lines**: a ``str`` command is encoded and ``write_terminator`` (CR LF by default) is added;
  ``bytes`` are sent as given. A reply line ends with ``read_terminator`` (LF by default) and is
  returned decoded, without its terminator and a trailing CR.
* **Timeouts**: each call takes ``timeout=`` (default: the transport's). Nothing complete in
  time raises :class:`~drivers.errors.DeviceTimeout` naming device and command (and the partial
  bytes, for a truncated reply).
* **Retries**: only with ``idempotent=True`` (a read); then up to ``read_retries`` more attempts
  on a timeout, a garbled reply or a dropped link. The default is ``False``: a command that
  changes the world is sent once.
* **Reconnection**: a read or write on a closed or vanished port (EIO when a pty's master closes,
  a socket closed by the peer) drops the link and fails the call with
  :class:`~drivers.errors.NotConnected`; the next call reopens the same path or URL (a pty
  symlink may point to a new pty by then). A reopen that fails arms an exponential backoff
  (``backoff_initial`` doubling to ``backoff_max``); a call waits out the backoff if its timeout
  allows, else fails at once with ``NotConnected``.
* Wire log at DEBUG on ``labd.wire.<device>``; statistics in :attr:`SerialTransport.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar, overload

import serial
import serial_asyncio_fast

from ..aio import wait_for
from ..errors import RETRYABLE, DeviceTimeout, DriverError, NotConnected, ProtocolError
from .stats import TransportStats
from .wirelog import WireLog

T = TypeVar("T")

#: A frame parser for :meth:`SerialSession.exchange`: given the bytes received so far, return the
#: length of the complete frame at their start, or ``None`` if more bytes are needed. Raise
#: :class:`ProtocolError` (or ``ValueError``) if the bytes cannot be the start of a valid reply.
FrameParser = Callable[[bytes], int | None]


class _LinkProtocol(asyncio.Protocol):
    """Collects received bytes in a buffer and wakes the readers waiting on them."""

    def __init__(self, wire: WireLog) -> None:
        self.wire = wire
        self.buf = bytearray()
        self.transport: asyncio.BaseTransport | None = None
        self.lost = False
        self.lost_reason: str = ""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Every coroutine waiting for bytes (normally one; a stop written past the link's lock,
        # or a real-time status poll, can add another): all are woken, none is forgotten.
        self._waiters: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.wire.rx(data)
        self.buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._mark_lost("the peer closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_lost(str(exc) if exc else "the port was closed")
        if not self.closed.done():
            self.closed.set_result(None)

    def _mark_lost(self, reason: str) -> None:
        if not self.lost:
            self.lost = True
            self.lost_reason = reason
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved by the next bytes (or the link's loss), registered *now*.

        Registering before the caller awaits matters: ``asyncio.wait_for(coroutine)`` (3.11)
        runs the coroutine as a task that starts on a later loop iteration, and bytes that
        arrived in between would wake nobody: the reply sat in the buffer until the timeout.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        fut.add_done_callback(self._waiters.discard)
        return fut


class _ThreadedSerial(asyncio.Transport):
    """For pyserial URL handlers without a file descriptor (``rfc2217://``, ``loop://``).

    A daemon thread polls ``read`` (50 ms timeout) and hands bytes to the loop; writes go straight
    to the handler (``rfc2217`` sends on a socket, ``loop`` copies in memory: both return at once).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, protocol: _LinkProtocol, ser: serial.SerialBase
    ) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._ser = ser
        self._closing = False
        ser.timeout = 0.05
        self._thread = threading.Thread(target=self._reader, name=f"serial-{ser.port}", daemon=True)
        protocol.connection_made(self)
        self._thread.start()

    def _reader(self) -> None:
        while not self._closing:
            try:
                data = self._ser.read(self._ser.in_waiting or 1)
            except Exception as exc:
                if not self._closing:
                    self._loop.call_soon_threadsafe(self._lost, exc)
                return
            if data and not self._closing:
                self._loop.call_soon_threadsafe(self._protocol.data_received, data)

    def _lost(self, exc: Exception | None) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self._ser.close()
        self._protocol.connection_lost(exc)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        try:
            self._ser.write(bytes(data))
        except Exception as exc:
            self._lost(exc)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.run_in_executor(None, self._finish_close)

    def _finish_close(self) -> None:
        self._thread.join(1.0)
        with contextlib.suppress(Exception):
            self._ser.close()
        self._loop.call_soon_threadsafe(self._protocol.connection_lost, None)


def _has_fileno(ser: serial.SerialBase) -> bool:
    try:
        ser.fileno()  # type: ignore[attr-defined]
    except (AttributeError, io.UnsupportedOperation, NotImplementedError, serial.SerialException):
        return False
    return True


class SerialTransport:
    """One serial link (a port, a pty or a serial-over-TCP URL) shared by the drivers on it."""

    def __init__(
        self,
        device: str,
        url: str,
        *,
        baudrate: int = 9600,
        bytesize: int = serial.EIGHTBITS,
        parity: str = serial.PARITY_NONE,
        stopbits: float = serial.STOPBITS_ONE,
        xonxoff: bool = False,
        rtscts: bool = False,
        timeout: float = 1.0,
        write_terminator: bytes = b"\r\n",
        read_terminator: bytes = b"\n",
        encoding: str = "ascii",
        read_retries: int = 2,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        open_timeout: float = 3.0,
        on_unsolicited: Callable[[bytes], None] | None = None,
    ) -> None:
        self.device = device
        self.url = url
        self.serial_kwargs: dict[str, Any] = {
            "baudrate": baudrate,
            "bytesize": bytesize,
            "parity": parity,
            "stopbits": stopbits,
            "xonxoff": xonxoff,
            "rtscts": rtscts,
        }
        self.timeout = timeout
        self.write_terminator = write_terminator
        self.read_terminator = read_terminator
        self.encoding = encoding
        self.read_retries = read_retries
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.open_timeout = open_timeout
        self.on_unsolicited = on_unsolicited
        self.stats = TransportStats()
        self.wire = WireLog(device)
        self._lock = asyncio.Lock()
        self._proto: _LinkProtocol | None = None
        self._backoff = backoff_initial
        self._next_open_at = 0.0
        self._ever_opened = False
        self._closed_by_user = False

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._proto is not None and not self._proto.lost

    async def open(self) -> None:
        """Open the link now (calls open it on demand anyway). Raises :class:`NotConnected`."""
        async with self._lock:
            self._closed_by_user = False
            await self._ensure_open(None, time.monotonic() + self.open_timeout)

    async def close(self) -> None:
        """Close the link; a later call reopens it."""
        async with self._lock:
            await self._drop("closed by the host")

    async def reconnect(self) -> None:
        """Close and reopen now, ignoring any backoff."""
        async with self._lock:
            await self._drop("reconnect requested")
            self._next_open_at = 0.0
            await self._ensure_open(None, time.monotonic() + self.open_timeout)

    async def __aenter__(self) -> SerialTransport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _drop(self, reason: str) -> None:
        proto, self._proto = self._proto, None
        if proto is None:
            return
        self.wire.note(f"link closed: {reason}")
        if proto.transport is not None and not proto.transport.is_closing():
            proto.transport.close()
        # Wait for the port to be really closed (fd released) before anyone reopens it.
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(asyncio.shield(proto.closed), 1.0)

    async def _ensure_open(self, command: str | None, deadline: float) -> _LinkProtocol:
        if self._proto is not None:
            if not self._proto.lost:
                return self._proto
            self.stats.disconnects += 1
            await self._drop(self._proto.lost_reason)
            self._backoff = self.backoff_initial
            self._next_open_at = 0.0  # first reopen after a loss is immediate
        now = time.monotonic()
        wait = self._next_open_at - now
        if wait > 0:
            if now + wait >= deadline:
                raise NotConnected(
                    self.device, command, f"{self.url} is closed; next reopen in {wait:.1f} s"
                )
            await asyncio.sleep(wait)
        return await self._open_once(command, deadline)

    async def _open_once(self, command: str | None, deadline: float) -> _LinkProtocol:
        loop = asyncio.get_running_loop()
        proto = _LinkProtocol(self.wire)
        budget = max(0.05, min(self.open_timeout, deadline - time.monotonic()))
        try:
            async with asyncio.timeout(budget):
                await self._connect(loop, proto)
        except (OSError, serial.SerialException, ValueError, TimeoutError) as exc:
            self._next_open_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.backoff_max)
            self.wire.note(f"open {self.url} failed: {exc!r}")
            raise NotConnected(
                self.device, command, f"cannot open {self.url}: {exc or type(exc).__name__}"
            ) from exc
        self._proto = proto
        self._backoff = self.backoff_initial
        self._next_open_at = 0.0
        if self._ever_opened:
            self.stats.reconnects += 1
        self._ever_opened = True
        self.wire.note(f"link open: {self.url}")
        return proto

    async def _connect(self, loop: asyncio.AbstractEventLoop, proto: _LinkProtocol) -> None:
        if self.url.startswith("socket://"):
            # serial_asyncio_fast opens socket:// itself as an asyncio TCP connection.
            await serial_asyncio_fast.create_serial_connection(
                loop, lambda: proto, self.url, **self.serial_kwargs
            )
        else:
            ser = await loop.run_in_executor(
                None, partial(serial.serial_for_url, self.url, **self.serial_kwargs)
            )
            if _has_fileno(ser):
                await serial_asyncio_fast.connection_for_serial(loop, lambda: proto, ser)
            else:
                _ThreadedSerial(loop, proto, ser)
        # connection_made is scheduled with call_soon: let it run before the first write.
        while proto.transport is None:
            await asyncio.sleep(0)

    # -- sessions ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[SerialSession]:
        """Hold the link for several calls (e.g. a command and its later second reply)."""
        async with self._lock:
            yield SerialSession(self)

    @overload
    async def query(
        self,
        cmd: str | bytes,
        *,
        timeout: float | None = ...,
        command: str | None = ...,
        idempotent: bool = ...,
        parse: None = ...,
    ) -> str: ...

    @overload
    async def query(
        self,
        cmd: str | bytes,
        *,
        timeout: float | None = ...,
        command: str | None = ...,
        idempotent: bool = ...,
        parse: Callable[[str], T],
    ) -> T: ...

    async def query(
        self,
        cmd: str | bytes,
        *,
        timeout: float | None = None,
        command: str | None = None,
        idempotent: bool = False,
        parse: Callable[[str], Any] | None = None,
    ) -> Any:
        """Flush input, send ``cmd``, return the first reply line (parsed by ``parse`` if given)."""
        async with self.session() as s:
            return await s.query(
                cmd, timeout=timeout, command=command, idempotent=idempotent, parse=parse
            )

    async def query_lines(
        self,
        cmd: str | bytes,
        *,
        count: int | None = None,
        until: Callable[[str], bool] | None = None,
        timeout: float | None = None,
        command: str | None = None,
        idempotent: bool = False,
    ) -> list[str]:
        """Flush input, send ``cmd``, read ``count`` lines or up to the line where ``until``."""
        async with self.session() as s:
            return await s.query_lines(
                cmd, count=count, until=until, timeout=timeout, command=command,
                idempotent=idempotent,
            )

    async def read_line(self, *, timeout: float | None = None, command: str | None = None) -> str:
        """Read the next line (no flush, nothing sent)."""
        async with self.session() as s:
            return await s.read_line(timeout=timeout, command=command)

    async def write(self, data: str | bytes, *, command: str | None = None) -> None:
        """Send without waiting for a reply (no flush). ``str`` gets ``write_terminator``."""
        async with self.session() as s:
            await s.write(data, command=command)

    async def write_realtime(self, data: bytes, *, command: str | None = None) -> None:
        """Send bytes now, *without* the lock: real-time bytes the device handles outside its
        line protocol (GRBL ``?``, ``!``, ``~``, ``0x18``) while another call waits on a reply.
        Whatever the device answers lands in the input stream, read by the lock holder."""
        proto = self._proto
        if proto is None or proto.lost or proto.transport is None:
            raise NotConnected(self.device, command or _label(data), f"{self.url} is not open")
        self.wire.tx(data)
        proto.transport.write(data)  # type: ignore[attr-defined]

    async def exchange(
        self,
        frame: bytes,
        expect: int | FrameParser,
        *,
        timeout: float | None = None,
        command: str | None = None,
        idempotent: bool = False,
    ) -> bytes:
        """Flush input, send a binary ``frame``, return the reply frame (:data:`FrameParser`)."""
        async with self.session() as s:
            return await s.exchange(
                frame, expect, timeout=timeout, command=command, idempotent=idempotent
            )


def _label(cmd: str | bytes) -> str:
    if isinstance(cmd, bytes):
        try:
            text = cmd.decode("ascii")
        except UnicodeDecodeError:
            return cmd.hex(" ").upper()
        return text.strip() or repr(cmd)
    return cmd.strip()


class SerialSession:
    """The link while its lock is held: the same calls as :class:`SerialTransport`."""

    def __init__(self, transport: SerialTransport) -> None:
        self.t = transport

    # -- helpers ----------------------------------------------------------------------------------
    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        t = self.t.timeout if timeout is None else timeout
        return t, time.monotonic() + t

    def _encode(self, data: str | bytes) -> bytes:
        if isinstance(data, bytes):
            return data
        return data.encode(self.t.encoding) + self.t.write_terminator

    def _decode(self, raw: bytes, command: str | None) -> str:
        try:
            text = raw.decode(self.t.encoding)
        except UnicodeDecodeError as exc:
            detail = f"undecodable reply ({exc.reason})"
            raise ProtocolError(self.t.device, command, detail, raw) from exc
        return text.removesuffix("\r")

    def _lost(self, proto: _LinkProtocol, command: str | None) -> NotConnected:
        return NotConnected(self.t.device, command, f"link lost: {proto.lost_reason}")

    def flush_input(self) -> bytes:
        """Discard unread input (in memory and, for a real port, in the kernel); return it."""
        proto = self.t._proto
        if proto is None:
            return b""
        transport = proto.transport
        ser = transport.get_extra_info("serial") if transport is not None else None
        if isinstance(ser, serial.Serial) and not proto.lost:  # posix port/pty: tcflush
            with contextlib.suppress(serial.SerialException, OSError, termios_error()):
                ser.reset_input_buffer()
        stale = bytes(proto.buf)
        proto.buf.clear()
        if stale:
            self.t.wire.note(f"flushed stale input {stale!r}")
            if self.t.on_unsolicited is not None:
                self.t.on_unsolicited(stale)
        return stale

    async def _send(self, data: bytes, command: str, deadline: float) -> _LinkProtocol:
        proto = await self.t._ensure_open(command, deadline)
        assert proto.transport is not None
        self.t.wire.tx(data)
        proto.transport.write(data)  # type: ignore[attr-defined]
        if proto.lost:  # a write on a vanished port fails synchronously
            raise self._lost(proto, command)
        return proto

    async def _read_until(
        self, proto: _LinkProtocol, term: bytes, deadline: float, timeout: float, command: str
    ) -> bytes:
        while True:
            i = proto.buf.find(term)
            if i >= 0:
                raw = bytes(proto.buf[:i])
                del proto.buf[: i + len(term)]
                return raw
            if proto.lost:
                raise self._lost(proto, command)
            if not await self._wait(proto, deadline):
                raise self._timeout(proto, timeout, command)

    @staticmethod
    async def _wait(proto: _LinkProtocol, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await wait_for(proto.waiter(), remaining)
        except TimeoutError:
            return False
        return True

    def _timeout(self, proto: _LinkProtocol, timeout: float, command: str) -> DeviceTimeout:
        if proto.buf:
            return DeviceTimeout(
                self.t.device, command, timeout,
                f"incomplete reply to {command!r} within {timeout:g} s: got {bytes(proto.buf)!r}",
            )
        return DeviceTimeout(self.t.device, command, timeout)

    async def _attempts(
        self, idempotent: bool, command: str, once: Callable[[], Any]
    ) -> Any:
        attempts = 1 + (self.t.read_retries if idempotent else 0)
        for i in range(attempts):
            self.t.stats.requests += 1
            started = time.perf_counter()
            try:
                result = await once()
            except DriverError as exc:
                self.t.stats.record_error(exc)
                if i == attempts - 1 or not isinstance(exc, RETRYABLE):
                    raise
                self.t.wire.note(f"retrying read {command!r} after: {exc}")
                continue
            self.t.stats.record_ok(started)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    # -- calls ------------------------------------------------------------------------------------
    async def query(
        self,
        cmd: str | bytes,
        *,
        timeout: float | None = None,
        command: str | None = None,
        idempotent: bool = False,
        parse: Callable[[str], Any] | None = None,
    ) -> Any:
        label = command or _label(cmd)
        data = self._encode(cmd)
        t, _ = self._deadline(timeout)

        async def once() -> Any:
            deadline = time.monotonic() + t
            if self.t._proto is not None:
                self.flush_input()
            proto = await self._send(data, label, deadline)
            raw = await self._read_until(proto, self.t.read_terminator, deadline, t, label)
            line = self._decode(raw, label)
            return self._parse(parse, line, raw, label)

        return await self._attempts(idempotent, label, once)

    def _parse(
        self, parse: Callable[[str], Any] | None, line: str, raw: bytes, label: str
    ) -> Any:
        if parse is None:
            return line
        try:
            return parse(line)
        except DriverError:
            raise
        except (ValueError, IndexError, KeyError) as exc:
            raise ProtocolError(self.t.device, label, str(exc) or type(exc).__name__, raw) from exc

    async def query_lines(
        self,
        cmd: str | bytes,
        *,
        count: int | None = None,
        until: Callable[[str], bool] | None = None,
        timeout: float | None = None,
        command: str | None = None,
        idempotent: bool = False,
    ) -> list[str]:
        if (count is None) == (until is None):
            raise ValueError("give exactly one of count= or until=")
        label = command or _label(cmd)
        data = self._encode(cmd)
        t, _ = self._deadline(timeout)

        async def once() -> list[str]:
            deadline = time.monotonic() + t
            if self.t._proto is not None:
                self.flush_input()
            proto = await self._send(data, label, deadline)
            lines: list[str] = []
            while True:
                raw = await self._read_until(proto, self.t.read_terminator, deadline, t, label)
                line = self._decode(raw, label)
                lines.append(line)
                if (count is not None and len(lines) >= count) or (until and until(line)):
                    return lines

        result: list[str] = await self._attempts(idempotent, label, once)
        return result

    async def read_line(self, *, timeout: float | None = None, command: str | None = None) -> str:
        label = command or "read line"
        t, deadline = self._deadline(timeout)
        proto = self.t._proto
        if proto is None or (proto.lost and not proto.buf):
            raise NotConnected(self.t.device, label, f"{self.t.url} is not open")
        raw = await self._read_until(proto, self.t.read_terminator, deadline, t, label)
        return self._decode(raw, label)

    async def write(self, data: str | bytes, *, command: str | None = None) -> None:
        label = command or _label(data)
        await self._send(self._encode(data), label, time.monotonic() + self.t.timeout)

    async def exchange(
        self,
        frame: bytes,
        expect: int | FrameParser,
        *,
        timeout: float | None = None,
        command: str | None = None,
        idempotent: bool = False,
    ) -> bytes:
        label = command or _label(frame)
        t, _ = self._deadline(timeout)

        async def once() -> bytes:
            deadline = time.monotonic() + t
            if self.t._proto is not None:
                self.flush_input()
            proto = await self._send(frame, label, deadline)
            while True:
                n = self._frame_length(expect, bytes(proto.buf), label)
                if n is not None and len(proto.buf) >= n:
                    reply = bytes(proto.buf[:n])
                    del proto.buf[:n]
                    return reply
                if proto.lost:
                    raise self._lost(proto, label)
                if not await self._wait(proto, deadline):
                    raise self._timeout(proto, t, label)

        result: bytes = await self._attempts(idempotent, label, once)
        return result

    def _frame_length(self, expect: int | FrameParser, buf: bytes, label: str) -> int | None:
        if isinstance(expect, int):
            return expect if len(buf) >= expect else None
        try:
            return expect(buf)
        except DriverError:
            raise
        except (ValueError, IndexError) as exc:
            raise ProtocolError(self.t.device, label, str(exc) or type(exc).__name__, buf) from exc


def termios_error() -> type[Exception]:
    """``termios.error`` where it exists (tcflush on something that is not a tty)."""
    try:
        import termios
    except ImportError:  # pragma: no cover - not posix
        return OSError
    return termios.error
