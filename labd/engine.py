"""The engine: one RunEngine, one worker thread, protocols run one at a time from the queue.

Threading (DESIGN.md, checked on bluesky 1.15): the RunEngine is created first and runs its own
event loop in a thread of its own; every asyncio service of the daemon (devices, API, hub, safety)
is scheduled on that loop (``engine.loop``). The *worker* thread is the only caller of the
RunEngine's blocking methods (``RE(plan)``, ``resume``, and ``stop``/``abort``/``halt`` of a
paused run, which run the plan's cleanup in the calling thread). Requests from the API arrive as
commands; a pause is requested directly (bluesky allows ``request_pause`` from another thread).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bluesky.run_engine import RunEngine, RunEngineResult, TransitionError
from bluesky.utils import Msg, RunEngineInterrupted

from protocols.registry import Registry
from protocols.stubs import STEPS

from .events import EventBus
from .store import ExitStatus, HistoryEntry, QueueItem, Store

log = logging.getLogger(__name__)


class EngineState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"


class EngineError(RuntimeError):
    """A control request that does not fit the engine's state (e.g. resume when not paused)."""


class Control(StrEnum):
    RESUME = "resume"
    STOP = "stop"
    ABORT = "abort"
    HALT = "halt"


@dataclass
class RunInfo:
    entry: HistoryEntry
    started: float
    run_uids: list[str]
    progress: dict[str, Any]
    #: The last stop document's exit status and reason (what the run itself says it ended as).
    stop: tuple[str, str] | None = None


class Engine:
    """Hosts the RunEngine. ``devices`` maps names to ophyd-async devices (may be empty)."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        cell: str,
        devices: Mapping[str, Any] | None = None,
        md: Mapping[str, Any] | None = None,
        first_subscribers: Sequence[Callable[[str, dict[str, Any]], None]] = (),
    ) -> None:
        self.store = store
        self.registry = registry
        self.cell = cell
        self.devices: dict[str, Any] = dict(devices or {})
        # No SIGINT handler of bluesky's own: the daemon owns its signals.
        self.RE = RunEngine(dict(md or {}), context_managers=[], call_returns_result=True)
        self.RE.md["cell"] = cell
        self.loop = self.RE.loop
        self.events = EventBus(self.loop)
        self.state = EngineState.IDLE
        self.current: RunInfo | None = None
        self.queue_running = False
        self._commands: queue.Queue[tuple[Control, str]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._immediate: queue.Queue[QueueItem] = queue.Queue()
        self._lock = threading.Lock()
        # The journal comes first: every document is journaled before anything else sees it.
        for subscriber in first_subscribers:
            self.RE.subscribe(subscriber)
        self.RE.subscribe(self._on_document)
        self.RE.state_hook = self._on_re_state
        self.RE.msg_hook = self._on_msg
        #: An immediate pause was requested and the RunEngine has not paused yet (see _on_msg).
        self._pause_pending = False
        #: Checked before each item starts; returns a reason to refuse (e.g. an interlock).
        self.start_guards: list[Callable[[str], str | None]] = []

    # -- documents and state ---------------------------------------------------------------------
    def _on_document(self, name: str, doc: dict[str, Any]) -> None:
        info = self.current
        if info is None:
            return
        if name == "start":
            info.run_uids.append(doc["uid"])
            self.store.add_run_uid(info.entry.item_uid, doc["uid"])
            self.events.publish("run_started", item_uid=info.entry.item_uid, run_uid=doc["uid"],
                                protocol=info.entry.protocol)
        elif name == "event":
            info.progress["events"] = info.progress.get("events", 0) + 1
            info.progress["seq_num"] = doc.get("seq_num")
            info.progress["last_event_time"] = doc.get("time")
        elif name == "stop":
            info.stop = (str(doc.get("exit_status")), str(doc.get("reason") or ""))
            self.events.publish("run_stopped", item_uid=info.entry.item_uid,
                                run_uid=doc.get("run_start"), exit_status=doc.get("exit_status"))

    def _on_re_state(self, new: str, old: str) -> None:
        if new != "pausing":
            self._pause_pending = False
        self.events.publish("re_state", state=str(new), previous=str(old))

    def _on_msg(self, msg: Msg) -> None:
        """RunEngine.msg_hook (on the RunEngine's loop, in its run task, before each message).

        Why: bluesky's immediate pause cancels the RunEngine's task, and a cancellation that
        lands where it is swallowed (seen in the read of an event: asyncio.wait_for of Python
        3.11 can lose a cancellation that races the completion) is lost: the RunEngine stays
        ``pausing`` while the plan goes on to its end, and then raises RunEngineInterrupted
        although nothing paused (a technician's "pause now" ignored, the run then misread).
        A message taken while ``pausing`` is that case: a delivered pause takes no message
        until it is resumed. The cancellation is sent again at the next ``checkpoint``: its
        handler does not suspend, so the cancellation lands at the top of the RunEngine's loop
        right after the new checkpoint, where a deferred pause would, and the resumed run
        replays nothing (sent at any other message it could land in a ``save`` and repeat an
        event)."""
        if (self._pause_pending and msg.command == "checkpoint"
                and self.RE.state == "pausing"):
            task = asyncio.current_task()
            if task is not None:
                log.warning("the pause was not delivered to the RunEngine; sending it again at "
                            "this checkpoint")
                task.cancel()

    def _set_state(self, state: EngineState) -> None:
        self.state = state
        self.events.publish("engine_state", state=str(state),
                            item_uid=self.current.entry.item_uid if self.current else None)

    def status(self) -> dict[str, Any]:
        info = self.current
        return {
            "cell": self.cell,
            "engine": str(self.state),
            "run_engine": str(self.RE.state),
            "queue_running": self.queue_running,
            "queue_length": len(self.store.queue()),
            "current": None if info is None else {
                **info.entry.to_dict(),
                "run_uids": list(info.run_uids),
                "progress": dict(info.progress),
                "elapsed_s": time.time() - info.started,
            },
        }

    # -- queue control (any thread) ----------------------------------------------------------------
    def validate(self, protocol: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate against the protocol's model; return the parameters as they will run."""
        proto = self.registry.get(protocol)
        return proto.validate(params).model_dump(mode="json")

    def start_queue(self) -> None:
        self.queue_running = True
        self.store.set_value("queue_running", True)
        self.events.publish("queue_state", running=True)
        self._wake.set()

    def stop_queue(self) -> None:
        """Stop taking new items (the current one finishes)."""
        self.queue_running = False
        self.store.set_value("queue_running", False)
        self.events.publish("queue_state", running=False)

    def run_now(self, item: QueueItem) -> None:
        """Run ``item`` next, outside the queue (refused while something runs)."""
        if self.state is not EngineState.IDLE:
            raise EngineError(f"cannot run now: the engine is {self.state}")
        self._immediate.put(item)
        self._wake.set()

    def notify_queue_changed(self) -> None:
        self.events.publish("queue_changed", length=len(self.store.queue()))
        self._wake.set()

    # -- run control (any thread but the worker) ---------------------------------------------------
    def pause(self, defer: bool = True) -> None:
        """Pause at the next safe point (``defer``) or now. "Now" while the plan runs a
        world-changing step (a dose, a crucible move: :data:`protocols.stubs.STEPS`) becomes a
        deferred pause, announced as a ``pause_deferred`` event naming the step: the step is never
        cut half-way nor repeated, and the cell stops right after it."""
        if self.state is not EngineState.RUNNING:
            raise EngineError(f"nothing to pause: the engine is {self.state}")
        busy = STEPS.current()
        if not defer and busy is not None:
            defer = True
            self.events.publish("pause_deferred", step=busy,
                                reason=f"pausing after the step in progress: {busy}")
        # The worker says RUNNING a moment before the RunEngine runs the plan (which cannot be
        # paused while it is idle): wait for it, briefly.
        deadline = time.monotonic() + 5.0
        while (self.RE.state == "idle" and self.state is EngineState.RUNNING
               and time.monotonic() < deadline):
            time.sleep(0.005)
        self._pause_pending = not defer
        try:
            self.RE.request_pause(defer=defer)
        except TransitionError as exc:
            self._pause_pending = False
            raise EngineError(f"nothing to pause: {exc}") from None

    def control(self, command: Control, reason: str = "") -> None:
        """Resume, stop, abort or halt the current run."""
        self._last_command = command
        if self.state is EngineState.PAUSED:
            self._commands.put((command, reason))
            return
        if self.state is EngineState.RUNNING and command is not Control.RESUME:
            # Interrupting a running plan from another thread is allowed by bluesky: the call
            # returns the run's result here, and the worker's RE(plan) raises
            # RunEngineInterrupted with the RunEngine idle; the worker takes the result from us.
            self._interrupt_reason = reason
            call = {Control.STOP: self.RE.stop, Control.HALT: self.RE.halt}.get(
                command, lambda: self.RE.abort(reason)
            )
            try:
                self._interrupt_result = call()
            finally:
                self._interrupt_done.set()
            return
        raise EngineError(f"cannot {command}: the engine is {self.state}")

    # -- the worker thread -------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()

    def worker(self) -> None:
        """Run items until :meth:`shutdown`. Call from the thread that owns the RunEngine calls."""
        self.queue_running = bool(self.store.get_value("queue_running", False))
        while not self._stop.is_set():
            try:
                entry = self._next_entry()
            except Exception as exc:
                # A worker that died would leave the daemon up and silently running nothing:
                # stop the queue, say why, and keep serving (run now, a restarted queue).
                log.exception("could not take the next item; the queue is stopped")
                self.stop_queue()
                self.events.publish("queue_blocked", item_uid=None,
                                    reason=f"could not take the next item: "
                                           f"{type(exc).__name__}: {exc}")
                entry = None
            if entry is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._execute(entry)

    def _next_entry(self) -> HistoryEntry | None:
        try:
            item = self._immediate.get_nowait()
            refusal = self._refusal(item.protocol)
            if refusal:
                entry = self.store.start_now(item)
                self.store.finish(entry.item_uid, ExitStatus.FAILED, refusal)
                self.events.publish("item_refused", item_uid=item.item_uid, reason=refusal)
                return None
            return self.store.start_now(item)
        except queue.Empty:
            pass
        if not self.queue_running:
            return None
        queued = self.store.queue()
        if not queued:
            self.stop_queue()  # as bluesky-queueserver: the queue stops when it runs dry
            return None
        refusal = self._refusal(queued[0].protocol)
        if refusal:
            self.stop_queue()
            self.events.publish("queue_blocked", item_uid=queued[0].item_uid, reason=refusal)
            log.warning("queue stopped: %s", refusal)
            return None
        return self.store.take_next()

    def _refusal(self, protocol: str) -> str | None:
        for guard in self.start_guards:
            reason = guard(protocol)
            if reason:
                return reason
        return None

    def _execute(self, entry: HistoryEntry) -> None:
        self.current = RunInfo(entry, time.time(), [], {})
        self._interrupt_reason = ""
        self._interrupt_result: RunEngineResult | None = None
        self._interrupt_done = threading.Event()
        self._last_command: Control | None = None
        self._set_state(EngineState.RUNNING)
        log.info("running %s (%s) for %s", entry.protocol, entry.item_uid, entry.user)
        status, error = ExitStatus.FAILED, None
        try:
            proto = self.registry.get(entry.protocol)
            params = proto.validate(entry.params)
            missing = [n for n in proto.needs if n not in self.devices]
            if missing:
                raise EngineError(f"{entry.protocol} needs devices that are not available: "
                                  f"{', '.join(missing)}")
            plan = proto.plan(self.devices, params)
            md = {
                "protocol": entry.protocol,
                "parameters": params.model_dump(mode="json"),
                "user": entry.user,
                "source": entry.source,
                "item_uid": entry.item_uid,
            }
            status, error = self._drive(lambda: self.RE(plan, **md))
        except Exception as exc:
            status, error = ExitStatus.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("%s failed", entry.protocol)
        finally:
            finished = self.store.finish(entry.item_uid, status, error)
            self.current = None
            self._set_state(EngineState.IDLE)
            self.events.publish("item_finished", item=finished.to_dict())
            log.info("%s finished: %s%s", entry.protocol, status, f" ({error})" if error else "")

    def _drive(self, call: Callable[[], Any]) -> tuple[ExitStatus, str | None]:
        """Call the RunEngine, and while it comes back paused, wait for a control command."""
        while True:
            try:
                result = call()
            except RunEngineInterrupted:
                if self.RE.state != "paused" and self._last_command in (None, Control.RESUME):
                    # Nobody stopped it: a pause that bluesky lost while the plan ran to its
                    # end (see _on_msg). The run says itself how it ended.
                    return self._ended_by_itself()
                if self.RE.state != "paused":  # stopped/aborted/halted from another thread
                    if not self._interrupt_done.wait(30) or self._interrupt_result is None:
                        return ExitStatus.ABORTED, self._interrupt_reason or "interrupted"
                    return self._classify(self._interrupt_result)
                self._set_state(EngineState.PAUSED)
                command, reason = self._commands.get()
                self._set_state(EngineState.RUNNING if command is Control.RESUME
                                else EngineState.STOPPING)
                self._interrupt_reason = reason
                call = {
                    Control.RESUME: self.RE.resume,
                    Control.STOP: self.RE.stop,
                    Control.HALT: self.RE.halt,
                }.get(command, lambda r=reason: self.RE.abort(r))  # type: ignore[misc]
                continue
            return self._classify(result)

    def _ended_by_itself(self) -> tuple[ExitStatus, str | None]:
        stop = self.current.stop if self.current else None
        log.warning("the RunEngine reported an interruption nobody asked for; the run ended "
                    "as its stop document says: %s", stop)
        if stop is None:
            return ExitStatus.FAILED, "the run ended without a stop document"
        exit_status, reason = stop
        if exit_status == "success":
            return ExitStatus.SUCCESS, None
        status = ExitStatus.ABORTED if exit_status == "abort" else ExitStatus.FAILED
        return status, reason or exit_status

    def _classify(self, result: RunEngineResult) -> tuple[ExitStatus, str | None]:
        """The history's exit status: what the RunEngine says, refined by what was asked."""
        reason = result.reason or self._interrupt_reason or None
        if result.exit_status == "fail" and result.exception is not None:
            exc = result.exception
            return ExitStatus.FAILED, f"{type(exc).__name__}: {exc}"
        command = self._last_command
        if command is Control.HALT:
            return ExitStatus.HALTED, reason
        if command is Control.ABORT or result.exit_status == "abort":
            return ExitStatus.ABORTED, reason
        if command is Control.STOP or result.interrupted:
            return ExitStatus.STOPPED, reason
        if result.exit_status == "fail":
            return ExitStatus.FAILED, reason
        return ExitStatus.SUCCESS, None
