"""Transports: one object per physical link, shared by the drivers on it.

* :class:`~drivers.transports.serial.SerialTransport` — serial port, pty or ``socket://`` URL;
  line queries, multi-line and two-phase replies, binary frame exchanges.
* :class:`~drivers.transports.modbus.ModbusBus` — one Modbus TCP, RTU or RTU-over-TCP bus;
  :meth:`~drivers.transports.modbus.ModbusBus.device` gives a per-device view.
* :class:`~drivers.transports.mqtt.MqttConnection` — one broker connection with reconnection,
  subscriptions that survive it, retained-value cache, command/reply correlation, last will.

All of them: a lock per link, a timeout on every call, errors from :mod:`drivers.errors` naming
device and command, reads retried only when the call says ``idempotent=True``, the wire log at
DEBUG on ``labd.wire.<device>``, and :class:`~drivers.transports.stats.TransportStats`.
"""

from .modbus import ModbusBus, ModbusDevice
from .mqtt import MqttConnection, MqttMessage
from .serial import SerialSession, SerialTransport
from .stats import TransportStats
from .wirelog import WireLog, format_bytes

__all__ = [
    "ModbusBus",
    "ModbusDevice",
    "MqttConnection",
    "MqttMessage",
    "SerialSession",
    "SerialTransport",
    "TransportStats",
    "WireLog",
    "format_bytes",
]
