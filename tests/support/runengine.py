"""Fixtures for drivers in the real Bluesky RunEngine.

As DESIGN.md fixes it: the RunEngine is created first and owns its event loop (in a thread of its
own); simulators, transports and devices are started *on that loop* (``in_re_loop``), and the
test thread calls ``RE(plan)``. Every document the RunEngine emits is validated against
event-model's JSON schemas as it is produced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from bluesky.run_engine import RunEngine, call_in_bluesky_event_loop
from event_model import DocumentNames, schema_validators

T = TypeVar("T")


class ValidatedDocuments:
    """Collects (name, doc) pairs, validating each against event-model's schema on arrival."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        schema_validators[DocumentNames(name)].validate(doc)
        self.docs.append((name, doc))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.docs if n == name]

    def event_data(self, key: str) -> list[Any]:
        """``key`` from every event that has it (several runs: several streams)."""
        return [e["data"][key] for e in self.of("event") if key in e["data"]]


@pytest.fixture
def RE() -> Iterator[RunEngine]:
    engine = RunEngine(call_returns_result=True)
    yield engine
    if engine.state != "idle":
        engine.halt()
    # Each RunEngine starts a loop of its own in a thread (and makes it bluesky's current loop,
    # which ``in_re_loop`` uses); stop it so tests do not leak threads.
    call_in_bluesky_event_loop(_cancel_leftover_tasks(), timeout=10)
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(5)


async def _cancel_leftover_tasks() -> None:
    """Cancel and await what is still running on the loop (monitor polls, reconnect loops), so
    no task is destroyed pending when the loop stops."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def docs(RE: RunEngine) -> ValidatedDocuments:
    collector = ValidatedDocuments()
    RE.subscribe(collector)
    return collector


def in_re_loop(coro: Awaitable[T], timeout: float | None = 30.0) -> T:
    """Run ``coro`` on the RunEngine's event loop from the (synchronous) test thread."""
    return call_in_bluesky_event_loop(coro, timeout=timeout)
