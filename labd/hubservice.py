"""The hub service: the daemon's journal, and its forwarders to the lab's data hub, in a process
of their own.

The journal (:class:`labd.journal.Journal`) is created and subscribed to the RunEngine by the
daemon; this service runs the configured forwarders (:class:`labd.hub.MqttForwarder`,
:class:`labd.hub.PostgresForwarder`) and reports their status and backlog (``GET /api/v1/hub``,
``labctl status``, ``/metrics``).

Why a process, not a task on the daemon's loop nor a thread: forwarding is Python work per
document (encoding, one publish per MQTT message, row building), about 120 us a document for both
forwarders together. On the RunEngine's loop it is added to every event; in a thread of the
daemon it still takes the GIL from the RunEngine's thread (measured: ``bp.count`` of 2,000 events
2.0x the bare RunEngine either way). In a process of its own it runs on the other core, and the
daemon's part of forwarding is one byte written to a pipe per journal commit.

::

    daemon process                                   forwarder process (python -m labd.hubservice)
    RunEngine -> Journal (writer thread, SQLite WAL) <- reads committed documents (read_after)
                 commit listener --- "w\\n" on stdin ->  wakes the forwarders
    HubService  <- status, log records (JSON lines) --  MqttForwarder, PostgresForwarder (asyncio)
                                                        cursors: written to the journal's table

* The child reads the spec (journal path, cell, forwarders with their credentials) as the first
  line of its stdin: passwords never appear on a command line, in the environment or in a log.
* It exits when its stdin closes: a daemon killed with SIGKILL takes its forwarder with it (the
  cursors are durable, so the next daemon's forwarder resends at most the unacknowledged batch,
  which the targets store once, by uid).
* A child that dies is restarted with backoff; its log records are re-emitted by the daemon's
  own loggers (same handlers, same format).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from drivers.aio import wait_for

from .config import ConfigError, HubConfig
from .journal import Journal, JournalClosed

log = logging.getLogger("labd.hub")

#: How often (s) the child reports its forwarders' status when it changed.
REPORT_INTERVAL = 0.1
#: The child looks for new committed documents at least this often (s), woken or not.
POLL_INTERVAL = 0.5


class JournalView(Journal):
    """The read side of a journal that another process writes: what a forwarder uses
    (``read_after``, ``documents``, cursors, ``durable_seq``, commit listeners). ``refresh()``
    looks for newly committed documents and calls the listeners."""

    def __init__(self, path: str | Path) -> None:  # the writer's state is not wanted here
        self.path = Path(path)
        self.synchronous = "NORMAL"  # a lost cursor update only means a resend, stored once
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers = []
        self._listeners = []
        self._durable_view = 0

    @property
    def durable_seq(self) -> int:
        return self._durable_view

    @property
    def last_seq(self) -> int:
        return self._durable_view

    def refresh(self) -> int:
        row = self._reader().execute("SELECT COALESCE(MAX(seq), 0) FROM documents").fetchone()
        seq = int(row[0])
        if seq > self._durable_view:
            self._durable_view = seq
            for cb in list(self._listeners):
                cb(seq)
        return seq

    def append(self, name: str, doc: dict[str, Any]) -> int:
        raise JournalClosed(f"{self.path}: a read-only view of the journal")

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()


# -- the daemon's side --------------------------------------------------------------------------
def _pg_target(conninfo: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    p = conninfo_to_dict(conninfo)
    return (f"postgresql://{p.get('user', '')}@{p.get('host', 'localhost')}:"
            f"{p.get('port', '5432')}/{p.get('dbname', '')}")


def _tiled_installed() -> None:
    """ConfigError if the Tiled forwarder is enabled but its optional extra is not installed."""
    from labd.hub import tiled

    if tiled.TILED_IMPORT_ERROR is not None:
        raise ConfigError(tiled.TILED_IMPORT_ERROR)


class HubService:
    """Runs the forwarders of ``config`` for ``journal`` in a child process (see the module)."""

    name = "hub"

    def __init__(
        self,
        journal: Journal,
        config: HubConfig,
        cell: str,
        *,
        restart_initial: float = 0.5,
        restart_max: float = 30.0,
    ) -> None:
        self.journal = journal
        self.config = config
        self.cell = cell
        self.restart_initial = restart_initial
        self.restart_max = restart_max
        self.restarts = 0
        self._specs: list[dict[str, Any]] = []
        self._status: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._wake_fd: int | None = None
        self._process_error: str | None = None

    # -- configuration --------------------------------------------------------------------------
    def _build_specs(self) -> None:
        """One spec per enabled forwarder, with its secret read now. A secret that cannot be
        read leaves that forwarder down, with the reason in its status and the log."""
        cfg = self.config
        wanted: list[tuple[str, Any, dict[str, Any], str]] = []
        if cfg.mqtt.enabled:
            m = cfg.mqtt
            wanted.append(("mqtt", m, {"host": m.host, "port": m.port, "username": m.username,
                                       "topic_root": m.topic_root}, f"mqtt://{m.host}:{m.port}"))
        if cfg.postgres.enabled:
            p = cfg.postgres
            wanted.append(("postgres", p, {"conninfo": p.conninfo}, _pg_target(p.conninfo)))
        if cfg.tiled.enabled:
            wanted.append(("tiled", cfg.tiled, {"uri": cfg.tiled.uri}, cfg.tiled.uri.rstrip("/")))
        for name, section, params, target in wanted:
            cursor = self.journal.get_cursor(name)
            status = {"name": name, "target": target, "connected": False, "cursor": cursor,
                      "backlog": 0, "delivered": 0, "last_error": None, "last_error_time": None,
                      "last_delivery_time": None}
            try:
                if name == "tiled":
                    _tiled_installed()
                password = section.password()
            except ConfigError as exc:
                message = f"not started: {exc}"
                log.error("hub forwarder %s (%s): %s", name, target, message)
                self._status[name] = {**status, "last_error": message,
                                      "last_error_time": time.time()}
                continue
            self._status[name] = status
            self._specs.append({"kind": name, "name": name, "password": password, **params})

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._build_specs)
        if not self._specs:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._supervise, name="labd-hub-supervisor",
                                        daemon=True)
        self._thread.start()
        names = ", ".join(f"{s['name']} -> {self._status[s['name']]['target']}"
                          for s in self._specs)
        log.info("hub: forwarding the journal %s (%s)", self.journal.path, names)

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._stop_child)

    def _stop_child(self) -> None:
        proc = self._proc
        self.journal.remove_listener(self._on_commit)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "stop"}\n')
                proc.stdin.flush()
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.error("hub forwarder process %d did not stop: killed", proc.pid)
                proc.kill()
                proc.wait(5)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "labd.hubservice"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=None, start_new_session=False)
        spec = {"journal": str(self.journal.path), "cell": self.cell, "forwarders": self._specs,
                "log_level": logging.getLogger().getEffectiveLevel()}
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode() + b"\n")
        proc.stdin.flush()
        return proc

    def _supervise(self) -> None:
        delay = self.restart_initial
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as exc:
                self._process_error = f"cannot start the forwarder process: {exc}"
                log.error("hub: %s", self._process_error)
            else:
                self._proc = proc
                assert proc.stdin is not None and proc.stdout is not None
                self._wake_fd = proc.stdin.fileno()
                os.set_blocking(self._wake_fd, False)
                self.journal.add_listener(self._on_commit)
                self._read(proc.stdout)
                self.journal.remove_listener(self._on_commit)
                code = proc.wait()
                if self._stopping.is_set():
                    return
                self._process_error = (f"the forwarder process exited with code {code};"
                                       f" restarting it")
                log.error("hub: %s in %.1f s (the backlog waits in the journal)",
                          self._process_error, delay)
                with self._cond:
                    for st in self._status.values():
                        st["connected"] = False
                    self._cond.notify_all()
            self.restarts += 1
            if time.monotonic() - started > 60:
                delay = self.restart_initial
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.restart_max)

    def _on_commit(self, seq: int) -> None:  # the journal's writer thread: one byte, never wait
        fd = self._wake_fd
        if fd is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
                os.write(fd, b"w\n")

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("hub forwarder process: unreadable line %r", line[:200])
                continue
            kind = msg.get("type")
            if kind == "status":
                with self._cond:
                    for st in msg["forwarders"]:
                        self._status[st["name"]] = st
                    self._process_error = None
                    self._cond.notify_all()
            elif kind == "log":
                logging.getLogger(msg.get("logger") or "labd.hub").log(
                    int(msg.get("level", logging.INFO)), "%s", msg.get("message", ""))

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The journal and each forwarder: target, connected, cursor, backlog (committed documents
        not yet delivered), delivered (by the current forwarder process), last error."""
        durable = self.journal.durable_seq
        with self._cond:
            forwarders = [{**st, "backlog": max(0, durable - int(st["cursor"]))}
                          for st in self._status.values()]
        proc = self._proc
        return {
            "journal": {"path": str(self.journal.path), "documents": durable,
                        "last_seq": self.journal.last_seq},
            "forwarders": forwarders,
            "process": {"pid": proc.pid if proc else None,
                        "running": proc is not None and proc.poll() is None,
                        "restarts": self.restarts, "error": self._process_error},
        }

    def wait_delivered(self, seq: int, timeout: float | None = None) -> bool:
        """Block until every running forwarder's cursor reached ``seq``; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        names = [s["name"] for s in self._specs]
        with self._cond:
            while any(int(self._status[n]["cursor"]) < seq for n in names):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True


# -- the forwarder process ----------------------------------------------------------------------
class _PipeHandler(logging.Handler):
    def __init__(self, out: IO[str]) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            _send(self.out, {"type": "log", "level": record.levelno, "logger": record.name,
                             "message": message})
        except Exception:
            self.handleError(record)


_send_lock = threading.Lock()


def _send(out: IO[str], msg: dict[str, Any]) -> None:
    with _send_lock:
        out.write(json.dumps(msg, default=str) + "\n")
        out.flush()


def _forwarders(view: JournalView, spec: dict[str, Any]) -> list[Any]:
    from labd.hub import MqttForwarder, PostgresForwarder

    out: list[Any] = []
    for f in spec["forwarders"]:
        if f["kind"] == "mqtt":
            out.append(MqttForwarder(view, cell=spec["cell"], host=f["host"], port=f["port"],
                                     username=f.get("username"), password=f.get("password"),
                                     topic_root=f.get("topic_root", "labd"), name=f["name"],
                                     batch_size=1000))
        elif f["kind"] == "postgres":
            out.append(PostgresForwarder(view, cell=spec["cell"], conninfo=f["conninfo"],
                                         password=f.get("password"), name=f["name"],
                                         batch_size=2000))
        elif f["kind"] == "tiled":
            from labd.hub.tiled import TiledForwarder

            out.append(TiledForwarder(view, cell=spec["cell"], uri=f["uri"],
                                      api_key=f.get("password"), name=f["name"],
                                      batch_size=2000))
    return out


async def _child(out: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    spec = json.loads(first)
    logging.getLogger().setLevel(int(spec.get("log_level", logging.INFO)))
    view = JournalView(spec["journal"])
    await asyncio.to_thread(view.refresh)
    fwds = _forwarders(view, spec)
    for f in fwds:
        await f.start()
    poke = asyncio.Event()
    done = asyncio.Event()

    async def read_commands() -> None:
        while True:
            line = await reader.readline()
            if not line or line.startswith(b"{"):  # EOF (the daemon is gone) or stop
                done.set()
                return
            poke.set()

    async def refresh() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_for(poke.wait(), POLL_INTERVAL)
            poke.clear()
            await asyncio.to_thread(view.refresh)

    async def report() -> None:
        last: list[dict[str, Any]] | None = None
        while True:
            now = [f.status().as_dict() for f in fwds]
            if now != last:
                _send(out, {"type": "status", "forwarders": now})
                last = now
            await asyncio.sleep(REPORT_INTERVAL)

    tasks = [asyncio.create_task(c) for c in (read_commands(), refresh(), report())]
    await done.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for f in fwds:
        await f.stop()
    _send(out, {"type": "status", "forwarders": [f.status().as_dict() for f in fwds]})
    view.close()


def child_main() -> int:
    """``python -m labd.hubservice``: the spec on stdin's first line, then wake-ups."""
    # The protocol to the daemon gets a descriptor of its own; whatever a library prints goes
    # to stderr instead of corrupting it.
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    logging.getLogger().handlers[:] = [_PipeHandler(out)]
    try:
        asyncio.run(_child(out))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
