"""Modbus RTU framing for the simulators: CRC-16/MODBUS and a request-frame assembler.

Written here rather than taken from pymodbus, so that a framing bug in the library cannot hide
on both sides of the wire (the drivers use pymodbus's client framer).

An RTU frame is ``unit | function | data | CRC lo | CRC hi``; frames are separated by at least
3.5 character times of silence on the line. A slave that sees a frame with a bad CRC discards it
and stays silent. The assembler cuts frames by their function code's length where the code fixes
it, and otherwise at the inter-frame silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

#: Request frame length (with CRC) of the function codes whose request size is fixed.
_FIXED_REQUEST_LEN = {1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8}
#: Function codes with a byte count at offset 6: frame length is 9 + byte count.
_COUNTED_REQUEST = frozenset({15, 16})
#: Longest RTU frame (Modbus application protocol: 256 bytes).
MAX_FRAME = 256


def _make_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _make_table()


def crc16(data: bytes) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF) of ``data``."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ b) & 0xFF]
    return crc


def with_crc(body: bytes) -> bytes:
    """``body`` followed by its CRC, low byte first (as RTU sends it)."""
    return body + crc16(body).to_bytes(2, "little")


def crc_ok(frame: bytes) -> bool:
    """True when the last two bytes of ``frame`` are the CRC of the rest."""
    return len(frame) >= 4 and crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def char_time_s(baudrate: int) -> float:
    """Wall-clock seconds of one character on the line (11 bits: start, 8 data, parity/stop)."""
    return 11.0 / baudrate


class RtuRequestAssembler:
    """Cuts a byte stream from the master into RTU request frames.

    ``on_frame`` gets each complete frame (CRC not yet checked). Frames of function codes with a
    known request size are delivered as soon as they are complete; any other bytes are delivered
    as one frame when the line has been silent for 3.5 character times (at least ``min_gap_s``,
    since a pty does not carry timing). A partial frame that sits through a silence is delivered
    too (its CRC will fail and it is dropped by the caller), which resynchronises the stream.
    """

    def __init__(
        self,
        on_frame: Callable[[bytes], Awaitable[None]],
        baudrate: int = 9600,
        min_gap_s: float = 0.005,
    ) -> None:
        self._on_frame = on_frame
        self._buf = bytearray()
        self.gap_s = max(3.5 * char_time_s(baudrate), min_gap_s)
        self._timer: asyncio.TimerHandle | None = None

    @staticmethod
    def expected_length(buf: bytes | bytearray) -> int | None:
        """Length of the request frame starting at ``buf[0]``, or None if not knowable yet."""
        if len(buf) < 2:
            return None
        fc = buf[1]
        if fc in _FIXED_REQUEST_LEN:
            return _FIXED_REQUEST_LEN[fc]
        if fc in _COUNTED_REQUEST:
            return 9 + buf[6] if len(buf) >= 7 else None
        return None

    async def feed(self, data: bytes) -> None:
        self._buf.extend(data)
        while self._buf:
            n = self.expected_length(self._buf)
            if n is None or len(self._buf) < n:
                break
            frame = bytes(self._buf[:n])
            del self._buf[:n]
            await self._on_frame(frame)
        if len(self._buf) > MAX_FRAME:
            self._buf.clear()
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buf:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.gap_s, self._silence)

    def _silence(self) -> None:
        self._timer = None
        if not self._buf:
            return
        frame = bytes(self._buf)
        self._buf.clear()
        asyncio.get_running_loop().create_task(self._on_frame(frame))

    def reset(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buf.clear()
