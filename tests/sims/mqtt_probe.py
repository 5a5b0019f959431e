"""A raw MQTT observer for the MQTT simulator tests (aiomqtt only; no labd driver code)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from hardware_sims.base import SimContext
from tests.conftest import make_context
from tests.support.procs import Mosquitto, wait_for


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    def json(self) -> Any:
        return json.loads(self.payload)


def _is_json(payload: bytes) -> bool:
    try:
        json.loads(payload)
    except ValueError:
        return False
    return True


class Probe:
    """Subscribes to ``<filter>`` and records every message, for waiting on what arrives."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[Seen] = []
        self._task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.seen.append(Seen(str(m.topic), payload, bool(m.retain), int(m.qos)))

    def find(
        self, topic: str, pred: Callable[[Seen], bool] = lambda s: True, start: int = 0
    ) -> list[Seen]:
        return [s for s in self.seen[start:] if s.topic == topic and pred(s)]

    async def expect(
        self,
        topic: str,
        pred: Callable[[Any], bool] = lambda p: True,
        *,
        start: int = 0,
        timeout: float = 5.0,
        raw: bool = False,
    ) -> Seen:
        """The first message on ``topic`` (from index ``start``) whose JSON payload satisfies
        ``pred`` (``raw``: whose bytes do)."""

        def match(s: Seen) -> bool:
            if raw:
                return pred(s.payload)
            return _is_json(s.payload) and bool(pred(s.json()))

        found = await wait_for(
            lambda: self.find(topic, match, start), timeout=timeout, what=f"a message on {topic}"
        )
        assert isinstance(found, list)
        return found[0]

    def mark(self) -> int:
        return len(self.seen)


@contextlib.asynccontextmanager
async def probe(broker: Mosquitto, topic_filter: str) -> AsyncIterator[Probe]:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=f"probe-{uuid.uuid4().hex}"
    ) as c:
        p = Probe(c)
        p._task = asyncio.create_task(p._read())
        await c.subscribe(topic_filter, qos=1)
        try:
            yield p
        finally:
            p._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await p._task


async def publish(broker: Mosquitto, topic: str, payload: bytes | str | dict[str, Any]) -> None:
    """Publish once at QoS 1 from a client of its own (like a driver would)."""
    data = json.dumps(payload) if isinstance(payload, dict) else payload
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.publish(topic, data, qos=1)


async def clear_retained(broker: Mosquitto, root: str) -> None:
    """Remove every retained message under ``root`` (tests leave the session broker clean)."""
    async with aiomqtt.Client(broker.host, broker.port) as c:
        await c.subscribe(f"{root}/#", qos=1)
        fence = f"{root}/_fence/{uuid.uuid4().hex}"
        await c.publish(fence, b"x", qos=1)
        retained: set[str] = set()
        async with asyncio.timeout(5):
            async for m in c.messages:
                if str(m.topic) == fence:
                    break
                if m.retain:
                    retained.add(str(m.topic))
        for topic in retained:
            await c.publish(topic, b"", qos=1, retain=True)


def unique_context(tmp_path: Path, broker: Mosquitto, time_scale: float) -> SimContext:
    """A context with a cell name of its own, so tests sharing a broker never see each other."""
    return make_context(tmp_path, broker, time_scale, cell=f"t{uuid.uuid4().hex[:10]}")
