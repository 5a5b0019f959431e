"""Serving a simulated serial instrument on a pseudo-terminal and/or a TCP socket.

A real instrument sits at the far end of an RS-232/RS-485 cable. Here the simulator owns the master
side of a pseudo-terminal, set to raw mode before anything is written (a new pty is in cooked mode:
echo and CR/LF translation would corrupt the protocol), and publishes the slave's path as a stable
symlink ``<run_dir>/<device>``. The same byte stream is optionally served on TCP, which is what
``socket://host:port`` in pyserial (and a serial device server in a real lab) speaks.

Faults that every serial device shares are applied here, on the bytes that leave the instrument:
``no_reply``, ``late_reply``, ``garble``, ``truncate`` and ``disconnect`` (the pty is closed and the
symlink removed, the TCP listener and its clients closed; after ``duration_s`` a new pty appears
behind the same symlink and the listener returns on the same port, as a cable plugged back in).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from abc import ABC, abstractmethod
from pathlib import Path

from .base import SerialEndpointConfig
from .faults import Fault, FaultBox, FaultKind

log = logging.getLogger(__name__)


class ByteDevice(ABC):
    """The instrument behind a serial endpoint: receives bytes, writes through the endpoint."""

    endpoint: SerialEndpoint

    @abstractmethod
    async def on_bytes(self, data: bytes) -> None:
        """Bytes arrived from the host."""

    def on_connect(self) -> None:  # noqa: B027 - optional hook
        """The link (re)appeared: a cable was plugged in (GRBL prints its banner here)."""


class LineDevice(ByteDevice):
    """A device that reads terminated ASCII lines, with optional real-time single bytes.

    ``terminators`` are the bytes that end a line (both CR and LF by default: an empty line
    between them is ignored). ``realtime`` bytes are handled the moment they arrive, outside any
    line (GRBL's ``?``, ``!``, ``~`` and Ctrl-X).
    """

    terminators: bytes = b"\r\n"
    realtime: frozenset[int] = frozenset()
    max_line: int = 256

    def __init__(self) -> None:
        self._buf = bytearray()

    async def on_bytes(self, data: bytes) -> None:
        for b in data:
            if b in self.realtime:
                await self.on_realtime(b)
            elif b in self.terminators:
                if self._buf:
                    line = bytes(self._buf)
                    self._buf.clear()
                    await self.on_line(line)
            else:
                self._buf.append(b)
                if len(self._buf) > self.max_line:
                    self._buf.clear()
                    await self.on_overflow()

    @abstractmethod
    async def on_line(self, line: bytes) -> None:
        """A complete line, without its terminator."""

    async def on_realtime(self, byte: int) -> None:
        """A real-time byte arrived."""

    async def on_overflow(self) -> None:
        """A line longer than ``max_line`` was discarded."""


class SerialEndpoint:
    """Serves one :class:`ByteDevice` on a pty and/or TCP, with fault injection on its output."""

    def __init__(
        self,
        name: str,
        config: SerialEndpointConfig,
        run_dir: Path,
        faults: FaultBox,
        device: ByteDevice,
    ) -> None:
        self.name = name
        self.config = config
        self.run_dir = run_dir
        self.faults = faults
        self.device = device
        device.endpoint = self
        self.link_path = run_dir / name
        self._master: int | None = None
        self._slave: int | None = None
        self._server: asyncio.Server | None = None
        self._tcp_port: int | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._out: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer_task: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self.connected = False
        self.rx_count = 0
        self.tx_count = 0
        faults.on_event(self._on_fault)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._writer_task = asyncio.create_task(self._writer(), name=f"{self.name}-writer")
        await self._open()

    async def stop(self) -> None:
        if self._reconnect:
            self._reconnect.cancel()
        await self._close()
        if self._writer_task:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
        for t in list(self._tasks):
            t.cancel()

    async def _open(self) -> None:
        if self.config.pty:
            self._open_pty()
        if self.config.tcp_port is not None:
            port = self._tcp_port if self._tcp_port is not None else self.config.tcp_port
            self._server = await asyncio.start_server(
                self._serve_client, self.config.tcp_host, port, reuse_address=True
            )
            self._tcp_port = self._server.sockets[0].getsockname()[1]
        self.connected = True
        self.device.on_connect()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        # Raw before anything is written: no echo, no CR/LF translation, 8 data bits.
        tty.setraw(slave)
        tty.setraw(master)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        tmp = self.link_path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.link_path)
        asyncio.get_running_loop().add_reader(master, self._on_pty_readable)

    async def _close(self) -> None:
        self.connected = False
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
            with contextlib.suppress(FileNotFoundError):
                self.link_path.unlink()
            for fd in (self._master, self._slave):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._master = self._slave = None
        if self._server is not None:
            self._server.close()
            for w in list(self._clients):
                w.close()
            self._clients.clear()
            await self._server.wait_closed()
            self._server = None

    # -- faults --------------------------------------------------------------------------------
    async def _on_fault(self, fault: Fault) -> None:
        if fault.kind is not FaultKind.DISCONNECT:
            return
        log.info("%s: link disconnected (fault), back in %.1fs", self.name, fault.duration_s)
        await self._close()
        if fault.duration_s > 0:
            self._reconnect = asyncio.create_task(self._reconnect_after(fault.duration_s))

    async def _reconnect_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.faults.clear(FaultKind.DISCONNECT)
        await self._open()
        log.info("%s: link back", self.name)

    async def reconnect(self) -> None:
        """Plug the cable back in now (control channel ``clear`` of a disconnect)."""
        if self._reconnect:
            self._reconnect.cancel()
        if not self.connected:
            await self._open()

    # -- input ---------------------------------------------------------------------------------
    def _on_pty_readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO: no process has the slave open; we hold it, so this is transient
        if data:
            self._dispatch(data)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients.add(writer)
        try:
            while data := await reader.read(4096):
                self._dispatch(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    def _dispatch(self, data: bytes) -> None:
        self.rx_count += len(data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %r", self.name, data)
        task = asyncio.create_task(self._handle(data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, data: bytes) -> None:
        try:
            await self.device.on_bytes(data)
        except Exception:  # a simulator bug must not kill the link; it is logged loudly
            log.exception("%s: device failed on %r", self.name, data)

    # -- output --------------------------------------------------------------------------------
    def write(self, data: bytes, *, reply: bool = True) -> None:
        """Queue ``data`` to the host. Reply faults apply unless ``reply`` is False."""
        delay = 0.0
        if reply:
            fault = self.faults.take_reply_fault()
            if fault is not None:
                if fault.kind is FaultKind.NO_REPLY:
                    log.debug("%s: reply swallowed (fault): %r", self.name, data)
                    return
                if fault.kind is FaultKind.LATE_REPLY:
                    delay = fault.delay_s
                elif fault.kind is FaultKind.GARBLE:
                    data = self.faults.garble(data)
                elif fault.kind is FaultKind.TRUNCATE:
                    data = self.faults.truncate(data)
        self._out.put_nowait((data, delay))

    async def _writer(self) -> None:
        while True:
            data, delay = await self._out.get()
            if delay:
                await asyncio.sleep(delay)
            self._send_now(data)

    def _send_now(self, data: bytes) -> None:
        if not self.connected:
            return  # the cable is out: bytes go nowhere
        self.tx_count += len(data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %r", self.name, data)
        if self._master is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._master, data)
        for w in list(self._clients):
            w.write(data)

    def endpoint(self) -> dict[str, object]:
        ep: dict[str, object] = {"transport": "serial", "baudrate": self.config.baudrate}
        if self.config.pty:
            ep["address"] = str(self.link_path)
            ep["pty"] = str(self.link_path)
        if self._tcp_port is not None:
            ep["tcp"] = f"{self.config.tcp_host}:{self._tcp_port}"
            ep["url"] = f"socket://{self.config.tcp_host}:{self._tcp_port}"
            ep.setdefault("address", ep["url"])
        return ep
