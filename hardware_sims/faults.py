"""Fault injection, per simulated device.

A fault is set from the cell config (``faults:`` under a device) or at run time through the control
channel (:mod:`hardware_sims.control`). Kinds:

``no_reply``     the device swallows its replies (a reply that never comes).
``late_reply``   each reply is held back ``delay_s`` wall-clock seconds.
``garble``       reply bytes are corrupted (for Modbus: a frame with a bad CRC).
``truncate``     a reply loses its second half (and its terminator).
``error``        the instrument answers with its own error ``code`` (device specific meaning).
``disconnect``   the link drops (pty or socket closed, MQTT client gone) and comes back after
                 ``duration_s`` wall-clock seconds (``0``: stays down until cleared).
``alarm``        the instrument raises alarm ``code`` (furnace over-temperature, GRBL ALARM:N).
``drop_off``     an MQTT device disappears without a clean disconnect, so its last will fires;
                 it comes back after ``duration_s`` (``0``: until cleared).

``count`` limits a reply fault to that many replies; ``None`` keeps it until cleared.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class FaultKind(StrEnum):
    NO_REPLY = "no_reply"
    LATE_REPLY = "late_reply"
    GARBLE = "garble"
    TRUNCATE = "truncate"
    ERROR = "error"
    DISCONNECT = "disconnect"
    ALARM = "alarm"
    DROP_OFF = "drop_off"


#: Faults that change replies; consumed one reply at a time.
REPLY_FAULTS = frozenset(
    {FaultKind.NO_REPLY, FaultKind.LATE_REPLY, FaultKind.GARBLE, FaultKind.TRUNCATE}
)
#: Faults that happen once, when set (the device reacts through a listener).
EVENT_FAULTS = frozenset({FaultKind.DISCONNECT, FaultKind.ALARM, FaultKind.DROP_OFF})


class Fault(BaseModel):
    """One injected fault. Validated like the rest of the config."""

    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    count: int | None = Field(
        default=None, ge=1, description="replies affected; None: until cleared"
    )
    delay_s: float = Field(default=3.0, ge=0, description="late_reply: wall-clock delay")
    code: int | None = Field(default=None, description="error / alarm: the instrument's own code")
    duration_s: float = Field(default=1.0, ge=0, description="disconnect / drop_off: time down")


FaultListener = Callable[[Fault], Awaitable[None]]


class FaultBox:
    """The faults active on one device, and the hooks that make event faults happen."""

    def __init__(self, device: str, seed: int = 0) -> None:
        self.device = device
        self._active: dict[FaultKind, Fault] = {}
        self._remaining: dict[FaultKind, int | None] = {}
        self._listeners: list[FaultListener] = []
        self.rng = random.Random(f"faults:{device}:{seed}")
        self.log: list[dict[str, object]] = []

    # -- configuration -------------------------------------------------------------------------
    def on_event(self, listener: FaultListener) -> None:
        """Register a coroutine called when an event fault (disconnect, alarm, drop_off) is set."""
        self._listeners.append(listener)

    async def set(self, fault: Fault) -> None:
        self._active[fault.kind] = fault
        self._remaining[fault.kind] = fault.count
        self.log.append({"set": fault.model_dump(mode="json")})
        if fault.kind in EVENT_FAULTS:
            await asyncio.gather(*(listener(fault) for listener in self._listeners))

    def clear(self, kind: FaultKind | None = None) -> None:
        kinds = list(self._active) if kind is None else [kind]
        for k in kinds:
            self._active.pop(k, None)
            self._remaining.pop(k, None)
        self.log.append({"clear": [str(k) for k in kinds]})

    def active(self) -> list[Fault]:
        return list(self._active.values())

    def get(self, kind: FaultKind) -> Fault | None:
        return self._active.get(kind)

    # -- consumption ---------------------------------------------------------------------------
    def take(self, kind: FaultKind) -> Fault | None:
        """Return the fault of ``kind`` if active, counting one use against ``count``."""
        fault = self._active.get(kind)
        if fault is None:
            return None
        left = self._remaining.get(kind)
        if left is not None:
            left -= 1
            if left <= 0:
                self.clear(kind)
            else:
                self._remaining[kind] = left
        return fault

    def take_reply_fault(self) -> Fault | None:
        """The first active reply fault (no_reply wins over late over garble over truncate)."""
        for kind in (
            FaultKind.NO_REPLY,
            FaultKind.LATE_REPLY,
            FaultKind.GARBLE,
            FaultKind.TRUNCATE,
        ):
            if kind in self._active:
                return self.take(kind)
        return None

    def garble(self, data: bytes) -> bytes:
        """Corrupt ``data``: flip bits in a few bytes (keeps the length, like line noise)."""
        if not data:
            return data
        buf = bytearray(data)
        for _ in range(max(1, len(buf) // 6)):
            i = self.rng.randrange(len(buf))
            buf[i] ^= 1 << self.rng.randrange(1, 7)
        return bytes(buf)

    @staticmethod
    def truncate(data: bytes) -> bytes:
        return data[: max(1, len(data) // 2)] if len(data) > 1 else b""

    def state(self) -> list[dict[str, object]]:
        return [f.model_dump(mode="json") for f in self._active.values()]
