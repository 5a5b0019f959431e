"""Safety interlocks: configured conditions on device values, watched continuously.

Each interlock (``interlocks.rules`` in the daemon's config) is a condition and an action::

    - name: glovebox-o2
      when: safety.o2_ppm > 10          # or: device_down: [furnace]
      action: suspend                   # transient: the run waits, and resumes by itself
      resume_after_s: 2
    - name: e-stop
      when: safety.estop
      action: abort                     # hard: abort the run, every device to its safe state

Conditions are a small language, parsed when the config is loaded (a typo is a config error,
not a silent never-tripping interlock): ``device.value`` (truthy), comparisons with ``>``, ``>=``,
``<``, ``<=``, ``==``, ``!=`` against numbers and ``true``/``false``, ``and``, ``or``, ``not``,
parentheses. The values (:data:`VARIABLES`) come from the safety gateway's MQTT telemetry (pushed:
evaluated on every change event of :class:`~drivers.instruments.safety.SafetySensors`) and from
Modbus/serial status polled every ``poll_period_s`` (furnace status word, GRBL ``?``).

Unknown values (the gateway offline, a reading stale, a poll that failed) make a condition
*unknown* (three-valued logic: ``false and unknown`` is false). ``on_unknown: trip`` (fail closed)
treats unknown as tripped, ``hold`` keeps the interlock as it was; a device that stops answering
is what ``device_down`` interlocks are for.

Actions:

* ``suspend``: a Bluesky suspender (:class:`InterlockSuspender`, a ``SuspendBoolHigh`` on a flag
  this service feeds) is installed on the RunEngine: a running plan suspends at once (rewinding to
  its last checkpoint) and resumes ``resume_after_s`` after the condition clears; a plan started
  meanwhile waits before its first message.
* ``abort``: the current run is aborted (``engine.control(ABORT, reason)``, history ``aborted``
  with the interlock's reason) and every device is driven to its safe state
  (:meth:`drivers.cell.CellDevices.safe_state`), whether or not anything runs; while the condition
  holds, no new item starts (an ``engine.start_guards`` entry refuses it).

Latching (``latch``, default true for ``abort``): a hard interlock that tripped stays *latched*
after its condition clears, and nothing starts until a technician acknowledges it
(:meth:`SafetyService.acknowledge`: ``POST /api/v1/interlocks/{name}/acknowledge``, ``labctl
interlocks ack NAME``, the dashboard's button). Why: the cell was aborted into its safe state with
a crucible wherever it was; a released e-stop or a furnace alarm that reset itself is no proof
that the cell is fit to go on, and an unattended queue must not restart on its own. The
acknowledgement is refused while the condition still holds. The latch is durable: it is rebuilt
from ``interlock_events`` at start-up, so a restart (or a SIGKILL) does not clear it.

``during_run: true`` (the default for ``device_down``) arms an interlock only while a run is in
progress; its start guard still refuses a new item while the condition holds.

Every trip and clear is logged (with ``fields`` for ``--log-json``), recorded in the table
``interlock_events`` of the daemon's SQLite file, and pushed on the engine's event bus as
``{"type": "interlock", "name", "action", "event": "tripped"|"cleared", "reason", "latched",
...}``; what an abort did follows as ``event: "handled"`` (aborted item, safe-state result per
device), and an acknowledgement as ``event: "acknowledged"`` (who, from where).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bluesky.suspenders import SuspendBoolHigh
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.aio import cancel_and_wait, wait_for

from .engine import Control, Engine, EngineError, EngineState

log = logging.getLogger("labd.safety")

# -- the condition language ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    """A value a condition may use: ``device.key``; ``source`` says how it is obtained."""

    device: str
    key: str
    source: Literal["push", "poll"]
    kind: Literal["number", "bool"]
    doc: str


VARIABLES: dict[str, Variable] = {
    v.device + "." + v.key: v
    for v in (
        Variable("safety", "o2_ppm", "push", "number", "glovebox O2, ppm"),
        Variable("safety", "h2o_ppm", "push", "number", "glovebox H2O, ppm"),
        Variable("safety", "door_open", "push", "bool", "glovebox/enclosure door open"),
        Variable("safety", "estop", "push", "bool", "emergency stop pressed"),
        Variable("safety", "online", "push", "bool", "safety gateway online"),
        Variable("furnace", "over_temperature", "poll", "bool", "over-temperature alarm on"),
        Variable("furnace", "sensor_break", "poll", "bool", "thermocouple sensor break"),
        Variable("furnace", "standby", "poll", "bool", "instrument in standby"),
        Variable("furnace", "temperature", "poll", "number", "process value, degC"),
        Variable("gantry", "moving", "poll", "bool", "an axis is moving (Run/Jog/Home)"),
        Variable("gantry", "alarm", "poll", "bool", "the controller is in Alarm"),
    )
}

#: Devices whose "not answering" can be watched (``device_down``): polled ones fail their poll,
#: MQTT ones lose their presence (last will).
DOWN_WATCHABLE = ("furnace", "gantry", "safety", "station")

_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<op>>=|<=|==|!=|>|<|\(|\))"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?))"
)

Tri = bool | None  # three-valued: True, False, None (unknown)
Lookup = Callable[[str], float | bool | None]


class InterlockError(RuntimeError):
    """An interlock operation that cannot be done now (e.g. acknowledging one whose condition
    still holds)."""


class ConditionError(ValueError):
    pass


@dataclass(frozen=True)
class Node:
    op: str  # "var", "cmp", "and", "or", "not"
    args: tuple[Any, ...]

    def variables(self) -> set[str]:
        if self.op == "var":
            return {self.args[0]}
        if self.op == "cmp":
            return {self.args[1]}
        out: set[str] = set()
        for a in self.args:
            out |= a.variables()
        return out

    def eval(self, lookup: Lookup) -> Tri:
        if self.op == "var":
            v = lookup(self.args[0])
            return None if v is None else bool(v)
        if self.op == "cmp":
            op, name, literal = self.args
            v = lookup(name)
            if v is None:
                return None
            return bool(_COMPARE[op](v, literal))
        if self.op == "not":
            v = self.args[0].eval(lookup)
            return None if v is None else not v
        values = [a.eval(lookup) for a in self.args]
        if self.op == "and":
            if any(v is False for v in values):
                return False
            return None if any(v is None for v in values) else True
        if any(v is True for v in values):
            return True
        return None if any(v is None for v in values) else False


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def parse_condition(text: str) -> Node:
    """Parse ``text`` (see the module docstring); raise :class:`ConditionError` saying where."""
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ConditionError(f"cannot read {text[pos:]!r} (at column {pos + 1})")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if not tokens:
        raise ConditionError("empty condition")
    i = 0

    def peek() -> tuple[str, str, int] | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> tuple[str, str, int]:
        nonlocal i
        tok = peek()
        if tok is None:
            raise ConditionError(f"{text!r} ends too early")
        i += 1
        return tok

    def expr() -> Node:
        left = term()
        parts = [left]
        while (t := peek()) is not None and t[0] == "word" and t[1] == "or":
            take()
            parts.append(term())
        return parts[0] if len(parts) == 1 else Node("or", tuple(parts))

    def term() -> Node:
        parts = [factor()]
        while (t := peek()) is not None and t[0] == "word" and t[1] == "and":
            take()
            parts.append(factor())
        return parts[0] if len(parts) == 1 else Node("and", tuple(parts))

    def factor() -> Node:
        kind, value, col = take()
        if kind == "word" and value == "not":
            return Node("not", (factor(),))
        if kind == "op" and value == "(":
            node = expr()
            _k, v, c = take()
            if v != ")":
                raise ConditionError(f"expected ')' at column {c + 1}, got {v!r}")
            return node
        if kind != "word" or value in ("and", "or", "true", "false"):
            raise ConditionError(f"expected a device value at column {col + 1}, got {value!r}")
        var = VARIABLES.get(value)
        if var is None:
            known = ", ".join(sorted(VARIABLES))
            raise ConditionError(f"unknown value {value!r} (known: {known})")
        t = peek()
        if t is None or t[0] != "op" or t[1] in ("(", ")"):
            return Node("var", (value,))
        op = take()[1]
        lk, lv, lc = take()
        literal: float | bool
        if lk == "num":
            literal = float(lv)
        elif lk == "word" and lv in ("true", "false"):
            literal = lv == "true"
        else:
            raise ConditionError(f"expected a number or true/false at column {lc + 1}, "
                                 f"got {lv!r}")
        if var.kind == "bool" and not isinstance(literal, bool):
            raise ConditionError(f"{value} is true/false, compared with {lv}")
        if var.kind == "number" and isinstance(literal, bool):
            raise ConditionError(f"{value} is a number, compared with {lv}")
        if isinstance(literal, bool) and op not in ("==", "!="):
            raise ConditionError(f"{value} {op} {lv}: true/false take == or != only")
        return Node("cmp", (op, value, literal))

    node = expr()
    if (t := peek()) is not None:
        raise ConditionError(f"unexpected {t[1]!r} at column {t[2] + 1}")
    return node


# -- configuration ---------------------------------------------------------------------------------


class InterlockConfig(BaseModel):
    """One interlock: ``when`` (a condition) or ``device_down`` (devices), and an action."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    when: str | None = None
    device_down: list[str] | None = None
    action: Literal["suspend", "abort"]
    #: suspend: seconds to wait after the condition clears before the run resumes.
    resume_after_s: float = Field(default=0.0, ge=0)
    #: Unknown values: ``trip`` (fail closed) or ``hold`` (keep the interlock as it is).
    on_unknown: Literal["trip", "hold"] = "trip"
    #: Armed only while a run is in progress (default: true for device_down, false otherwise).
    during_run: bool | None = None
    #: Stay latched after the condition clears, until acknowledged (default: true for abort).
    latch: bool | None = None
    description: str = ""

    @field_validator("device_down", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> InterlockConfig:
        if (self.when is None) == (self.device_down is None):
            raise ValueError(f"interlock {self.name}: give exactly one of 'when' or "
                             "'device_down'")
        if self.when is not None:
            try:
                parse_condition(self.when)
            except ConditionError as exc:
                raise ValueError(f"interlock {self.name}: when: {exc}") from None
        if self.device_down is not None:
            if not self.device_down:
                raise ValueError(f"interlock {self.name}: device_down names no device")
            bad = [d for d in self.device_down if d not in DOWN_WATCHABLE]
            if bad:
                raise ValueError(f"interlock {self.name}: device_down cannot watch {bad} "
                                 f"(watchable: {', '.join(DOWN_WATCHABLE)})")
        if self.during_run is None:
            self.during_run = self.device_down is not None
        if self.latch is None:
            self.latch = self.action == "abort"
        elif self.latch and self.action == "suspend":
            raise ValueError(f"interlock {self.name}: latch is for abort interlocks (a suspended "
                             "run resumes by itself when the condition clears)")
        return self

    def condition(self) -> Node | None:
        return parse_condition(self.when) if self.when is not None else None

    def devices(self) -> set[str]:
        if self.device_down is not None:
            return set(self.device_down)
        node = self.condition()
        assert node is not None
        return {VARIABLES[v].device for v in node.variables()}


def default_rules() -> list[InterlockConfig]:
    """The simulated cell's interlocks (and a sensible start for a real one)."""
    return [
        InterlockConfig(name="glovebox-o2", when="safety.o2_ppm > 10", action="suspend",
                        resume_after_s=2.0,
                        description="glovebox O2 above 10 ppm: wait until the box recovers"),
        InterlockConfig(name="e-stop", when="safety.estop", action="abort",
                        description="emergency stop pressed (or its state unknown)"),
        InterlockConfig(name="furnace-over-temperature", when="furnace.over_temperature",
                        action="abort", on_unknown="hold",
                        description="the furnace's over-temperature alarm"),
        InterlockConfig(name="door-open-while-moving", when="gantry.moving and safety.door_open",
                        action="abort", on_unknown="hold",
                        description="the door opened while the gantry moves"),
        InterlockConfig(name="device-not-answering", device_down=["furnace", "gantry"],
                        action="abort",
                        description="a furnace or gantry that stops answering during a run"),
    ]


class InterlocksConfig(BaseModel):
    """``interlocks:`` in the daemon's config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Seconds between polls of Modbus/serial status (furnace, gantry).
    poll_period_s: float = Field(default=0.5, gt=0)
    #: A poll that takes longer than this has failed.
    poll_timeout_s: float = Field(default=3.0, gt=0)
    #: Consecutive failed polls after which a device counts as not answering.
    down_after: int = Field(default=2, ge=1)
    #: None: :func:`default_rules` (those naming a device the cell lacks are left out, with a
    #: warning); a list given here is used as is, and a device it names must exist.
    rules: list[InterlockConfig] | None = None

    @model_validator(mode="after")
    def _unique(self) -> InterlocksConfig:
        names = [r.name for r in self.rules or []]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"interlock names must be unique: {', '.join(dup)} repeated")
        return self


# -- the service -----------------------------------------------------------------------------------

EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS interlock_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    time    REAL NOT NULL,
    name    TEXT NOT NULL,
    action  TEXT NOT NULL,
    event   TEXT NOT NULL,
    reason  TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS interlock_events_name ON interlock_events(name, event);
"""


class EventLog:
    """The durable record of interlock events (a table in the daemon's SQLite file)."""

    def __init__(self, path: Path | str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(EVENTS_SCHEMA)

    def add(self, name: str, action: str, event: str, reason: str,
            detail: dict[str, Any], at: float | None = None) -> None:
        """Record an event; ``at`` is when it happened (the write may come a little later)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO interlock_events (time, name, action, event, reason, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time() if at is None else at, name, action, event, reason,
                 json.dumps(detail, default=str)),
            )

    def latched(self) -> dict[str, tuple[str, float]]:
        """Interlocks whose last trip was not acknowledged: name -> (reason, time of the trip)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, event, reason, time FROM interlock_events "
                "WHERE event IN ('tripped', 'acknowledged') ORDER BY time, id").fetchall()
        out: dict[str, tuple[str, float]] = {}
        for name, event, reason, at in rows:
            if event == "tripped":
                out[name] = (reason, at)
            else:
                out.pop(name, None)
        return out

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM interlock_events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    def trip_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT name, COUNT(*) FROM interlock_events "
                                    "WHERE event = 'tripped' GROUP BY name").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class FlagSignal:
    """The minimal ophyd-style signal a Bluesky suspender watches (``subscribe``/``clear_sub``),
    fed by :class:`SafetyService` on the RunEngine's loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = False
        self._subs: list[Callable[..., Any]] = []

    def subscribe(self, cb: Callable[..., Any], event_type: Any = None, run: bool = True) -> int:
        self._subs.append(cb)
        if run:
            cb(self.value)
        return len(self._subs)

    def clear_sub(self, cb: Callable[..., Any]) -> None:
        if cb in self._subs:
            self._subs.remove(cb)

    def put(self, value: bool) -> None:
        self.value = value
        for cb in list(self._subs):
            cb(value)

    def __repr__(self) -> str:
        return f"FlagSignal({self.name!r})"


class InterlockSuspender(SuspendBoolHigh):
    """``SuspendBoolHigh`` whose justification names the interlock and why it tripped."""

    def __init__(self, signal: FlagSignal, interlock: Interlock, sleep: float) -> None:
        super().__init__(signal, sleep=sleep)
        self.interlock = interlock

    def _get_justification(self) -> str:
        if not self.tripped:
            return ""
        return f"interlock {self.interlock.name}: {self.interlock.reason}"


@dataclass
class Interlock:
    """The live state of one configured interlock."""

    config: InterlockConfig
    node: Node | None
    active: bool = False
    #: The condition itself (unknown resolved by ``on_unknown``), whether armed or not.
    condition: bool = False
    reason: str = ""
    trips: int = 0
    since: float | None = None
    #: Tripped (``latch``) and not acknowledged yet; ``reason`` and ``tripped_at`` are the trip's.
    latched: bool = False
    tripped_at: float | None = None
    signal: FlagSignal | None = None
    suspender: InterlockSuspender | None = None
    handling: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def hard(self) -> bool:
        return self.config.action == "abort"

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {"name": c.name, "action": c.action, "when": c.when,
                "device_down": c.device_down, "active": self.active, "reason": self.reason,
                "since": self.since, "trips": self.trips, "during_run": c.during_run,
                "latch": c.latch, "latched": self.latched, "tripped_at": self.tripped_at,
                "description": c.description}


@dataclass
class _Poll:
    values: dict[str, float | bool] = field(default_factory=dict)
    at: float = 0.0
    failures: int = 0
    error: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class SafetyService:
    """Watches the interlocks of one cell and acts on them (see the module docstring).

    ``cell`` is a :class:`drivers.cell.CellDevices` (``clients``, ``down``, ``safe_state()``).
    Start and stop it on the engine's loop.
    """

    name = "safety"

    def __init__(self, engine: Engine, cell: Any, config: InterlocksConfig,
                 db_path: Path | str) -> None:
        self.engine = engine
        self.cell = cell
        self.config = config
        self.db_path = Path(db_path)
        self.interlocks: dict[str, Interlock] = {}
        self.event_log: EventLog | None = None
        self._polls: dict[str, _Poll] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._remove_listener: Callable[[], None] | None = None
        self._wake: asyncio.Event | None = None
        self._guard = self._start_guard

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.config.enabled:
            log.warning("interlocks are disabled by configuration")
            return
        present = set(self.cell.clients)
        rules = self.config.rules
        if rules is None:
            rules = []
            for r in default_rules():
                missing = r.devices() - present
                if missing:
                    log.warning("interlock %s left out: the cell has no %s", r.name,
                                ", ".join(sorted(missing)))
                else:
                    rules.append(r)
        else:
            for r in rules:
                missing = r.devices() - present
                if missing:
                    raise ValueError(f"interlock {r.name} needs {', '.join(sorted(missing))}, "
                                     "which this cell does not have")
        self.event_log = await asyncio.to_thread(EventLog, self.db_path)
        counts = await asyncio.to_thread(self.event_log.trip_counts)
        latched = await asyncio.to_thread(self.event_log.latched)
        self._wake = asyncio.Event()
        for r in rules:
            il = Interlock(r, r.condition(), trips=counts.get(r.name, 0))
            if r.latch and r.name in latched:
                il.latched = True
                il.reason, il.tripped_at = latched[r.name]
                log.warning("interlock %s is still latched from %s (%s): nothing starts until "
                            "it is acknowledged", r.name, time.ctime(il.tripped_at), il.reason)
            if r.action == "suspend":
                il.signal = FlagSignal(f"interlock:{r.name}")
                il.suspender = InterlockSuspender(il.signal, il, r.resume_after_s)
                self.engine.RE.install_suspender(il.suspender)
            self.interlocks[r.name] = il
        polled = {d for r in rules for d in r.devices() if d in ("furnace", "gantry")}
        for dev in sorted(polled):
            self._polls[dev] = _Poll()
            self._tasks.append(asyncio.create_task(self._poll_loop(dev), name=f"interlock-{dev}"))
        safety = self.cell.clients.get("safety")
        if safety is not None:
            self._remove_listener = safety.on_change(self._on_safety_event)
        self.engine.start_guards.append(self._guard)
        self._tasks.append(asyncio.create_task(self._evaluate_loop(), name="interlocks"))
        self.evaluate("start")
        log.info("interlocks armed: %s", ", ".join(self.interlocks) or "none")

    async def stop(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        with contextlib.suppress(ValueError):
            self.engine.start_guards.remove(self._guard)
        for il in self.interlocks.values():
            if il.suspender is not None:
                self.engine.RE.remove_suspender(il.suspender)
        await cancel_and_wait(self._tasks)  # the watchers
        handling = [il.handling for il in self.interlocks.values() if il.handling is not None]
        await asyncio.gather(*handling, return_exceptions=True)  # a safe state is finished
        self._tasks.clear()
        if self.event_log is not None:
            self.event_log.close()
            self.event_log = None

    # -- state for the API and metrics -------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        return [il.to_dict() for il in self.interlocks.values()]

    def active(self) -> list[Interlock]:
        return [il for il in self.interlocks.values() if il.active]

    def _start_guard(self, protocol: str) -> str | None:
        reasons = []
        for il in self.interlocks.values():
            if not il.hard:
                continue
            if il.active or il.condition:
                reasons.append(f"interlock {il.name} is active: "
                               f"{il.reason if il.active else self._explain(il, True)}")
            elif il.latched:
                reasons.append(f"interlock {il.name} tripped ({il.reason}) and is latched: "
                               f"check the cell, then acknowledge it (labctl interlocks ack "
                               f"{il.name})")
        return "; ".join(reasons) or None

    async def acknowledge(self, name: str, user: str, source: str = "") -> dict[str, Any]:
        """Release the latch of interlock ``name`` (a technician has checked the cell); returns
        its state. Raises KeyError for an unknown interlock, :class:`InterlockError` if it is
        not latched or its condition still holds. Durable before it returns. On the loop."""
        il = self.interlocks.get(name)
        if il is None:
            raise KeyError(f"no interlock named {name!r} (known: {', '.join(self.interlocks)})")
        if not il.latched:
            raise InterlockError(f"interlock {name} is not latched: nothing to acknowledge")
        self.evaluate("acknowledge")
        if il.active or il.condition:
            raise InterlockError(f"interlock {name} cannot be acknowledged: its condition still "
                                 f"holds ({il.reason if il.active else self._explain(il, True)})")
        at = time.time()
        il.latched = False
        fields = {"interlock": name, "action": il.config.action, "event": "acknowledged",
                  "reason": il.reason, "user": user, "source": source}
        log.warning("interlock %s acknowledged by %s (%s)", name, user, source,
                    extra={"fields": fields})
        if self.event_log is not None:
            await asyncio.to_thread(self.event_log.add, name, il.config.action, "acknowledged",
                                    il.reason, {"user": user, "source": source}, at)
        self.engine.events.publish("interlock", name=name, action=il.config.action,
                                   event="acknowledged", reason=il.reason, latched=il.latched,
                                   user=user, source=source)
        await asyncio.to_thread(self.engine.notify_queue_changed)
        return il.to_dict()

    # -- inputs ----------------------------------------------------------------------------------
    def _on_safety_event(self, _event: Any) -> None:
        # A door or e-stop change: refresh the polled values those conditions also use, now.
        for il in self.interlocks.values():
            if il.node is not None and "safety" in il.config.devices():
                for dev in il.config.devices() & set(self._polls):
                    self._polls[dev].wake.set()
        self.evaluate("safety")

    async def _poll_once(self, dev: str) -> dict[str, float | bool]:
        client = self.cell.clients[dev]
        if dev == "furnace":
            st = await client.status()
            values: dict[str, float | bool] = {"over_temperature": st.over_temperature,
                                               "sensor_break": st.sensor_break,
                                               "standby": st.standby}
            if any("furnace.temperature" in (il.node.variables() if il.node else set())
                   for il in self.interlocks.values()):
                values["temperature"] = await client.temperature()
            return values
        st = await client.status()
        return {"moving": st.moving, "alarm": st.state == "Alarm"}

    async def _poll_loop(self, dev: str) -> None:
        p = self._polls[dev]
        cfg = self.config
        while True:
            p.wake.clear()
            try:
                p.values = await wait_for(self._poll_once(dev), cfg.poll_timeout_s)
                p.at = time.monotonic()
                p.failures, p.error = 0, None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                p.failures += 1
                p.error = f"{type(exc).__name__}: {exc}".strip()
                log.debug("interlock poll of %s failed (%d): %s", dev, p.failures, p.error)
            self.evaluate(f"poll {dev}")
            with contextlib.suppress(TimeoutError):
                await wait_for(p.wake.wait(), cfg.poll_period_s)

    async def _evaluate_loop(self) -> None:
        """Periodic evaluation: arms/disarms ``during_run`` interlocks as runs start and end."""
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), self.config.poll_period_s)
            self._wake.clear()
            self.evaluate("periodic")

    def _lookup(self, name: str) -> float | bool | None:
        var = VARIABLES[name]
        if var.device == "safety":
            safety = self.cell.clients.get("safety")
            if safety is None:
                return None
            if var.key == "online":
                return bool(safety.online)
            try:
                return {"o2_ppm": lambda: safety.oxygen_ppm, "h2o_ppm": lambda: safety.water_ppm,
                        "door_open": lambda: safety.door_open,
                        "estop": lambda: safety.estop}[var.key]()
            except Exception:  # DriverError: offline, stale, in fault -> unknown
                return None
        p = self._polls.get(var.device)
        if p is None or p.failures or not p.at:
            return None
        if time.monotonic() - p.at > 3 * self.config.poll_period_s + self.config.poll_timeout_s:
            return None
        return p.values.get(var.key)

    def _down(self, devices: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for dev in devices:
            if dev in self.cell.down:
                out[dev] = self.cell.down[dev]
            elif dev in self._polls:
                p = self._polls[dev]
                if p.failures >= self.config.down_after:
                    out[dev] = f"{p.failures} polls failed: {p.error}"
            else:
                client = self.cell.clients.get(dev)
                if client is not None and not getattr(client, "online", True):
                    out[dev] = "offline (last will)"
        return out

    def _explain(self, il: Interlock, value: Tri) -> str:
        if il.config.device_down is not None:
            down = self._down(il.config.device_down)
            return "; ".join(f"{d} is not answering ({why})" for d, why in down.items())
        assert il.node is not None
        parts = []
        for name in sorted(il.node.variables()):
            v = self._lookup(name)
            parts.append(f"{name}={'unknown' if v is None else v}")
        lead = il.config.when if value else f"{il.config.when} (unknown)"
        return f"{lead}: {', '.join(parts)}"

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, trigger: str = "") -> None:
        """Re-evaluate every interlock now (on the loop); act on changes."""
        running = self.engine.state in (EngineState.RUNNING, EngineState.PAUSED,
                                        EngineState.STOPPING)
        for il in self.interlocks.values():
            cfg = il.config
            if cfg.device_down is not None:
                value: Tri = bool(self._down(cfg.device_down))
            else:
                assert il.node is not None
                value = il.node.eval(self._lookup)
            unknown_as = True if cfg.on_unknown == "trip" else il.condition
            cond = unknown_as if value is None else value
            il.condition = cond
            armed = cond and (running or not cfg.during_run)
            if cfg.during_run and il.active and not running and cond:
                armed = True  # stays tripped until the condition itself clears
            if armed and not il.active:
                self._trip(il, self._explain(il, value), trigger)
            elif not armed and il.active:
                self._clear(il, trigger)

    def _record(self, il: Interlock, event: str, reason: str, **detail: Any) -> None:
        cfg = il.config
        fields = {"interlock": il.name, "action": cfg.action, "event": event, "reason": reason,
                  **detail}
        level = logging.WARNING if event == "tripped" else logging.INFO
        log.log(level, "interlock %s %s (%s): %s", il.name, event, cfg.action, reason,
                extra={"fields": fields})
        self.engine.events.publish("interlock", name=il.name, action=cfg.action, event=event,
                                   reason=reason, latched=il.latched, **detail)
        if self.event_log is not None:
            elog = self.event_log
            task = asyncio.get_running_loop().run_in_executor(
                None, elog.add, il.name, cfg.action, event, reason, detail, time.time())
            task.add_done_callback(_log_failure)

    def _trip(self, il: Interlock, reason: str, trigger: str) -> None:
        il.active, il.reason, il.since = True, reason, time.time()
        il.trips += 1
        if il.hard and il.config.latch:
            il.latched, il.tripped_at = True, il.since
        item = self.engine.current.entry.item_uid if self.engine.current else None
        self._record(il, "tripped", reason, trigger=trigger, item_uid=item,
                     engine=str(self.engine.state))
        if il.signal is not None:
            il.signal.put(True)
        if il.hard:
            il.handling = asyncio.create_task(self._handle_hard(il, reason),
                                              name=f"interlock-{il.name}")

    def _clear(self, il: Interlock, trigger: str) -> None:
        held = time.time() - (il.since or time.time())
        il.active, il.since = False, None
        if il.signal is not None:
            il.signal.put(False)
        extra = ({"resume_after_s": il.config.resume_after_s}
                 if il.config.action == "suspend" else {})
        self._record(il, "cleared", il.reason, trigger=trigger, held_s=round(held, 3), **extra)

    async def _handle_hard(self, il: Interlock, reason: str) -> None:
        """Abort the run (if any) and bring every device to its safe state, concurrently: the
        abort interrupts the plan at once; the safe state does not wait for its cleanup."""
        engine = self.engine
        loop = asyncio.get_running_loop()
        item = engine.current.entry.item_uid if engine.current else None
        aborted: str | None = None
        abort_error: str | None = None
        if engine.state in (EngineState.RUNNING, EngineState.PAUSED):
            abort = loop.run_in_executor(None, engine.control, Control.ABORT,
                                         f"interlock {il.name}: {reason}")
            # The abort returns once the plan is interrupted (its cleanup goes on): request it
            # first, so a device stopped by the safe state does not fail the plan instead.
            try:
                await wait_for(asyncio.shield(abort), 2.0)
                aborted = item
            except TimeoutError:
                abort_error = "the abort did not return within 2 s"
            except (EngineError, Exception) as exc:  # the run ended in between
                abort_error = f"{type(exc).__name__}: {exc}"
        safe = await self.cell.safe_state()
        unsafe = {d: e for d, e in safe.items() if e}
        if unsafe:
            log.error("interlock %s: devices that may not be safe: %s", il.name, unsafe)
        self._record(il, "handled", reason, aborted_item=aborted, abort_error=abort_error,
                     safe_state={d: (e or "ok") for d, e in safe.items()})


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("could not record an interlock event: %s", fut.exception())
