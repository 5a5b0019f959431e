"""Where an instrument is connected, as configuration, and the shared transports for it.

A real cell and the simulated cell differ only in these addresses: ``/dev/ttyUSB0`` against a pty
path or ``socket://127.0.0.1:7001``, a Modbus gateway against the simulator's port, a broker.

:class:`Links` hands out one transport per *physical link*: two Modbus devices on one RS-485 line
(or behind one gateway) share one :class:`~drivers.transports.modbus.ModbusBus` and so its lock,
and every MQTT instrument on one broker shares one :class:`~drivers.transports.mqtt.MqttConnection`.
"""

from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .transports.modbus import ModbusBus, ModbusDevice
from .transports.mqtt import MqttConnection
from .transports.serial import SerialTransport


class SerialLink(BaseModel):
    """A serial line: a device path, a pty, or a pyserial URL (``socket://``, ``rfc2217://``)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    baudrate: int = Field(default=9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    xonxoff: bool = False
    timeout_s: float = Field(default=1.0, gt=0)


class ModbusLink(BaseModel):
    """A Modbus device: TCP, RTU over a serial line, or RTU framing through a TCP gateway."""

    model_config = ConfigDict(extra="forbid")

    framing: Literal["tcp", "rtu", "rtu_tcp"] = "tcp"
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    #: Serial port or URL, for ``framing: rtu``.
    url: str | None = None
    baudrate: int = Field(default=9600, gt=0)
    unit_id: int = Field(default=1, ge=0, le=247)
    timeout_s: float = Field(default=1.0, gt=0)

    def bus_key(self) -> str:
        if self.framing == "rtu":
            if not self.url:
                raise ValueError("a Modbus RTU link needs 'url' (the serial port)")
            return f"rtu:{self.url}"
        if not self.host or not self.port:
            raise ValueError(f"a Modbus {self.framing} link needs 'host' and 'port'")
        return f"{self.framing}:{self.host}:{self.port}"


class MqttLink(BaseModel):
    """An instrument behind an MQTT broker; ``topic`` is its topic root."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic: str = Field(min_length=1)
    username: str | None = None
    password: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)

    def broker_key(self) -> str:
        return f"{self.username or ''}@{self.host}:{self.port}"


class Links:
    """The transports of one cell, one per physical link. Close them with :meth:`close`."""

    def __init__(self, client_name: str = "labd", status_topic: str | None = None) -> None:
        self.client_name = client_name
        self.status_topic = status_topic
        self.serial: dict[str, SerialTransport] = {}
        self.buses: dict[str, ModbusBus] = {}
        self.brokers: dict[str, MqttConnection] = {}

    def serial_port(
        self,
        device: str,
        link: SerialLink,
        *,
        write_terminator: bytes = b"\r\n",
        read_terminator: bytes = b"\n",
    ) -> SerialTransport:
        if link.url in self.serial:
            raise ValueError(f"{device}: serial port {link.url} is already used by "
                             f"{self.serial[link.url].device}")
        port = SerialTransport(
            device, link.url, baudrate=link.baudrate, parity=link.parity,
            xonxoff=link.xonxoff, timeout=link.timeout_s,
            write_terminator=write_terminator, read_terminator=read_terminator,
        )
        self.serial[link.url] = port
        return port

    def modbus_device(self, device: str, link: ModbusLink) -> ModbusDevice:
        key = link.bus_key()
        bus = self.buses.get(key)
        if bus is None:
            if link.framing == "tcp":
                assert link.host and link.port
                bus = ModbusBus.tcp(key, link.host, link.port, timeout=link.timeout_s)
            elif link.framing == "rtu_tcp":
                assert link.host and link.port
                bus = ModbusBus.rtu_tcp(key, link.host, link.port, timeout=link.timeout_s)
            else:
                assert link.url
                bus = ModbusBus.rtu_serial(key, link.url, baudrate=link.baudrate,
                                           timeout=link.timeout_s)
            self.buses[key] = bus
        return bus.device(link.unit_id, device)

    def mqtt(self, link: MqttLink) -> MqttConnection:
        key = link.broker_key()
        conn = self.brokers.get(key)
        if conn is None:
            conn = MqttConnection(
                f"{self.client_name}@{link.host}:{link.port}", link.host, link.port,
                status_topic=self.status_topic, username=link.username,
                password=link.password, timeout=link.timeout_s,
            )
            self.brokers[key] = conn
        return conn

    async def start(self) -> None:
        """Start the MQTT connections (serial and Modbus links open on first use)."""
        for conn in self.brokers.values():
            await conn.start()

    async def close(self) -> None:
        for port in self.serial.values():
            with contextlib.suppress(Exception):
                await port.close()
        for bus in self.buses.values():
            with contextlib.suppress(Exception):
                bus.close()
        for conn in self.brokers.values():
            with contextlib.suppress(Exception):
                await conn.stop()
