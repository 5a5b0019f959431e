"""A raw serial client for conformance tests: pyserial on the simulator's pty, no labd code."""

from __future__ import annotations

import asyncio
from pathlib import Path

import serial


class RawPort:
    """Writes command lines, reads reply lines (CR LF kept). The blocking pyserial calls go to a
    thread: the simulator runs on the test's own event loop."""

    def __init__(self, path: Path, timeout: float = 2.0) -> None:
        self.ser = serial.Serial(str(path), timeout=timeout)

    async def line(self) -> bytes:
        return await asyncio.to_thread(self.ser.readline)

    async def ask(self, command: bytes) -> bytes:
        self.ser.write(command)
        return await self.line()

    def close(self) -> None:
        self.ser.close()
