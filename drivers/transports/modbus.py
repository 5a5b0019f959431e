"""Modbus bus transport on pymodbus 3.16: TCP, RTU over a serial line, RTU over TCP.

One :class:`ModbusBus` per physical bus (an RS-485 line, a TCP connection to a device or to a
serial gateway); several devices share it through :meth:`ModbusBus.device`::

    bus = ModbusBus.rtu_tcp("rs485-a", "127.0.0.1", 5020, timeout=0.5)
    furnace = bus.device(1, "furnace")
    pv = (await furnace.read_holding_registers(1, command="read PV (reg 1)"))[0] / 10
    await furnace.write_register(24, 8000, command="write SP1 = 800.0 (reg 24)")

Conventions:

* **One request in flight per bus**: every call takes the bus's lock, whatever the device id.
  (RS-485 is half duplex, and a pymodbus client must not be shared by concurrent coroutines.)
* **Timeouts** per call (``timeout=``, default the bus's). No reply in time (a device that is
  not on the line stays silent on RS-485) raises :class:`~drivers.errors.DeviceTimeout`.
* **Exception replies** (function code | 0x80) raise :class:`~drivers.errors.InstrumentError`
  with ``code`` the Modbus exception code and ``message`` its name, e.g.
  ``furnace: 'read reg 999' refused: error 2 (ILLEGAL_ADDRESS)``.
* **Retries**: pymodbus's own retries are set to 0, so no request is ever repeated behind our
  back. Reads (``read_*``) are idempotent and retried by us up to ``read_retries`` times on a
  timeout, a bad frame or a dropped connection; writes are sent once.
* **Reconnection**: pymodbus reconnects in the background (``reconnect_delay`` doubling to
  ``reconnect_delay_max``; never 0, which disables it and makes a dead link spin) and each call
  also tries to connect if the link is down; failure raises :class:`~drivers.errors.NotConnected`.
  A link closed by the peer fails an in-flight request at once instead of waiting out its timeout.
* Frames go to the wire log at DEBUG on ``labd.wire.<bus name>`` (hex, CRC included for RTU);
  statistics in :attr:`ModbusBus.stats`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from ..errors import (
    RETRYABLE,
    DeviceTimeout,
    DriverError,
    InstrumentError,
    NotConnected,
    ProtocolError,
)
from .stats import TransportStats
from .wirelog import WireLog

ModbusClient = AsyncModbusTcpClient | AsyncModbusSerialClient


def exception_name(code: int) -> str:
    """The Modbus exception code's name (``2`` -> ``ILLEGAL_ADDRESS``)."""
    try:
        return ExcCodes(code).name
    except ValueError:
        return f"UNKNOWN_EXCEPTION_{code}"


def _discard_result(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of an exchange whose caller was cancelled (nobody else will)."""
    if not task.cancelled():
        task.exception()


class ModbusBus:
    """One Modbus bus (one pymodbus client), shared by every device id on it."""

    def __init__(
        self,
        name: str,
        client: ModbusClient,
        *,
        timeout: float = 1.0,
        read_retries: int = 1,
        retry_backoff: float = 0.05,
    ) -> None:
        """Wrap a pymodbus async client built with ``retries=0`` (the constructors below do)."""
        self.name = name
        self.client = client
        self.timeout = timeout
        self.read_retries = read_retries
        self.retry_backoff = retry_backoff
        self.stats = TransportStats()
        self.wire = WireLog(name)
        self.lock = asyncio.Lock()
        #: Reconnect after a timeout (Modbus TCP; see :meth:`_once`).
        self.resync_on_timeout = False
        self._ever_connected = False
        # Wire log and link events through pymodbus's trace hooks (it keeps a reference).
        client.ctx.trace_packet = self._trace_packet
        client.ctx.trace_connect = self._trace_connect

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def tcp(
        cls, name: str, host: str, port: int = 502, *, timeout: float = 1.0,
        reconnect_delay: float = 0.2, reconnect_delay_max: float = 5.0, **kw: Any,
    ) -> ModbusBus:
        """Modbus TCP (MBAP header, transaction ids)."""
        client = AsyncModbusTcpClient(
            host, port=port, framer=FramerType.SOCKET, timeout=timeout, retries=0,
            reconnect_delay=reconnect_delay, reconnect_delay_max=reconnect_delay_max, name=name,
        )
        bus = cls(name, client, timeout=timeout, **kw)
        bus.resync_on_timeout = True
        return bus

    @classmethod
    def rtu_tcp(
        cls, name: str, host: str, port: int, *, timeout: float = 1.0,
        reconnect_delay: float = 0.2, reconnect_delay_max: float = 5.0, **kw: Any,
    ) -> ModbusBus:
        """RTU frames (address, PDU, CRC) over TCP: a serial device server / gateway."""
        client = AsyncModbusTcpClient(
            host, port=port, framer=FramerType.RTU, timeout=timeout, retries=0,
            reconnect_delay=reconnect_delay, reconnect_delay_max=reconnect_delay_max, name=name,
        )
        # pymodbus closes a TCP link after a few unanswered requests in a row. Behind a serial
        # gateway, silence means one device is off the line, not that the link is bad: keep it.
        client.set_max_no_responses(1 << 30)
        return cls(name, client, timeout=timeout, **kw)

    @classmethod
    def rtu_serial(
        cls, name: str, port: str, *, baudrate: int = 9600, bytesize: int = 8,
        parity: str = "N", stopbits: int = 1, timeout: float = 1.0,
        reconnect_delay: float = 0.2, reconnect_delay_max: float = 5.0, **kw: Any,
    ) -> ModbusBus:
        """RTU over a serial port (a device path, a pty, or a pyserial URL such as
        ``socket://host:port``). Eurotherm default: 9600 8N1."""
        client = AsyncModbusSerialClient(
            port, framer=FramerType.RTU, baudrate=baudrate, bytesize=bytesize, parity=parity,
            stopbits=stopbits, timeout=timeout, retries=0, reconnect_delay=reconnect_delay,
            reconnect_delay_max=reconnect_delay_max, name=name,
        )
        return cls(name, client, timeout=timeout, **kw)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    async def connect(self) -> None:
        """Connect now (calls also connect on demand). Raises :class:`NotConnected`."""
        async with self.lock:
            await self._ensure_connected(self.name, None)

    def close(self) -> None:
        """Close the link and stop pymodbus's reconnection."""
        self.client.close()

    async def __aenter__(self) -> ModbusBus:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def device(self, device_id: int, name: str | None = None) -> ModbusDevice:
        """A view of one device on this bus (its errors and logs carry ``name``)."""
        return ModbusDevice(self, device_id, name or f"{self.name}/{device_id}")

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self.wire.tx(data)
        else:
            self.wire.rx(data)
        return data

    def _trace_connect(self, connected: bool) -> None:
        self.wire.note("connected" if connected else "disconnected")
        if connected:
            if self._ever_connected:
                self.stats.reconnects += 1
            self._ever_connected = True
        else:
            self.stats.disconnects += 1
            # Fail a request in flight now rather than at its timeout: the link is gone.
            fut = getattr(self.client.ctx, "response_future", None)
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionException("connection lost"))

    async def _ensure_connected(self, device: str, command: str | None) -> None:
        if self.client.connected:
            return
        try:
            ok = await self.client.connect()
        except (OSError, ModbusException) as exc:
            raise NotConnected(device, command, f"{self.name}: cannot connect: {exc}") from exc
        if not ok:
            raise NotConnected(device, command, f"{self.name}: cannot connect")

    # -- requests -------------------------------------------------------------------------------
    async def request(
        self,
        device: str,
        command: str,
        call: Callable[[], Awaitable[ModbusPDU]],
        *,
        idempotent: bool,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> ModbusPDU:
        """Run one pymodbus request under the bus lock, mapping its failures to driver errors.

        ``call`` issues the request on :attr:`client` (e.g. ``lambda: client.read_coils(...)``);
        use it for function codes the helpers below do not cover. ``retries`` (reads only)
        defaults to :attr:`read_retries`; a non-idempotent request is never repeated.
        """
        t = self.timeout if timeout is None else timeout
        n_retries = (self.read_retries if retries is None else retries) if idempotent else 0
        if retries and not idempotent:
            raise ValueError(f"{device}: refusing to retry {command!r}: it is not idempotent")
        for attempt in range(n_retries + 1):
            try:
                return await self._once(device, command, call, t)
            except RETRYABLE:
                if attempt == n_retries:
                    raise
                self.wire.note(f"retrying read {command!r} ({device})")
                await asyncio.sleep(self.retry_backoff * (2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self, device: str, command: str, call: Callable[[], Awaitable[ModbusPDU]], t: float
    ) -> ModbusPDU:
        """One request, shielded from the caller's cancellation.

        A caller may be cancelled while its request is on the wire (a plan aborted, a monitor
        read given up by ``wait_for``). If that released the bus, the next request would go out
        before the instrument has answered the first one: on RS-485 two masters' frames collide,
        and on Modbus TCP pymodbus takes the late answer as a stray transaction and the next
        request times out too. So the exchange runs as a task of its own that keeps the bus
        until the reply (or its timeout); a cancelled caller just stops waiting for it.
        """
        task = asyncio.ensure_future(self._exchange(device, command, call, t))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_discard_result)
            raise

    async def _exchange(
        self, device: str, command: str, call: Callable[[], Awaitable[ModbusPDU]], t: float
    ) -> ModbusPDU:
        async with self.lock:
            self.stats.requests += 1
            started = time.perf_counter()
            try:
                await self._ensure_connected(device, command)
                # pymodbus waits ``timeout_connect`` for a reply: set it per request (under the
                # lock, so no other request sees it); the outer timeout is a safety net.
                self.client.ctx.comm_params.timeout_connect = t
                try:
                    async with asyncio.timeout(t + 0.5):
                        result = await call()
                finally:
                    self.client.ctx.comm_params.timeout_connect = self.timeout
            except DriverError as exc:
                self.stats.record_error(exc)
                raise
            except (ModbusIOException, TimeoutError) as exc:
                err: DriverError = DeviceTimeout(device, command, t)
                if not self.client.connected:
                    err = NotConnected(device, command, f"{self.name}: link lost")
                elif self.resync_on_timeout:
                    # The reply may still come: on Modbus TCP pymodbus then sees a transaction id
                    # it no longer waits for and discards what follows it, so every later request
                    # times out too. Start the next request on a fresh connection instead.
                    self.wire.note(f"timeout on {command!r}: reconnecting to resynchronise")
                    self.client.close()
                self.stats.record_error(err)
                raise err from exc
            except ConnectionException as exc:
                err = NotConnected(device, command, f"{self.name}: {exc}")
                self.stats.record_error(err)
                raise err from exc
            except ModbusException as exc:
                err = ProtocolError(device, command, str(exc))
                self.stats.record_error(err)
                raise err from exc
            if result.isError():
                code = getattr(result, "exception_code", None)
                if isinstance(result, ExceptionResponse) and code is not None:
                    err = InstrumentError(device, command, code, exception_name(code))
                else:
                    err = ProtocolError(device, command, f"error reply {result}")
                self.stats.record_error(err)
                raise err
            self.stats.record_ok(started)
            return result


class ModbusDevice:
    """One device id on a :class:`ModbusBus`. Register addresses are the protocol's (0-based on
    the wire: register 1 is sent as ``00 01``), exactly as the instrument's manual lists them."""

    def __init__(self, bus: ModbusBus, device_id: int, name: str) -> None:
        if not 0 <= device_id <= 247:
            raise ValueError(f"Modbus device id must be 0..247, got {device_id}")
        self.bus = bus
        self.device_id = device_id
        self.name = name

    async def read_holding_registers(
        self, address: int, count: int = 1, *, command: str | None = None,
        timeout: float | None = None, retries: int | None = None,
    ) -> list[int]:
        """Function 3. A read: retried on timeouts (``retries``, default the bus's)."""
        label = command or f"read holding {address}" + (f"+{count}" if count > 1 else "")
        result = await self.bus.request(
            self.name, label,
            lambda: self.bus.client.read_holding_registers(
                address, count=count, device_id=self.device_id
            ),
            idempotent=True, timeout=timeout, retries=retries,
        )
        return self._registers(result, count, label)

    async def read_input_registers(
        self, address: int, count: int = 1, *, command: str | None = None,
        timeout: float | None = None, retries: int | None = None,
    ) -> list[int]:
        """Function 4. A read: retried on timeouts."""
        label = command or f"read input {address}" + (f"+{count}" if count > 1 else "")
        result = await self.bus.request(
            self.name, label,
            lambda: self.bus.client.read_input_registers(
                address, count=count, device_id=self.device_id
            ),
            idempotent=True, timeout=timeout, retries=retries,
        )
        return self._registers(result, count, label)

    async def write_register(
        self, address: int, value: int, *, command: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Function 6 (the device echoes the request). Sent once, never retried."""
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"{self.name}: register value must be 0..65535, got {value}")
        label = command or f"write {address} = {value}"
        await self.bus.request(
            self.name, label,
            lambda: self.bus.client.write_register(address, value, device_id=self.device_id),
            idempotent=False, timeout=timeout,
        )

    async def write_registers(
        self, address: int, values: Sequence[int], *, command: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Function 16. Sent once, never retried."""
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise ValueError(f"{self.name}: register values must be 0..65535, got {values}")
        label = command or f"write {address}+{len(values)} = {list(values)}"
        await self.bus.request(
            self.name, label,
            lambda: self.bus.client.write_registers(
                address, list(values), device_id=self.device_id
            ),
            idempotent=False, timeout=timeout,
        )

    def _registers(self, result: ModbusPDU, count: int, label: str) -> list[int]:
        regs = list(getattr(result, "registers", []) or [])
        if len(regs) != count:
            err = ProtocolError(self.name, label, f"expected {count} registers, got {len(regs)}")
            self.bus.stats.record_error(err)
            raise err
        return regs
