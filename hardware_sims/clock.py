"""Virtual clock shared by every simulator of one cell.

Simulated physics (furnace heating, balance settling, dosing, gantry motion) runs in *virtual*
seconds. With ``time_scale = 60`` one wall-clock second is one virtual minute, so an overnight
campaign replays in minutes. Everything that takes time in a simulator must go through
:meth:`VirtualClock.sleep` or read :meth:`VirtualClock.now`; never ``time.time()``.
"""

from __future__ import annotations

import asyncio
import time


class VirtualClock:
    """Monotonic virtual time with a (changeable) time scale."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        self._scale = float(time_scale)
        self._wall0 = time.monotonic()
        self._virt0 = 0.0

    @property
    def time_scale(self) -> float:
        return self._scale

    def set_time_scale(self, time_scale: float) -> None:
        """Change the scale from now on; virtual time stays continuous."""
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        self._virt0 = self.now()
        self._wall0 = time.monotonic()
        self._scale = float(time_scale)

    def now(self) -> float:
        """Virtual seconds since the clock was created."""
        return self._virt0 + (time.monotonic() - self._wall0) * self._scale

    def to_wall(self, virtual_seconds: float) -> float:
        """Wall-clock seconds that ``virtual_seconds`` take at the current scale."""
        return max(0.0, virtual_seconds) / self._scale

    async def sleep(self, virtual_seconds: float) -> None:
        """Sleep for ``virtual_seconds`` of virtual time."""
        await asyncio.sleep(self.to_wall(virtual_seconds))
