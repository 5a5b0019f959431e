"""Fixtures for the journal and hub tests: a real PostgreSQL, a real RunEngine, a journal.

The PostgreSQL cluster is the suite's own (initdb from the installed binaries, a free port, a
socket directory of its own), shared by the module's tests, each of which gets a fresh database;
tests that stop the server start it again before they end.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from bluesky.run_engine import RunEngine, call_in_bluesky_event_loop
from event_model import compose_run

from labd.journal import Journal
from tests.support.postgres import PostgresServer

T = TypeVar("T")
_db_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().init()
    yield server
    server.cleanup()


@pytest.fixture
def pg_conninfo(postgres: PostgresServer) -> str:
    """A fresh, empty database on the suite's server (trust authentication)."""
    return postgres.create_database(f"hub_{next(_db_names)}")


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


@pytest.fixture
def RE() -> Iterator[RunEngine]:
    # No SIGINT handler (context_managers=[]): tests call RE(plan) from a worker thread, as the
    # daemon does, and signal handlers can only be installed from the main thread.
    engine = RunEngine(call_returns_result=True, context_managers=[])
    yield engine
    if engine.state != "idle":
        engine.halt()
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(5)


def in_re_loop(coro: Awaitable[T], timeout: float | None = 30.0) -> T:
    """Run ``coro`` on the RunEngine's event loop (where the daemon runs its forwarders)."""
    return call_in_bluesky_event_loop(coro, timeout=timeout)


def synthetic_run(
    n_events: int, *, metadata: dict[str, Any] | None = None, stream: str = "primary",
) -> list[tuple[str, dict[str, Any]]]:
    """A complete run of valid event-model documents (start, descriptor, events, stop)."""
    bundle = compose_run(metadata={"plan_name": "synthetic", **(metadata or {})})
    desc = bundle.compose_descriptor(
        name=stream, data_keys={"x": {"dtype": "number", "shape": [], "source": "sim"}})
    docs: list[tuple[str, dict[str, Any]]] = [("start", bundle.start_doc),
                                              ("descriptor", desc.descriptor_doc)]
    if n_events:
        docs.append(("event", desc.compose_event(data={"x": 0.0}, timestamps={"x": 0.0},
                                                 seq_num=1)))
    # compose_event validates each event against the schema (~150 us); the rest are built
    # the same way, minus the validation, so that a 20,000-event run takes milliseconds.
    for i in range(1, n_events):
        t = time.time()
        docs.append(("event", {"uid": str(uuid.uuid4()), "descriptor": desc.descriptor_doc["uid"],
                               "time": t, "seq_num": i + 1, "data": {"x": float(i)},
                               "timestamps": {"x": t}, "filled": {}}))
    docs.append(("stop", bundle.compose_stop()))
    return docs
