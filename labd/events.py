"""State changes pushed to clients (WebSocket, CLI followers): one bus, any thread may publish.

Each event is ``{"type": ..., "seq": n, "time": t, ...}``. Subscribers are asyncio queues on the
daemon's loop; a slow subscriber loses the oldest events (and is told how many) rather than slowing
the engine down.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


class EventBus:
    def __init__(self, loop: asyncio.AbstractEventLoop, backlog: int = 200) -> None:
        self.loop = loop
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        #: The last events, for a client that connects and wants the recent past.
        self.recent: deque[dict[str, Any]] = deque(maxlen=backlog)

    def publish(self, type_: str, **data: Any) -> dict[str, Any]:
        with self._lock:
            event = {"type": type_, "seq": next(self._seq), "time": time.time(), **data}
            self.recent.append(event)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._deliver(event)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._deliver, event)
        return event

    def _deliver(self, event: dict[str, Any]) -> None:
        for q in list(self._subscribers):
            if q.full():
                dropped = q.get_nowait()
                q.put_nowait({"type": "dropped", "seq": dropped["seq"], "time": time.time()})
            q.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self, maxsize: int = 1000) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)
