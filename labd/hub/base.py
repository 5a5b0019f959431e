"""Forwarder base: a durable cursor into the journal, the backlog in order, backoff, status.

A forwarder is an asyncio task on a loop of its own (the daemon runs its forwarders in a process
of their own, :class:`labd.hubservice.HubService`, so that they never take the RunEngine's loop
nor its GIL)::

    fwd = PostgresForwarder(journal, dsn=..., cell="cell1")
    await fwd.start()            # returns at once; delivers in the background
    fwd.status()                 # -> ForwarderStatus (labctl status, /metrics)
    await fwd.wait_delivered(journal.last_seq, timeout=10)
    await fwd.stop()

The loop: connect; read up to ``batch_size`` committed documents after the cursor (through a
thread: SQLite reads never run on the loop); deliver them (the subclass: one transaction, or
every PUBACK); only then advance the cursor, durably, in the journal's ``cursors`` table. On any
failure: drop the connection, record a plain message in ``last_error`` (and the log, once per
distinct error), wait (exponential backoff), reconnect, and resend the batch that was not
acknowledged. Delivery is therefore *at least once*; the targets store by document uid, so a
resent document is stored once. The RunEngine never waits for a forwarder: it only ever talks to
the journal, whose writer thread does not wait for forwarders either.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from drivers.aio import wait_for
from labd.journal import Journal, JournalRecord
from labd.samples import SAMPLE_STREAM, SampleError, SampleRow, sample_from_event

log = logging.getLogger(__name__)


class HubError(Exception):
    """A target refused or could not be reached; the message is meant for a technician."""


@dataclass(frozen=True)
class ForwarderStatus:
    name: str
    target: str
    connected: bool
    cursor: int
    backlog: int
    delivered: int
    last_error: str | None
    last_error_time: float | None
    last_delivery_time: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Forwarder(abc.ABC):
    """Base class: subclasses implement :meth:`connect`, :meth:`deliver`, :meth:`disconnect`."""

    #: Shown in the status (e.g. ``mqtt://host:1883``); set by subclasses.
    target: str = ""

    def __init__(
        self,
        name: str,
        journal: Journal,
        *,
        batch_size: int = 500,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        linger: float = 0.05,
    ) -> None:
        self.name = name
        self.linger = linger
        self.journal = journal
        self.batch_size = batch_size
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.delivered = 0
        self.connected = False
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.last_delivery_time: float | None = None
        self._cursor = 0
        self._logged_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- subclass API ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise :class:`HubError` with a plain message on failure."""

    @abc.abstractmethod
    async def deliver(self, records: list[JournalRecord]) -> None:
        """Deliver ``records`` (in order); return only when the target acknowledged all."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Close the connection (quietly: it may be broken already)."""

    def describe_error(self, exc: BaseException) -> str:
        """A plain message for ``exc`` (subclasses translate their library's errors)."""
        return f"{type(exc).__name__}: {exc}" if not isinstance(exc, HubError) else str(exc)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._cursor = await asyncio.to_thread(self.journal.get_cursor, self.name)
        self.journal.add_listener(self._on_commit)
        self._task = asyncio.create_task(self._run(), name=f"forwarder-{self.name}")

    async def stop(self) -> None:
        self.journal.remove_listener(self._on_commit)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.disconnect()
        self.connected = False

    def _on_commit(self, seq: int) -> None:  # journal writer thread
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # -- status ---------------------------------------------------------------------------------
    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def backlog(self) -> int:
        """Committed documents not yet delivered (sequence numbers are contiguous)."""
        return max(0, self.journal.durable_seq - self._cursor)

    def status(self) -> ForwarderStatus:
        return ForwarderStatus(
            name=self.name, target=self.target, connected=self.connected, cursor=self._cursor,
            backlog=self.backlog, delivered=self.delivered, last_error=self.last_error,
            last_error_time=self.last_error_time, last_delivery_time=self.last_delivery_time,
        )

    async def wait_delivered(self, seq: int, timeout: float | None = None) -> None:
        """Wait until the cursor reached ``seq`` (TimeoutError names the status)."""
        assert self._progress is not None, "start() the forwarder first"
        try:
            async with asyncio.timeout(timeout):
                while self._cursor < seq:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            raise TimeoutError(
                f"forwarder {self.name}: cursor {self._cursor} < {seq} after {timeout} s"
                f" (last error: {self.last_error})") from None

    # -- the loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None and self._progress is not None
        delay = self.backoff_initial
        while True:
            try:
                if not self.connected:
                    await self.connect()
                    self.connected = True
                    if self.last_error:
                        log.info("forwarder %s: connected to %s again", self.name, self.target)
                    self.last_error = None
                    delay = self.backoff_initial
                self._wake.clear()
                batch = await asyncio.to_thread(
                    self.journal.read_after, self._cursor, self.batch_size)
                if not batch:
                    # Woken by the journal's commit listener; the timeout is a safety net.
                    with contextlib.suppress(TimeoutError):
                        await wait_for(self._wake.wait(), 1.0)
                    # Let a live run's documents gather for a moment: one batch of many costs
                    # the loop (which the RunEngine shares) far less than many batches of one.
                    await asyncio.sleep(self.linger)
                    continue
                await self.deliver(batch)
                last = batch[-1].seq
                await asyncio.to_thread(self.journal.set_cursor, self.name, last)
                self._cursor = last
                self.delivered += len(batch)
                self.last_delivery_time = time.time()
                self._logged_error = None
                self._progress.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = self.describe_error(exc)
                if message != self._logged_error:  # once per distinct error, not per retry
                    self._logged_error = message
                    log.warning("forwarder %s (%s): %s; backlog %d, retrying with backoff",
                                self.name, self.target, message, self.backlog)
                self.last_error = message
                self.last_error_time = time.time()
                self.connected = False
                with contextlib.suppress(Exception):
                    await self.disconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)


class RunDocuments:
    """Start and ``sample``-stream descriptor documents of the runs a forwarder is delivering,
    for turning sample events into sample rows; rebuilt from the journal after a restart."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.starts: dict[str, dict[str, Any]] = {}
        self.descriptors: dict[str, dict[str, Any]] = {}

    def note(self, rec: JournalRecord) -> None:
        if rec.name == "start" and rec.run_uid is not None:
            self.starts[rec.run_uid] = rec.doc
        elif rec.name == "descriptor" and rec.stream == SAMPLE_STREAM:
            doc = rec.doc
            self.descriptors[doc["uid"]] = doc
        elif rec.name == "stop" and rec.run_uid is not None:
            self.starts.pop(rec.run_uid, None)

    async def sample(self, rec: JournalRecord) -> SampleRow | None:
        """The sample row of a ``sample``-stream event (None, logged, if it breaks the
        convention: the event itself is stored all the same)."""
        event = rec.doc
        uid = rec.run_uid
        if uid is None:
            return None
        if event["descriptor"] not in self.descriptors or uid not in self.starts:
            recs = await asyncio.to_thread(self.journal.documents, uid, ("start", "descriptor"))
            for r in recs:
                if r.name == "start":
                    self.starts[uid] = r.doc
                elif r.stream == SAMPLE_STREAM:
                    self.descriptors[r.uid] = r.doc
        descriptor = self.descriptors.get(event["descriptor"])
        start = self.starts.get(uid)
        if descriptor is None or start is None:
            log.error("sample event %s: its start or descriptor is not in the journal", rec.uid)
            return None
        try:
            return sample_from_event(start, descriptor, event)
        except SampleError as exc:
            log.warning("run %s: event %s is not a valid sample: %s", uid, rec.uid, exc)
            return None
