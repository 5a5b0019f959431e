"""Tiled forwarder (optional extra ``labd[tiled]``): the journal through Bluesky's own
:class:`~bluesky.callbacks.tiled_writer.TiledWriter` into a Tiled server.

Each run becomes the container ``<run uid>`` at the server's root, as TiledWriter lays it out (the
start and stop documents in its metadata, one container per stream with an ``internal`` table of
the events' data). The forwarder feeds TiledWriter the journal's documents in order (in a thread:
the Tiled client is synchronous) and, at the end of every batch, makes TiledWriter write the events
it holds in memory, so the cursor only passes documents that are in Tiled and a running campaign's
events appear while it runs (one table append per stream and batch, not one request per event).

**At least once, stored once.** A start document for a key that already exists is refused by
Tiled (409 Conflict), and a resent event would be appended to the table a second time, so the
forwarder handles replays by run, not by document:

* a run whose start it meets and which Tiled already holds *with* its stop (TiledWriter writes the
  stop last, after all the data) is complete: its documents are skipped;
* a run that Tiled holds without its stop was cut off (an outage, a crash of the forwarder): the
  partial container is deleted and the run written again from the journal;
* a document of a run whose start this forwarder has not seen (the cursor was in the middle of the
  run after a restart or reconnection) makes it read the run's earlier documents from the journal
  and write the run from its start (subject to the two rules above).

So after any outage or crash every run is in Tiled once and complete (or, for a run still going,
up to its last journaled document). A reconnection rewrites the runs that were open; a cell's runs
are short, so this costs little.

The Tiled client retries a failed request itself (by default 10 attempts over 45 s), which would
hide an outage from the status for that long; unless ``TILED_RETRY_ATTEMPTS`` is set in the
environment the forwarder lowers it to 2 attempts over 3 s and lets its own backoff do the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from labd.hub.base import Forwarder, HubError
from labd.journal import Journal, JournalRecord

try:
    import httpx
    import tiled.client.utils as _tiled_utils
    from bluesky.callbacks.tiled_writer import RunNormalizer, TiledWriter
    from tiled.client import from_uri
    from tiled.client.utils import ClientError
except ImportError as _exc:  # the optional extra is not installed
    TILED_IMPORT_ERROR: str | None = (
        f"the Tiled forwarder needs the optional extra: pip install 'labd[tiled]' ({_exc})")
else:
    TILED_IMPORT_ERROR = None
    if "TILED_RETRY_ATTEMPTS" not in os.environ:
        _tiled_utils.TILED_RETRY_ATTEMPTS = 2
        _tiled_utils.TILED_RETRY_TIMEOUT = 3.0

log = logging.getLogger(__name__)

#: Events TiledWriter gathers per stream before it appends them to the table; the forwarder also
#: makes it write what it holds at the end of every batch.
WRITER_BATCH = 10_000


@dataclass
class _Run:
    """One run being written: its own TiledWriter (so that its run writer can be flushed), or
    ``skip`` for a run Tiled already holds complete."""

    skip: bool
    writer: Any = None
    run_writers: list[Any] = field(default_factory=list)


class TiledForwarder(Forwarder):
    """``uri``: the Tiled server (``http://hub:8000``, or a container on it:
    ``http://hub:8000/api/v1/metadata/labd``); ``api_key``: a key that may write there."""

    def __init__(
        self,
        journal: Journal,
        *,
        cell: str,
        uri: str,
        api_key: str | None = None,
        name: str = "tiled",
        timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        if TILED_IMPORT_ERROR is not None:
            raise HubError(TILED_IMPORT_ERROR)
        super().__init__(name, journal, **kwargs)
        self.cell = cell
        self.uri = uri.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.target = self.uri
        self.runs_written = 0
        self.runs_skipped = 0
        self.runs_rewritten = 0
        self._client: Any = None
        self._runs: dict[str, _Run] = {}

    # -- connection -----------------------------------------------------------------------------
    async def connect(self) -> None:
        self._client = await asyncio.to_thread(self._connect)

    def _connect(self) -> Any:
        # Reads the root node: an unreachable server or a refused key fails here; a key that may
        # read but not write fails at the first write (403, said as such in the status).
        try:
            return from_uri(self.uri, api_key=self.api_key, timeout=httpx.Timeout(self.timeout),
                            remember_me=False)
        except RuntimeError as exc:  # how the client says that the server refused the key
            if "requires API key authentication" in str(exc):
                raise HubError(self._refused_key()) from None
            raise

    def _refused_key(self) -> str:
        return (f"Tiled at {self.uri} refused the API key (401 Unauthorized: check api_key_file"
                " or api_key_env in the config)")

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        self._runs.clear()  # the runs open on the server are written again after a reconnection
        if client is not None:
            await asyncio.to_thread(client.context.close)

    def describe_error(self, exc: BaseException) -> str:
        where = f"Tiled at {self.uri}"
        if isinstance(exc, httpx.HTTPStatusError | ClientError):
            code = exc.response.status_code
            if code == 401:
                return self._refused_key()
            if code == 403:
                return f"{where} refused a write: the API key may not write there (403 Forbidden)"
            if code == 404:
                return f"{where}: no such container (404 Not Found: check the uri in the config)"
            return f"{where} refused a request: {code} {exc.response.reason_phrase}"
        if isinstance(exc, httpx.ConnectError):
            text = str(exc)
            if "Name or service not known" in text or "nodename nor servname" in text:
                return f"cannot reach {where}: unknown host"
            return f"cannot reach {where}: connection refused (is the server running?)"
        if isinstance(exc, httpx.TimeoutException):
            return f"cannot reach {where}: no answer within {self.timeout:g} s"
        if isinstance(exc, httpx.TransportError):
            return f"lost the connection to {where}: {type(exc).__name__}: {exc}"
        return super().describe_error(exc)

    # -- delivery -------------------------------------------------------------------------------
    async def deliver(self, records: list[JournalRecord]) -> None:
        if self._client is None:
            raise HubError(f"not connected to Tiled at {self.uri}")
        await asyncio.to_thread(self._deliver, records)

    def _deliver(self, records: list[JournalRecord]) -> None:
        for rec in records:
            if rec.run_uid is None:
                continue  # a document of no run (TiledWriter has nowhere to put it)
            run = self._runs.get(rec.run_uid)
            if run is None:
                run = self._resume(rec)  # writes the start (and what precedes rec) itself
                if rec.name == "start":
                    continue
            if not run.skip:
                run.writer(rec.name, rec.doc)
            if rec.name == "stop":
                del self._runs[rec.run_uid]
        # Events TiledWriter still holds in memory go to Tiled now: the cursor passes them next.
        for run in self._runs.values():
            for rw in run.run_writers:
                _flush(rw)

    def _resume(self, rec: JournalRecord) -> _Run:
        """The state for ``rec``'s run, met for the first time by this connection."""
        assert rec.run_uid is not None
        if rec.name == "start":
            return self._begin(rec.run_uid, rec.doc)
        earlier = [r for r in self.journal.run_documents(rec.run_uid) if r.seq < rec.seq]
        if not earlier or earlier[0].name != "start":
            log.error("forwarder %s: run %s has no start document in the journal; its documents"
                      " are not sent to Tiled", self.name, rec.run_uid)
            self._runs[rec.run_uid] = run = _Run(skip=True)
            return run
        run = self._begin(rec.run_uid, earlier[0].doc)
        if not run.skip:
            for r in earlier[1:]:
                run.writer(r.name, r.doc)
        return run

    def _begin(self, uid: str, start: dict[str, Any]) -> _Run:
        client = self._client
        try:
            node = client[uid]
        except KeyError:
            node = None
        if node is not None and "stop" in node.metadata:
            self.runs_skipped += 1
            log.info("forwarder %s: run %s is complete in Tiled already; not sent again",
                     self.name, uid)
            run = _Run(skip=True)
        else:
            if node is not None:
                log.info("forwarder %s: run %s is incomplete in Tiled; writing it again",
                         self.name, uid)
                node.delete(recursive=True, external_only=False)
                self.runs_rewritten += 1
            run_writers: list[Any] = []
            writer = TiledWriter(client, normalizer=_tracking_normalizer(run_writers),
                                 batch_size=WRITER_BATCH)
            run = _Run(skip=False, writer=writer, run_writers=run_writers)
            writer("start", start)
            self.runs_written += 1
        self._runs[uid] = run
        return run


def _tracking_normalizer(found: list[Any]) -> Any:
    """TiledWriter's own RunNormalizer, which also hands over the run writer it feeds (TiledWriter
    creates it per run and subscribes it to the normalizer)."""

    class _Normalizer(RunNormalizer):  # type: ignore[misc]
        def subscribe(self, func: Any, name: str = "all") -> Any:
            found.append(func)
            return super().subscribe(func, name)

    return _Normalizer


def _flush(run_writer: Any) -> None:
    """Make TiledWriter's run writer append the events it holds to their tables, as its
    ``stop`` does first (bluesky's ``_RunWriter`` has no public flush; the tests show when a
    bluesky release changes this: the events of a running run must be in Tiled)."""
    for desc_name, cache in run_writer._internal_data_cache.items():
        if cache:
            run_writer._write_internal_data(cache, desc_node=run_writer._desc_nodes[desc_name])
            cache.clear()
    external = run_writer._external_data_cache
    for sres_uid in list(external):
        run_writer._write_external_data(external.pop(sres_uid))
