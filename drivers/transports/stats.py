"""Per-transport statistics, for metrics: round-trip times and error counts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import DeviceTimeout, DriverError, InstrumentError, NotConnected, ProtocolError


@dataclass
class TransportStats:
    """Counters of one transport object (one serial port, one Modbus bus, one MQTT broker).

    ``requests`` counts request/reply exchanges attempted, ``ok`` those answered; round-trip
    times are wall-clock seconds from the request being written to its reply being complete.
    """

    requests: int = 0
    ok: int = 0
    timeouts: int = 0
    protocol_errors: int = 0
    instrument_errors: int = 0
    not_connected: int = 0
    disconnects: int = 0
    reconnects: int = 0
    last_rtt_s: float | None = None
    max_rtt_s: float = 0.0
    _rtt_sum: float = field(default=0.0, repr=False)

    @property
    def mean_rtt_s(self) -> float | None:
        return self._rtt_sum / self.ok if self.ok else None

    @property
    def errors(self) -> int:
        return self.timeouts + self.protocol_errors + self.instrument_errors + self.not_connected

    def record_ok(self, started: float) -> float:
        rtt = time.perf_counter() - started
        self.ok += 1
        self.last_rtt_s = rtt
        self._rtt_sum += rtt
        self.max_rtt_s = max(self.max_rtt_s, rtt)
        return rtt

    def record_error(self, exc: BaseException) -> None:
        if isinstance(exc, DeviceTimeout):
            self.timeouts += 1
        elif isinstance(exc, ProtocolError):
            self.protocol_errors += 1
        elif isinstance(exc, InstrumentError):
            self.instrument_errors += 1
        elif isinstance(exc, NotConnected):
            self.not_connected += 1
        elif isinstance(exc, DriverError):
            self.protocol_errors += 1

    def snapshot(self) -> dict[str, float | int | None]:
        """A JSON-able copy (for the metrics endpoint)."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "protocol_errors": self.protocol_errors,
            "instrument_errors": self.instrument_errors,
            "not_connected": self.not_connected,
            "disconnects": self.disconnects,
            "reconnects": self.reconnects,
            "last_rtt_s": self.last_rtt_s,
            "mean_rtt_s": self.mean_rtt_s,
            "max_rtt_s": self.max_rtt_s,
        }
