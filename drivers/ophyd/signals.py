"""Signals straight on a transport: a Modbus register, a serial query/reply, an MQTT topic.

These are the reusable (upstreamable) layer under labd's instrument devices: an ophyd-async
signal needs only an address on a bus, a query string and a parser, or a topic.

* :func:`modbus_register_r` / :func:`modbus_register_rw`: a holding register as a scaled integer
  (``value = raw / 10**decimals``, signed 16-bit) or an IEEE-754 float in two registers, high word
  first (Eurotherm's ``0x8000 + 2 * address`` region, and most devices that have floats).
  Reads are retried by the transport; a write is sent once and read back.
* :func:`serial_query_r` / :func:`serial_query_rw`: a query line and a parser (``"S"`` -> grams),
  and for writes a command template (``":SOUR:CURR {value}"``) sent once, then the query again.
* :func:`mqtt_topic_r`: a value the instrument pushes on a topic (retained telemetry): the
  signal is updated by the subscription, not polled (the connection restores the subscription
  after a broker restart). An instrument's presence (its last will) is device-specific: the
  devices built on these mark their signals stale themselves.
* :func:`mqtt_topic_rw` writes by sending a command with an id at QoS 1 and completes when the
  instrument acknowledges it on its reply topic (a refusal raises
  :class:`~drivers.errors.InstrumentError` with the instrument's code).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from ophyd_async.core import SignalR, SignalRW

from ..errors import InstrumentError, InvalidParameter, ProtocolError
from ..transports.modbus import ModbusDevice
from ..transports.mqtt import MqttConnection, MqttMessage
from ..transports.serial import SerialTransport
from .backends import PushSignalBackend, QuerySignalBackend

T = TypeVar("T")
log = logging.getLogger(__name__)
Encoding = Literal["scaled", "float"]


# -- Modbus ----------------------------------------------------------------------------------------
def _modbus_codec(
    encoding: Encoding, decimals: int
) -> tuple[int, Callable[[list[int]], float], Callable[[float], list[int]]]:
    if encoding == "float":
        def dec_f(regs: list[int]) -> float:
            return float(struct.unpack(">f", struct.pack(">HH", regs[0], regs[1]))[0])

        def enc_f(value: float) -> list[int]:
            return list(struct.unpack(">HH", struct.pack(">f", value)))

        return 2, dec_f, enc_f
    scale = 10 ** decimals

    def dec_s(regs: list[int]) -> float:
        raw = regs[0] - 0x10000 if regs[0] & 0x8000 else regs[0]
        return raw / scale

    def enc_s(value: float) -> list[int]:
        raw = round(value * scale)
        if not -0x8000 <= raw <= 0x7FFF:
            raise ValueError(f"{value} does not fit a 16-bit register at {decimals} decimals")
        return [raw & 0xFFFF]

    return 1, dec_s, enc_s


def _modbus_backend(
    device: ModbusDevice, address: int, encoding: Encoding, decimals: int, writable: bool,
    units: str | None, precision: int | None, poll_period: float | None,
) -> QuerySignalBackend[float]:
    count, decode, encode = _modbus_codec(encoding, decimals)
    label = f"reg {address}" + (" (float)" if encoding == "float" else "")

    async def read() -> float:
        regs = await device.read_holding_registers(address, count, command=f"read {label}")
        return decode(regs)

    async def write(value: float) -> None:
        try:
            regs = encode(value)
        except ValueError as exc:
            raise InvalidParameter(device.name, f"write {label}", str(exc)) from None
        if count == 1:
            await device.write_register(address, regs[0], command=f"write {label} = {value}")
        else:
            await device.write_registers(address, regs, command=f"write {label} = {value}")

    source = f"modbus://{device.bus.name}/{device.device_id}/hr/{address}"
    return QuerySignalBackend(
        float, source, read=read, write=write if writable else None, poll_period=poll_period,
        units=units, precision=precision if precision is not None else decimals,
    )


def modbus_register_r(
    device: ModbusDevice, address: int, *, encoding: Encoding = "scaled", decimals: int = 0,
    units: str | None = None, precision: int | None = None, poll_period: float | None = 1.0,
    name: str = "",
) -> SignalR[float]:
    """A read-only holding register (function 3)."""
    return SignalR(_modbus_backend(device, address, encoding, decimals, False, units, precision,
                                   poll_period), name=name)


def modbus_register_rw(
    device: ModbusDevice, address: int, *, encoding: Encoding = "scaled", decimals: int = 0,
    units: str | None = None, precision: int | None = None, poll_period: float | None = 1.0,
    name: str = "",
) -> SignalRW[float]:
    """A read/write holding register (function 3; 6 or 16 to write, sent once, read back)."""
    return SignalRW(_modbus_backend(device, address, encoding, decimals, True, units, precision,
                                    poll_period), name=name)


# -- serial ----------------------------------------------------------------------------------------
def _serial_backend(
    port: SerialTransport, query: str, parse: Callable[[str], T], datatype: type[T],
    write: str | None, units: str | None, precision: int | None, poll_period: float | None,
) -> QuerySignalBackend[Any]:
    async def read() -> T:
        return await port.query(query, idempotent=True, parse=parse)

    async def write_value(value: T) -> None:
        assert write is not None
        await port.write(write.format(value=value))

    source = f"serial://{port.url}?{query}"
    return QuerySignalBackend(
        datatype, source, read=read, write=write_value if write else None,
        poll_period=poll_period, units=units, precision=precision,
    )


def serial_query_r(
    port: SerialTransport, query: str, parse: Callable[[str], T], datatype: type[T], *,
    units: str | None = None, precision: int | None = None, poll_period: float | None = 1.0,
    name: str = "",
) -> SignalR[T]:
    """A value read by sending ``query`` and parsing the reply line (``parse`` raises
    ``ValueError`` for a reply it cannot read: a ProtocolError naming the device)."""
    return SignalR(_serial_backend(port, query, parse, datatype, None, units, precision,
                                   poll_period), name=name)


def serial_query_rw(
    port: SerialTransport, query: str, parse: Callable[[str], T], datatype: type[T], write: str,
    *, units: str | None = None, precision: int | None = None, poll_period: float | None = 1.0,
    name: str = "",
) -> SignalRW[T]:
    """As :func:`serial_query_r`, written with the command template ``write``
    (``{value}`` is replaced), sent once and then read back with ``query``."""
    return SignalRW(_serial_backend(port, query, parse, datatype, write, units, precision,
                                    poll_period), name=name)


# -- MQTT ------------------------------------------------------------------------------------------
def _payload_value(msg: MqttMessage, key: str | None) -> Any:
    try:
        data = msg.json()
    except ValueError as exc:
        raise ProtocolError(msg.topic, None, f"not JSON: {exc}", msg.payload) from None
    if key is None:
        return data
    if not isinstance(data, Mapping) or key not in data:
        raise ProtocolError(msg.topic, None, f"no {key!r} in the payload", msg.payload)
    return data[key]


def mqtt_topic_r(
    conn: MqttConnection, topic: str, datatype: type[T], *, key: str | None = "value",
    units: str | None = None, precision: int | None = None, name: str = "",
) -> SignalR[T]:
    """A value pushed on ``topic`` (JSON; ``key`` picks the field, None: the whole payload).
    Connect subscribes (a retained value arrives at once); a payload that cannot be read is
    dropped and logged, the last good value kept."""
    feed = _TopicFeed(conn, topic, key)
    backend: PushSignalBackend[T] = PushSignalBackend(
        datatype, f"mqtt://{conn.host}:{conn.port}/{topic}", units=units, precision=precision,
        on_connect=feed.connect,
    )
    feed.backend = backend
    return SignalR(backend, name=name)


def mqtt_topic_rw(
    conn: MqttConnection, topic: str, datatype: type[T], *, command_topic: str,
    reply_topic_for: Callable[[str], str], field: str = "value", key: str | None = "value",
    timeout: float = 5.0, units: str | None = None, precision: int | None = None, name: str = "",
) -> SignalRW[T]:
    """As :func:`mqtt_topic_r`; a write publishes ``{"id": ..., field: value}`` on
    ``command_topic`` at QoS 1 and waits for the acknowledgement on ``reply_topic_for(id)``
    (``{"accepted": true}``, or ``false`` with ``{"error": {"code", "message"}}``)."""

    async def write(value: T) -> None:
        reply = await conn.request(command_topic, {field: value}, reply_topic_for, timeout,
                                   command=f"set {topic} = {value!r}")
        if isinstance(reply, Mapping) and reply.get("accepted") is False:
            err = reply.get("error") or {}
            raise InstrumentError(command_topic, f"set {topic}", err.get("code"),
                                  str(err.get("message", "refused")))

    feed = _TopicFeed(conn, topic, key)
    backend: PushSignalBackend[T] = PushSignalBackend(
        datatype, f"mqtt://{conn.host}:{conn.port}/{topic}", write=write, units=units,
        precision=precision, on_connect=feed.connect,
    )
    feed.backend = backend
    return SignalRW(backend, name=name)


class _TopicFeed:
    """Feeds one topic into a push backend; subscribes once, on the first connect."""

    def __init__(self, conn: MqttConnection, topic: str, key: str | None) -> None:
        self.conn, self.topic, self.key = conn, topic, key
        self.backend: PushSignalBackend[Any] | None = None
        self.subscribed = False

    def on_message(self, msg: MqttMessage) -> None:
        assert self.backend is not None
        try:
            self.backend.update(_payload_value(msg, self.key))
        except ProtocolError as exc:
            log.warning("%s", exc)

    async def connect(self) -> None:
        if self.subscribed:
            return
        self.subscribed = True
        await self.conn.start()
        latest = self.conn.latest(self.topic)  # retained, already received on this connection
        if latest is not None:
            self.on_message(latest)
        await self.conn.subscribe(self.topic, self.on_message)
