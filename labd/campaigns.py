"""Closed-loop screening campaigns run by the daemon: :class:`CampaignService`.

A campaign (:class:`protocols.campaign.Campaign`) chooses compositions; this service turns its
batches into ``make_batch`` queue items (one furnace load each), reads the results from the
RunEngine documents, tells the campaign, and keeps everything durable in the daemon's SQLite.

Durability (write before acting)
    * ``campaigns``: the spec, the campaign's ``to_dict()`` state after every change, the status
      (running, paused, stopping, finished) with its reason, the rack slots whose crucibles the
      campaign has used.
    * ``campaign_batches``: each furnace load, written when planned (its sample ids and rack
      slots) and with its queue item uid *before* the item is added to the queue. At start-up a
      batch whose item is in neither the queue nor the history is queued again under the same
      uid (it never reached the queue); an item still queued is waited for; an item in the
      history is settled.
    * ``campaign_results``: every ``sample`` event of a campaign run, inserted in the document
      callback, before the plan goes on. A result that arrived just before a SIGKILL is applied
      after the restart; applying is idempotent (by sample id).

    After a SIGKILL the engine marks the running item interrupted (``Store.recover``); its
    samples without a result are recorded interrupted, and the optimiser is rebuilt from the
    stored observations (``Campaign.from_dict``). No finished sample is made again.

Crucibles (a physical decision)
    A used crucible holds a sample: it goes back to its rack slot and is never dosed again. The
    service gives each planned sample a rack slot of its own (``rack_slots``: all the layout's
    rack slots by default) and records it as used when the batch is planned. When fewer empty
    crucibles are left than a batch needs, the campaign pauses with a reason that says so; the
    operator puts empty crucibles in and resumes with ``refilled=True`` (``labctl campaign
    resume ID --refilled``), which frees the slots again. The rack is the cell's, not a
    campaign's: a slot used by any campaign is not given to another until a refill, and a refill
    frees the used slots of every campaign. The simulated cell of the end-to-end
    tests is configured with 48 rack slots and crucibles for a 40-sample campaign.

    A batch that ends without all its results (failed, aborted, interrupted by a crash) leaves
    crucibles where the cell stopped (in the furnace, on the balance, at the doser or the
    station): the campaign pauses, and its reason says which rack slots' crucibles to clear
    before ``resume``. Going on by itself would put new crucibles onto occupied places.

Threading: every call into a :class:`Campaign` runs on one single-thread executor per campaign
(it is not thread-safe, and ``next_batch`` may refit the optimiser); the service's own logic runs
on the daemon's loop. The next batch is planned while the current one runs, so it is ready when
the cell becomes idle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from drivers.aio import wait_for
from protocols.campaign import Campaign, CampaignSpec
from protocols.registry import ProtocolError

from .store import ExitStatus, QueueItem, StoreError

if TYPE_CHECKING:
    from .app import Daemon

log = logging.getLogger(__name__)
T = TypeVar("T")

PROTOCOL = "make_batch"

SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id          TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    run         TEXT NOT NULL,
    state       TEXT NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT,
    used_slots  TEXT NOT NULL DEFAULT '[]',
    user        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS campaign_batches (
    campaign_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    sample_ids  TEXT NOT NULL,
    params      TEXT NOT NULL,
    item_uid    TEXT,
    state       TEXT NOT NULL,
    outcome     TEXT,
    PRIMARY KEY (campaign_id, seq)
);
CREATE TABLE IF NOT EXISTS campaign_results (
    sample_id   TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL,
    run_uid     TEXT NOT NULL,
    value       REAL,
    measured    TEXT NOT NULL,
    data        TEXT NOT NULL,
    time        REAL NOT NULL,
    applied     INTEGER NOT NULL DEFAULT 0
);
"""


class CampaignStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    #: Stop asked while a batch runs: no new batch; finished when the batch has ended.
    STOPPING = "stopping"
    FINISHED = "finished"


class BatchState(StrEnum):
    PLANNED = "planned"
    QUEUED = "queued"
    DONE = "done"


class CampaignError(ValueError):
    """A campaign request that cannot be done (unknown id, wrong state); ``code`` is HTTP-like."""

    def __init__(self, message: str, code: int = 409) -> None:
        super().__init__(message)
        self.code = code


class RunOptions(BaseModel):
    """How the daemon runs a campaign on this cell (beside the spec, which says what to find)."""

    model_config = ConfigDict(extra="forbid")

    #: Rack slots holding empty crucibles for the campaign (None: all the layout's rack slots).
    rack_slots: list[str] | None = Field(default=None, min_length=1)
    #: Fixed ``make_batch`` parameters (e.g. ``ramp_c_min``, ``unload_below_c``, ``total_mg``,
    #: ``anneal_c``/``anneal_s`` when the spec has no ``process`` section).
    params: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Batch:
    seq: int
    sample_ids: list[str]
    params: dict[str, Any]
    item_uid: str | None
    state: BatchState
    outcome: str | None = None


@dataclass
class _Live:
    """One campaign of the service, in memory."""

    id: str
    spec: CampaignSpec
    options: RunOptions
    campaign: Campaign
    status: CampaignStatus
    reason: str | None
    used_slots: list[str]
    user: str
    created_at: float
    batches: list[Batch] = field(default_factory=list)
    snapshot: dict[str, Any] = field(default_factory=dict)
    executor: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, "labd-campaign"))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    planning: bool = False

    def active(self) -> Batch | None:
        return next((b for b in self.batches if b.state is BatchState.QUEUED), None)

    def planned(self) -> Batch | None:
        return next((b for b in self.batches if b.state is BatchState.PLANNED), None)


class CampaignService:
    """Runs campaigns on the daemon's loop (a daemon service: ``start``/``stop``)."""

    name = "campaigns"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.path = Path(daemon.store.path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self.campaigns: dict[str, _Live] = {}
        self._runs: dict[str, str] = {}  # run uid -> campaign id, for campaign runs
        self._descriptors: dict[str, str] = {}  # descriptor uid -> run uid (sample stream)
        self._token: int | None = None
        self._watch: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- database ----------------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "the campaign service is not started"
        return self._db

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return out

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db
        rows = db.execute("SELECT * FROM campaigns ORDER BY created_at").fetchall()
        for row in rows:
            try:
                live = await self._load(row)
            except (ValueError, KeyError) as exc:  # e.g. its pool file is gone
                log.error("campaign %s cannot be loaded: %s", row["id"], exc)
                continue
            self.campaigns[live.id] = live
        self._token = self.daemon.engine.RE.subscribe(self._on_document)
        self._watch = asyncio.create_task(self._watch_items(), name="labd-campaigns-items")
        for live in self.campaigns.values():
            if live.status is not CampaignStatus.FINISHED:
                self._spawn(live)

    async def stop(self) -> None:
        if self._token is not None:
            self.daemon.engine.RE.unsubscribe(self._token)
            self._token = None
        tasks = [t for t in [self._watch, *(c.task for c in self.campaigns.values())] if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for live in self.campaigns.values():
            if live.status is not CampaignStatus.FINISHED:
                live.campaign.pause()  # hours count only while the daemon runs
                await self._persist(live)
            live.executor.shutdown(wait=True)
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None

    async def _load(self, row: sqlite3.Row) -> _Live:
        state = json.loads(row["state"])
        spec = CampaignSpec.model_validate(json.loads(row["spec"]))
        options = RunOptions.model_validate(json.loads(row["run"]))
        executor = concurrent.futures.ThreadPoolExecutor(1, "labd-campaign")
        loop = asyncio.get_running_loop()
        # rebuilds the optimiser from the stored observations (a refit): off the loop
        campaign = await loop.run_in_executor(executor, Campaign.from_dict, state)
        live = _Live(row["id"], spec, options, campaign, CampaignStatus(row["status"]),
                     row["reason"], json.loads(row["used_slots"]), row["user"],
                     row["created_at"], executor=executor)
        for b in self.db.execute("SELECT * FROM campaign_batches WHERE campaign_id = ? "
                                 "ORDER BY seq", (live.id,)).fetchall():
            live.batches.append(Batch(b["seq"], json.loads(b["sample_ids"]),
                                      json.loads(b["params"]), b["item_uid"],
                                      BatchState(b["state"]), b["outcome"]))
            if b["item_uid"]:
                self._runs_for_item(b["item_uid"], live.id)
        await self._refresh(live)
        return live

    def _runs_for_item(self, item_uid: str, campaign_id: str) -> None:
        try:
            entry = self.daemon.store.history_entry(item_uid)
        except StoreError:
            return
        for uid in entry.run_uids:
            self._runs[uid] = campaign_id

    def _spawn(self, live: _Live) -> None:
        live.task = asyncio.create_task(self._drive(live), name=f"labd-campaign-{live.id}")

    async def _call(self, live: _Live, fn: Callable[..., T], *args: Any) -> T:
        """Call into the campaign on its own thread (serialised; never on the loop)."""
        return await asyncio.get_running_loop().run_in_executor(live.executor, fn, *args)

    async def _refresh(self, live: _Live) -> None:
        live.snapshot = await self._call(live, live.campaign.status)

    async def _persist(self, live: _Live, extra: Callable[[sqlite3.Connection], None]
                       | None = None) -> None:
        """Write the campaign's state (and ``extra`` in the same transaction)."""
        state = await self._call(live, lambda: json.dumps(live.campaign.to_dict()))

        def write(db: sqlite3.Connection) -> None:
            db.execute("UPDATE campaigns SET state = ?, status = ?, reason = ?, used_slots = ?, "
                       "updated_at = ? WHERE id = ?",
                       (state, live.status, live.reason, json.dumps(live.used_slots),
                        time.time(), live.id))
            if extra is not None:
                extra(db)

        self._tx(write)
        await self._refresh(live)
        self._publish(live)

    def _publish(self, live: _Live) -> None:
        s = live.snapshot
        self.daemon.events.publish(
            "campaign", id=live.id, status=str(live.status), reason=live.reason,
            samples_made=s.get("samples_made"), samples_left=s.get("samples_left"),
            pending=s.get("pending"), interrupted=s.get("interrupted"), best=s.get("best"))

    # -- requests (on the loop) --------------------------------------------------------------------
    async def create(self, spec: CampaignSpec, options: RunOptions, user: str) -> dict[str, Any]:
        """Start a campaign; refused (nothing stored) if its name is taken or it cannot run here.
        """
        if spec.name in self.campaigns:
            raise CampaignError(f"a campaign named {spec.name!r} exists already (its sample ids "
                                f"would repeat): choose another name")
        layout = self.daemon.layout
        if layout is None:
            raise CampaignError("this cell has no layout: campaigns cannot run")
        slots = options.rack_slots or list(layout.rack_slots)
        bad = [s for s in slots if s not in layout.rack_slots]
        if bad:
            raise CampaignError(f"run.rack_slots: {bad} are not rack slots of this cell "
                                f"({', '.join(layout.rack_slots)})", 422)
        no_head = [el for el in spec.elements if el not in layout.heads]
        if no_head:
            raise CampaignError(f"spec.elements: no doser head holds {', '.join(no_head)} (this "
                                f"cell doses {', '.join(layout.elements)})", 422)
        # the fixed parameters must be acceptable to the protocol (checked with a probe sample)
        probe = self._params(spec, options, [{"sample_id": "probe", "composition":
                                              {el: 1 / len(spec.elements) for el in
                                               spec.elements}, "process": {}}], slots[:1])
        try:
            self.daemon.engine.validate(PROTOCOL, probe)
        except ProtocolError as exc:  # the registry's refusal (a ValidationError per field)
            errs = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors) or str(exc)
            raise CampaignError(f"run.params: {errs}", 422) from None
        executor = concurrent.futures.ThreadPoolExecutor(1, "labd-campaign")
        loop = asyncio.get_running_loop()
        try:
            campaign = await loop.run_in_executor(executor, Campaign, spec)
        except ValueError as exc:
            executor.shutdown()
            raise CampaignError(f"spec: {exc}", 422) from None
        now = time.time()
        live = _Live(spec.name, spec, options, campaign, CampaignStatus.RUNNING, None, [],
                     user, now, executor=executor)
        state = await self._call(live, lambda: json.dumps(campaign.to_dict()))
        self._tx(lambda db: db.execute(
            "INSERT INTO campaigns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (live.id, spec.model_dump_json(), options.model_dump_json(), state, live.status,
             None, "[]", user, now, now)))
        self.campaigns[live.id] = live
        await self._refresh(live)
        self._publish(live)
        log.info("campaign %s started by %s", live.id, user)
        self._spawn(live)
        return self.describe(live.id)

    def get(self, campaign_id: str) -> _Live:
        try:
            return self.campaigns[campaign_id]
        except KeyError:
            raise CampaignError(f"no campaign {campaign_id!r}", 404) from None

    async def pause(self, campaign_id: str) -> dict[str, Any]:
        live = self.get(campaign_id)
        if live.status is not CampaignStatus.RUNNING:
            raise CampaignError(f"campaign {campaign_id} is {live.status}, not running")
        live.status, live.reason = CampaignStatus.PAUSED, "paused by user"
        await self._call(live, live.campaign.pause)
        await self._persist(live)
        live.wake.set()
        return self.describe(campaign_id)

    async def resume(self, campaign_id: str, refilled: bool = False) -> dict[str, Any]:
        """Resume a paused campaign; ``refilled``: the operator replaced the used crucibles."""
        live = self.get(campaign_id)
        if live.status is not CampaignStatus.PAUSED:
            raise CampaignError(f"campaign {campaign_id} is {live.status}, not paused")
        if refilled:
            # The rack is the cell's: every used crucible in it was replaced, whichever campaign
            # used it. The slots of batches still to be made keep their (empty) crucibles.
            for other in self.campaigns.values():
                keep = {s["rack_slot"] for b in other.batches if b.state is not BatchState.DONE
                        for s in b.params["samples"]}
                left = [s for s in other.used_slots if s in keep]
                if left != other.used_slots:
                    other.used_slots = left
                    if other is not live:
                        await self._persist(other)
        live.status, live.reason = CampaignStatus.RUNNING, None
        await self._persist(live)
        live.wake.set()
        return self.describe(campaign_id)

    async def stop_campaign(self, campaign_id: str) -> dict[str, Any]:
        live = self.get(campaign_id)
        if live.status in (CampaignStatus.FINISHED, CampaignStatus.STOPPING):
            raise CampaignError(f"campaign {campaign_id} is {live.status} already")
        live.status, live.reason = CampaignStatus.STOPPING, "stopped by user"
        await self._persist(live)
        live.wake.set()
        return self.describe(campaign_id)

    def describe(self, campaign_id: str) -> dict[str, Any]:
        live = self.get(campaign_id)
        free = self._free_slots(live)
        return {
            "id": live.id, "status": str(live.status), "reason": live.reason,
            "user": live.user, "created_at": live.created_at,
            **{k: v for k, v in live.snapshot.items() if k not in ("name",)},
            "samples_budget": live.spec.budget.samples,
            "batches": [{"seq": b.seq, "sample_ids": b.sample_ids, "item_uid": b.item_uid,
                         "state": str(b.state), "outcome": b.outcome} for b in live.batches],
            "rack_slots_free": len(free) if free is not None else None,
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(cid) for cid in self.campaigns]

    def observations(self, campaign_id: str) -> dict[str, Any]:
        """The campaign's stored state (observations, interrupted, best after each batch)."""
        live = self.get(campaign_id)
        row = self.db.execute("SELECT state FROM campaigns WHERE id = ?", (live.id,)).fetchone()
        state: dict[str, Any] = json.loads(row["state"])
        return state

    # -- documents (on the loop, inside the RunEngine's dispatch) ----------------------------------
    def _on_document(self, name: str, doc: dict[str, Any]) -> None:
        try:
            if name == "start":
                cid = doc.get("campaign")
                if cid in self.campaigns:
                    self._runs[doc["uid"]] = cid
            elif name == "descriptor":
                if doc.get("name") == "sample" and doc.get("run_start") in self._runs:
                    self._descriptors[doc["uid"]] = doc["run_start"]
            elif name == "event":
                run_uid = self._descriptors.get(doc.get("descriptor", ""))
                if run_uid is not None:
                    self._store_result(self._runs[run_uid], run_uid, doc)
        except Exception:  # a bad document must not break the run; it is logged
            log.exception("campaign: could not take %s document", name)

    def _store_result(self, campaign_id: str, run_uid: str, event: Mapping[str, Any]) -> None:
        data = dict(event.get("data", {}))
        sid = str(data.get("sample_id"))
        value = data.get("property_value")
        value = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        measured = {k[len("measured_"):]: float(v) for k, v in data.items()
                    if k.startswith("measured_") and isinstance(v, int | float)
                    and math.isfinite(v)}
        clean = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                 for k, v in data.items()}
        self._tx(lambda db: db.execute(
            "INSERT OR IGNORE INTO campaign_results (sample_id, campaign_id, run_uid, value, "
            "measured, data, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (sid, campaign_id, run_uid, value, json.dumps(measured), json.dumps(clean),
             float(event.get("time", time.time())))))
        live = self.campaigns.get(campaign_id)
        if live is not None:
            live.wake.set()

    async def _watch_items(self) -> None:
        """Wake a campaign when one of its items finishes (or the engine changes state)."""
        async with self.daemon.events.subscribe() as q:
            while True:
                ev = await q.get()
                if ev["type"] in ("item_finished", "item_interrupted", "engine_state",
                                  "run_started"):
                    for live in self.campaigns.values():
                        live.wake.set()

    # -- the loop ----------------------------------------------------------------------------------
    async def _drive(self, live: _Live) -> None:
        while True:
            try:
                await self._step(live)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("campaign %s", live.id)
                live.status = CampaignStatus.PAUSED
                live.reason = f"paused after an error in the campaign service: {exc}"
                try:
                    await self._persist(live)
                except Exception:
                    log.exception("campaign %s: could not store its state", live.id)
            if live.status is CampaignStatus.FINISHED:
                return
            # A batch runs for minutes; the timeout is a safety net, the events wake us.
            with contextlib.suppress(TimeoutError):
                await wait_for(live.wake.wait(), 5.0)
            live.wake.clear()

    async def _step(self, live: _Live) -> None:
        await self._apply_results(live)
        await self._settle(live)
        active, planned = live.active(), live.planned()
        if live.status is CampaignStatus.STOPPING:
            if active is None:
                await self._finish(live, live.reason or "stopped by user", discard=planned)
            return
        if live.status is not CampaignStatus.RUNNING:
            return
        if active is None:
            stop = await self._call(live, live.campaign.should_stop)
            if stop is not None:
                await self._finish(live, stop, discard=planned)
                return
            if planned is None:
                planned = await self._plan(live)
                if planned is None:
                    return
            await self._queue(live, planned)
        elif planned is None:
            await self._plan(live)  # ready before the cell is idle

    async def _plan(self, live: _Live) -> Batch | None:
        """Ask for the next batch (off the loop) and store it with its rack slots."""
        free = self._free_slots(live) or []
        q = live.spec.batch_size
        left = live.snapshot.get("samples_left")
        if left is not None:
            q = min(q, left)
        if q <= 0:
            return None
        if len(free) < q:
            if live.active() is None:
                live.status = CampaignStatus.PAUSED
                live.reason = (f"out of empty crucibles: {len(free)} left, the next batch needs "
                               f"{q}. Replace the used crucibles in the rack with empty ones, "
                               f"then resume with --refilled")
                await self._persist(live)
            return None
        samples = await self._call(live, live.campaign.next_batch)
        if not samples:
            return None
        slots = free[:len(samples)]
        params = self._params(live.spec, live.options, samples, slots)
        batch = Batch(len(live.batches) + 1, [s["sample_id"] for s in samples], params, None,
                      BatchState.PLANNED)
        live.batches.append(batch)
        live.used_slots.extend(slots)
        await self._persist(live, lambda db: db.execute(
            "INSERT INTO campaign_batches VALUES (?, ?, ?, ?, ?, ?, ?)",
            (live.id, batch.seq, json.dumps(batch.sample_ids), json.dumps(params), None,
             batch.state, None)))
        log.info("campaign %s: batch %d planned: %s", live.id, batch.seq,
                 ", ".join(batch.sample_ids))
        return batch

    @staticmethod
    def _params(spec: CampaignSpec, options: RunOptions, samples: list[dict[str, Any]],
                slots: list[str]) -> dict[str, Any]:
        params: dict[str, Any] = dict(options.params)
        procs = [s.get("process") or {} for s in samples]
        if procs and procs[0]:
            # one furnace load, one heat treatment: a batch shares its process (the optimiser's
            # process suggestions for the load are taken from its first sample)
            params["anneal_c"] = procs[0]["anneal_c"]
            params["anneal_s"] = max(60.0, procs[0]["anneal_h"] * 3600.0)
        params["campaign"] = spec.name
        params["samples"] = [
            {"sample_id": s["sample_id"], "rack_slot": slot,
             "composition": {el: x for el, x in s["composition"].items() if x > 0}}
            for s, slot in zip(samples, slots, strict=True)]
        return params

    def _free_slots(self, live: _Live) -> list[str] | None:
        layout = self.daemon.layout
        if layout is None:
            return None
        slots = live.options.rack_slots or list(layout.rack_slots)
        # a crucible another campaign used holds its sample until the operator refills the rack
        used = {s for c in self.campaigns.values() for s in c.used_slots}
        return [s for s in slots if s not in used]

    async def _queue(self, live: _Live, batch: Batch) -> None:
        """Write the item uid first, then add the item to the queue (see the module docstring)."""
        if batch.item_uid is None:
            batch.item_uid = uuid.uuid4().hex
        batch.state = BatchState.QUEUED
        uid = batch.item_uid
        self._tx(lambda db: db.execute(
            "UPDATE campaign_batches SET item_uid = ?, state = ? WHERE campaign_id = ? AND "
            "seq = ?", (uid, batch.state, live.id, batch.seq)))
        await self._enqueue(live, batch)

    async def _enqueue(self, live: _Live, batch: Batch) -> None:
        assert batch.item_uid is not None
        store, engine = self.daemon.store, self.daemon.engine
        item = QueueItem(PROTOCOL, batch.params, live.user, f"campaign:{live.id}",
                         item_uid=batch.item_uid)
        await asyncio.to_thread(store.add, item)
        engine.notify_queue_changed()
        if not engine.queue_running:
            engine.start_queue()
        log.info("campaign %s: batch %d queued as %s", live.id, batch.seq, batch.item_uid)
        self._publish(live)

    async def _apply_results(self, live: _Live) -> None:
        rows = self.db.execute(
            "SELECT * FROM campaign_results WHERE campaign_id = ? AND applied = 0 ORDER BY time",
            (live.id,)).fetchall()
        for r in rows:
            sid = r["sample_id"]

            def apply(r: sqlite3.Row = r, sid: str = sid) -> str | None:
                if sid not in live.campaign.pending:
                    return "not pending"
                if r["value"] is None:
                    live.campaign.mark_interrupted(sid, "measured without a property value")
                    return "no value"
                live.campaign.record(sid, r["value"], json.loads(r["measured"]) or None)
                return None

            why = await self._call(live, apply)
            if why is not None:
                log.warning("campaign %s: result of %s: %s", live.id, sid, why)
            await self._persist(live, lambda db, sid=sid: db.execute(
                "UPDATE campaign_results SET applied = 1 WHERE sample_id = ?", (sid,)))

    async def _settle(self, live: _Live) -> None:
        """Follow the queued batch: re-queue one that never reached the queue, and settle one
        that has ended (samples without a result are interrupted)."""
        batch = live.active()
        if batch is None or batch.item_uid is None:
            return
        store = self.daemon.store
        where = await asyncio.to_thread(store.where, batch.item_uid)  # one look: see Store.where
        if where is None:  # written, but killed before it reached the queue
            await self._enqueue(live, batch)
            return
        if where == "queue":
            if live.status is CampaignStatus.RUNNING and not self.daemon.engine.queue_running:
                self.daemon.engine.start_queue()
            return
        entry = await asyncio.to_thread(store.history_entry, batch.item_uid)
        for uid in entry.run_uids:
            self._runs[uid] = live.id
        if entry.status is ExitStatus.RUNNING:
            return
        await self._apply_results(live)
        missing = [s for s in batch.sample_ids if s in live.campaign.pending]
        reason = f"{entry.status}" + (f": {entry.error}" if entry.error else "")
        for sid in missing:
            await self._call(live, live.campaign.mark_interrupted, sid, reason)
        batch.state = BatchState.DONE
        batch.outcome = reason if missing else "success"
        # Any end but success leaves the cell in an unknown state (a crucible on the gripper, the
        # balance or the station), even when every result came in: the operator clears it.
        if entry.status is not ExitStatus.SUCCESS and live.status is CampaignStatus.RUNNING:
            slots = [s["rack_slot"] for s in batch.params["samples"]
                     if s["sample_id"] in missing]
            lost = (f"samples {', '.join(missing)} are recorded interrupted. Their crucibles "
                    f"(from rack slots {', '.join(slots)})") if missing else "Its crucibles"
            # The snapshot first, then the status: a reader (API, WebSocket) that sees the
            # campaign paused also sees its interrupted samples.
            await self._refresh(live)
            live.status = CampaignStatus.PAUSED
            live.reason = (f"batch {batch.seq} ended {reason}; {lost} may still be in the "
                           f"furnace, on the balance, at the doser, the station or the gripper: "
                           f"clear the cell, then resume")
            log.warning("campaign %s: %s", live.id, live.reason)
        await self._persist(live, lambda db: db.execute(
            "UPDATE campaign_batches SET state = ?, outcome = ? WHERE campaign_id = ? AND seq = ?",
            (batch.state, batch.outcome, live.id, batch.seq)))

    async def _finish(self, live: _Live, reason: str, discard: Batch | None = None) -> None:
        if discard is not None:  # planned ahead, never queued: nothing was dosed
            for sid in discard.sample_ids:
                if sid in live.campaign.pending:
                    await self._call(live, live.campaign.mark_interrupted, sid,
                                     f"not made: the campaign ended ({reason})")
            discard.state, discard.outcome = BatchState.DONE, "not made"
            used = {s["rack_slot"] for s in discard.params["samples"]}
            live.used_slots = [s for s in live.used_slots if s not in used]
        await self._call(live, live.campaign.stop, reason)
        live.status, live.reason = CampaignStatus.FINISHED, reason
        seq = discard.seq if discard else None
        await self._persist(live, None if seq is None else lambda db: db.execute(
            "UPDATE campaign_batches SET state = 'done', outcome = 'not made' WHERE "
            "campaign_id = ? AND seq = ?", (live.id, seq)))
        log.info("campaign %s finished: %s", live.id, reason)
