"""Mettler Toledo Quantos powder doser simulator (MT-SICS with QRA/QRD extensions, serial).

Wire: 9600 8N1 (``serial.baudrate``). The real Quantos wants XON/XOFF flow control; that is a
setting of the host's port (pyserial ``xonxoff=True``) and changes nothing on a pty, where the
simulator never sends XON/XOFF bytes. ASCII, commands in upper case, every line ends CR LF.
Served on a raw pty (stable symlink ``<run_dir>/<name>``) and optionally on TCP.

Command set (from the public drivers: RobInHoodPy ``mettler_quantos_qb1.py``, heingroup's
``mettler_toledo_quantos``; where they and PROTOCOLS.md disagree the manual wins). Replies to
``QRA`` actions name the action without its argument (``QRA 60 7 3`` -> ``QRA 60 7 B``).

Settings and queries (one reply)::

    QRD 1 1 5 <mg>      -> QRD 1 1 5 A          target mass, 0.10..250000 mg (else ... L)
    QRD 1 1 6 <%>       -> QRD 1 1 6 A          tolerance window 0.1..40 % (judges Validity)
    QRD 1 1 7 <0|1>     -> QRD 1 1 7 A          tolerance mode: 0 = ±, 1 = 0/+ (never under)
    QRD 1 1 8 <id>      -> QRD 1 1 8 A          sample id, 1..20 characters
    QRD 1 1 1 <0|1>, QRD 1 1 3 <10..100>, QRD 1 1 4 <1..10>, QRD 1 1 14 <0|1>, QRD 1 1 15 <0|1>
                        -> ... A                tapping, tapper intensity/time, algorithm,
                                                antistatic: stored, no effect on the simulation
    (any setting during a running job -> ... I 2; a bad value -> ... L)
    QRD 2 3 7           -> QRD 2 3 7 <n> A      front door: 2 closed, 3 open, 9 running
    QRD 2 2 8           -> QRD 2 2 8 1 A        sampler (QS30) present and selected
    QRD 2 4 11          -> QRD 2 4 11 B, XML lines, QRD 2 4 11 A    mounted head's data
                           (QRD 2 4 11 I 1 when no head is mounted)
    QRD 2 4 12          -> QRD 2 4 12 B, XML lines, QRD 2 4 12 A    result of the last dose
                           (QRD 2 4 12 I 5 before any dose)

Actions (two-phase: ``B`` at once, then ``A`` when done or ``I <n>`` when it failed; a job that
cannot start answers ``I <n>`` at once without ``B``; one job at a time)::

    QRA 61 1            start dosing the target with the mounted head into the vial (crucible)
                        at world location ``location``: B, then A after the dosing time
                        (dosed mass / head flow rate) plus the settling time ``settle_s``.
                        I 1 no head mounted, I 2 another job running, I 5 door open / no vial /
                        no target (at once); after B: I 6 weight not stable before dosing,
                        I 7 powder flow error (the head ran out: what it had was dosed),
                        I 3 timeout (longer than max_dose_s), I 8 stopped (QRA 61 4).
    QRA 61 4            stop a running dose: B, A (the dose answers I 8)
    QRA 60 7 <3|2>      open / close the front door (door_s virtual seconds)
    QRA 60 8 <0..30>    move the sampler to a position (home 0); I 5 while a head is locked in
    QRA 60 2 <4|3>      lock / unlock the dosing-head pin. Locking mounts the head held at the
                        current sampler position (I 1 if there is none); unlocking unmounts it.

The sampler positions 1..30 hold the dosing heads (``heads``); mounting a head is: move the
sampler to its position, lock the pin (``QRA 60 8 3`` then ``QRA 60 2 4``), as the real QS30
plus pin does; the control action ``mount_head`` does the same by hand, at once.

Weighing (the Quantos' own XPE balance, MT-SICS level 0/1: ``S``, ``SI``, ``SIR``, ``Z``, ``ZI``,
``T``, ``TA``, ``TAC``, ``I1``..``I4``, ``@``; see :mod:`hardware_sims.mtsics`): the vial sits on
the balance; each dose tares it first, so ``S`` after a dose answers the dosed mass (net), e.g.
``S S     0.01003 g``. ``@`` also cancels a running job without a final reply.

XML of ``QRD 2 4 11`` (leaf tags as the public drivers read them; the root element name is the
simulator's)::

    <?xml version="1.0" encoding="UTF-8"?>
    <Dosing_head>
    <Head_ID>...</Head_ID>
    <Substance>Fe</Substance>
    <Lot_ID>...</Lot_ID>
    <Content Unit="mg">25000.00</Content>            powder filled in
    <Rem._quantity Unit="mg">24990.00</Rem._quantity>   powder left
    <Dose_limit>999</Dose_limit>
    <Dosing_counter>1</Dosing_counter>
    <Rem._dosages>998</Rem._dosages>
    </Dosing_head>

Faults: ``no_reply``, ``late_reply``, ``garble``, ``truncate`` apply to each reply line (so a
two-phase job can lose its ``B`` or its ``A``; a garbled byte may become XON/XOFF, which a host
with XON/XOFF enabled swallows); ``disconnect`` drops the pty for ``duration_s``
(jobs keep running; replies sent while the cable is out are lost). ``error`` with ``code`` makes
the next two-phase job (``count`` jobs) end with ``I <code>`` (no code: ``I 3``): a dose stops
after half its mass (the half is in the vial), a door/sampler/pin move does not happen.

Control actions: ``mount_head {"head": n}`` (sampler to n, pin locked), ``unmount_head {}``,
``refill {"head": n, "grams": g}`` (adds powder), ``set_powder {"head": n, "grams": g}``,
``set_door {"open": bool}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .base import DeviceConfig, SerialEndpointConfig, SimContext, SimInstrument
from .faults import FaultKind
from .mtsics import LoadCell, SicsWeigher, format_weight
from .serial_link import SerialEndpoint


class DosingHeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    element: str
    #: Powder left in the head, grams.
    powder_g: float = Field(default=25.0, ge=0)
    #: Dosing rate, mg per virtual second.
    flow_mg_s: float = Field(default=5.0, gt=0)
    #: Relative standard deviation of the dosed mass around the target.
    tolerance: float = Field(default=0.01, ge=0, le=0.5)


class DoserConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    model: str = "QB1"
    serial_number: str = "Q1039527"
    #: Dosing heads by sampler position (1..30). Empty: one head per ground-truth element,
    #: in positions 1, 2, ...
    heads: dict[int, DosingHeadConfig] = Field(default_factory=dict)
    #: Head mounted at start (None: none).
    mounted: int | None = None
    #: World location whose crucible is under the dosing head.
    location: str = "doser"
    #: The internal balance (an XPE205-class weighing module).
    capacity_g: float = Field(default=220.0, gt=0)
    readability_g: float = Field(default=0.00001, gt=0)
    noise_g: float = Field(default=0.00001, ge=0)
    #: Settling of the balance after a load change, and the settling phase after a dose (virtual s).
    settle_s: float = Field(default=2.0, ge=0)
    #: Longest wait for a stable weight (``S``, the tare before a dose), virtual seconds.
    stable_timeout_s: float = Field(default=10.0, gt=0)
    #: Longest dispensing phase; beyond it the dose stops with ``I 3`` (virtual s).
    max_dose_s: float = Field(default=300.0, gt=0)
    #: Front door travel time (virtual s).
    door_s: float = Field(default=3.0, ge=0)
    #: Sampler move: a fixed part plus a part per position travelled (virtual s).
    sampler_s: float = Field(default=1.0, ge=0)
    sampler_s_per_position: float = Field(default=0.3, ge=0)
    #: Pin lock/unlock time (virtual s).
    pin_s: float = Field(default=1.0, ge=0)
    #: Doses a head allows (``Dose_limit`` in the head data).
    dose_limit: int = Field(default=999, ge=1)
    software: str = "2.30"
    #: ``SIR`` update interval (virtual seconds).
    update_s: float = Field(default=0.1, gt=0)


SAMPLER_POSITIONS = 30
DOOR_CLOSED, DOOR_OPEN, DOOR_RUNNING = 2, 3, 9
#: Dispensing advances in steps of at most this many virtual seconds (the vial's weight grows).
DOSE_STEP_S = 0.5


@dataclass
class _Job:
    """A two-phase action: ``run(forced_error_code)``, and a check before it starts."""

    run: Callable[[int | None], Awaitable[None]]
    check: Callable[[], tuple[int, str] | None] = lambda: None


class JobFailed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Head:
    position: int
    element: str
    powder_mg: float
    flow_mg_s: float
    tolerance: float
    filled_mg: float
    doses: int = 0

    def state(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "element": self.element,
            "powder_g": self.powder_mg / 1000.0,
            "flow_mg_s": self.flow_mg_s,
            "tolerance": self.tolerance,
            "doses": self.doses,
        }


@dataclass
class DoseResult:
    head: int
    element: str
    target_mg: float
    actual_mg: float
    tolerance_pct: float
    tolerance_mode: int
    sample_id: str
    outcome: str  # "A" or "I <n>"
    started_s: float
    ended_s: float

    @property
    def valid(self) -> bool:
        if self.outcome != "A" or self.target_mg <= 0:
            return False
        dev = (self.actual_mg - self.target_mg) / self.target_mg * 100.0
        lower = 0.0 if self.tolerance_mode == 1 else -self.tolerance_pct
        return lower <= dev <= self.tolerance_pct

    def state(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "element": self.element,
            "target_mg": self.target_mg,
            "actual_mg": self.actual_mg,
            "outcome": self.outcome,
            "valid": self.valid,
            "started_s": self.started_s,
            "ended_s": self.ended_s,
        }


#: Numeric settings: (name, min, max, integer).
_SETTINGS: dict[str, tuple[str, float, float, bool]] = {
    "1 1 1": ("tap_before_dosing", 0, 1, True),
    "1 1 3": ("tapper_intensity_pct", 10, 100, True),
    "1 1 4": ("tapper_time_s", 1, 10, True),
    "1 1 5": ("target_mg", 0.10, 250000.0, False),
    "1 1 6": ("tolerance_pct", 0.1, 40.0, False),
    "1 1 7": ("tolerance_mode", 0, 1, True),
    "1 1 14": ("algorithm", 0, 1, True),
    "1 1 15": ("antistatic", 0, 1, True),
}


class DoserSim(SimInstrument):
    """A Mettler Toledo Quantos QB1 dosing unit with QS30 sampler and its XPE balance."""

    kind: ClassVar[str] = "doser"
    config: DoserConfig

    def __init__(self, name: str, config: DoserConfig, ctx: SimContext) -> None:
        super().__init__(name, config, ctx)
        self.config = config
        self.rng = ctx.rng(name)
        specs = config.heads or {
            i + 1: DosingHeadConfig(element=el) for i, el in enumerate(ctx.world.truth.elements)
        }
        for pos in specs:
            if not 1 <= pos <= SAMPLER_POSITIONS:
                raise ValueError(f"{name}: head position {pos} is outside 1..{SAMPLER_POSITIONS}")
        self.heads: dict[int, Head] = {
            pos: Head(
                pos, h.element, h.powder_g * 1000.0, h.flow_mg_s, h.tolerance, h.powder_g * 1000.0
            )
            for pos, h in sorted(specs.items())
        }
        if config.mounted is not None and config.mounted not in self.heads:
            raise ValueError(f"{name}: mounted={config.mounted} but no head is at that position")
        self.mounted: int | None = config.mounted
        self.sampler = config.mounted or 0
        self.door = DOOR_CLOSED
        self.settings: dict[str, float | str] = {
            "tap_before_dosing": 0,
            "tapper_intensity_pct": 50,
            "tapper_time_s": 1,
            "tolerance_pct": 5.0,
            "tolerance_mode": 0,
            "algorithm": 0,
            "antistatic": 0,
            "sample_id": "",
        }
        self.target_mg: float | None = None
        self.job: str | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._stop_requested = False
        self.last_dose: DoseResult | None = None
        self.dosing_mg = 0.0  # dispensed so far in the running dose
        self.last_error: str | None = None
        self.cell = LoadCell(
            ctx.clock,
            ctx.rng(f"{name}:balance"),
            self._vial_load,
            capacity_g=config.capacity_g,
            readability_g=config.readability_g,
            noise_g=config.noise_g,
            settle_s=config.settle_s,
        )
        self.sics = SicsWeigher(
            self.cell,
            model=config.model,
            serial_number=config.serial_number,
            software=config.software,
            stable_timeout_s=config.stable_timeout_s,
            baudrate=config.serial.baudrate,
            update_s=config.update_s,
            on_reset=self._on_reset,
        )
        self.sics.add_command("QRD", self._qrd)
        self.sics.add_command("QRA", self._qra)
        self._endpoint = SerialEndpoint(name, config.serial, ctx.run_dir, self.faults, self.sics)

    # -- physics -------------------------------------------------------------------------------
    def _vial_load(self) -> float:
        crucible = self.ctx.world.crucible_at(self.config.location)
        return crucible.gross_g if crucible is not None else 0.0

    def _reply(self, text: str) -> None:
        self.sics.reply(text)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._endpoint.start()
        self.cell.start()
        self.sics.start()
        await self.apply_initial_faults()

    async def stop(self) -> None:
        if self._job_task is not None:
            self._job_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._job_task
        await self.sics.stop()
        await self.cell.stop()
        await self._endpoint.stop()

    async def clear_fault(self, kind: FaultKind | None = None) -> None:
        await super().clear_fault(kind)
        if kind in (None, FaultKind.DISCONNECT) and not self._endpoint.connected:
            await self._endpoint.reconnect()

    def endpoint(self) -> dict[str, Any]:
        ep = dict(self._endpoint.endpoint())
        # What is loaded where (as a technician would write it on the cell's sheet).
        ep["heads"] = {str(pos): head.element for pos, head in self.heads.items()}
        return ep

    def _on_reset(self) -> None:
        if self._job_task is not None and not self._job_task.done():
            self._job_task.cancel()

    # -- QRD: settings and queries -------------------------------------------------------------
    async def _qrd(self, args: list[str]) -> None:
        if len(args) < 3:
            self._reply("ES")
            return
        key = " ".join(args[:3])
        prefix = f"QRD {key}"
        values = args[3:]
        if key in _SETTINGS or key == "1 1 8":
            self._setting(prefix, key, values)
        elif values:
            self._reply(f"{prefix} L")
        elif key == "2 3 7":
            self._reply(f"{prefix} {self.door} A")
        elif key == "2 2 8":
            self._reply(f"{prefix} 1 A")
        elif key == "2 4 11":
            head = self.heads.get(self.mounted) if self.mounted is not None else None
            if head is None:
                self._reply(f"{prefix} I 1")
            else:
                self._xml(prefix, self._head_xml(head))
        elif key == "2 4 12":
            if self.last_dose is None:
                self._reply(f"{prefix} I 5")
            else:
                self._xml(prefix, self._sample_xml(self.last_dose))
        else:
            self._reply("ES")

    def _setting(self, prefix: str, key: str, values: list[str]) -> None:
        if len(values) != 1:
            self._reply(f"{prefix} L")
            return
        if self.job is not None:
            self._reply(f"{prefix} I 2")
            return
        if key == "1 1 8":
            if not 1 <= len(values[0]) <= 20:
                self._reply(f"{prefix} L")
                return
            self.settings["sample_id"] = values[0]
            self._reply(f"{prefix} A")
            return
        name, low, high, integer = _SETTINGS[key]
        try:
            value = float(values[0])
        except ValueError:
            self._reply(f"{prefix} L")
            return
        if not math.isfinite(value) or not low <= value <= high or (integer and value % 1):
            self._reply(f"{prefix} L")
            return
        if name == "target_mg":
            self.target_mg = value
        else:
            self.settings[name] = int(value) if integer else value
        self._reply(f"{prefix} A")

    def _xml(self, prefix: str, lines: list[str]) -> None:
        self._reply(f"{prefix} B")
        for line in lines:
            self._reply(line)
        self._reply(f"{prefix} A")

    def _head_xml(self, head: Head) -> list[str]:
        return [
            '<?xml version="1.0" encoding="UTF-8"?>',
            "<Dosing_head>",
            f"<Head_ID>{self.config.serial_number}-{head.position:02d}</Head_ID>",
            f"<Substance>{head.element}</Substance>",
            f"<Lot_ID>SIM-{head.element}-{head.position:02d}</Lot_ID>",
            f'<Content Unit="mg">{head.filled_mg:.2f}</Content>',
            f'<Rem._quantity Unit="mg">{head.powder_mg:.2f}</Rem._quantity>',
            f"<Dose_limit>{self.config.dose_limit}</Dose_limit>",
            f"<Dosing_counter>{head.doses}</Dosing_counter>",
            f"<Rem._dosages>{max(0, self.config.dose_limit - head.doses)}</Rem._dosages>",
            "</Dosing_head>",
        ]

    def _sample_xml(self, dose: DoseResult) -> list[str]:
        return [
            '<?xml version="1.0" encoding="UTF-8"?>',
            "<Sample_data>",
            f"<Sample_ID>{dose.sample_id}</Sample_ID>",
            f"<Substance>{dose.element}</Substance>",
            f'<Target_quantity Unit="mg">{dose.target_mg:.3f}</Target_quantity>',
            f'<Content Unit="mg">{dose.actual_mg:.3f}</Content>',
            f"<Tolerance_Mode>{'0/+' if dose.tolerance_mode == 1 else '+/-'}</Tolerance_Mode>",
            f'<Tolerance Unit="%">{dose.tolerance_pct:g}</Tolerance>',
            f"<Validity>{'Valid' if dose.valid else 'Invalid'}</Validity>",
            "</Sample_data>",
        ]

    # -- QRA: two-phase actions ----------------------------------------------------------------
    async def _qra(self, args: list[str]) -> None:
        if len(args) < 2:
            self._reply("ES")
            return
        prefix = f"QRA {args[0]} {args[1]}"
        key, params = (args[0], args[1]), args[2:]
        if key == ("61", "4"):
            self._stop_dose(prefix, params)
            return
        job = self._parse_action(prefix, key, params)
        if job is None:
            return  # answered ES or L
        if self.job is not None:
            self._fail_now(prefix, 2, f"{self.job} is running")
            return
        refused = job.check()
        if refused is not None:
            self._fail_now(prefix, *refused)
            return
        self.job = prefix
        self._reply(f"{prefix} B")
        self._job_task = asyncio.create_task(self._run_job(prefix, job), name=prefix)

    def _parse_action(self, prefix: str, key: tuple[str, str], params: list[str]) -> _Job | None:
        """Syntax of a QRA action (``ES``/``L`` answered here); the job that carries it out."""
        if key == ("61", "1"):
            if params:
                self._reply(f"{prefix} L")
                return None
            return _Job(self._dose, self._check_dose)
        if key not in {("60", "7"), ("60", "8"), ("60", "2")}:
            self._reply("ES")
            return None
        if len(params) != 1 or not params[0].isdigit():
            self._reply(f"{prefix} L")
            return None
        value = int(params[0])
        cfg = self.config
        if key == ("60", "7"):
            if value not in (DOOR_CLOSED, DOOR_OPEN):
                self._reply(f"{prefix} L")
                return None
            return _Job(lambda forced: self._move_door(value, forced))
        if key == ("60", "8"):
            if not 0 <= value <= SAMPLER_POSITIONS:
                self._reply(f"{prefix} L")
                return None

            def sampler_check() -> tuple[int, str] | None:
                if self.mounted is not None and value != self.sampler:
                    return 5, "the sampler cannot move while a head is locked in"
                return None

            def move_sampler() -> None:
                self.sampler = value

            duration = cfg.sampler_s + cfg.sampler_s_per_position * abs(value - self.sampler)
            if value == self.sampler:
                duration = 0.0
            return _Job(lambda forced: self._move(duration, move_sampler, forced), sampler_check)
        if value not in (3, 4):
            self._reply(f"{prefix} L")
            return None
        lock = value == 4

        def pin_check() -> tuple[int, str] | None:
            if lock and self.sampler not in self.heads:
                return 1, f"no dosing head at sampler position {self.sampler}"
            return None

        def move_pin() -> None:
            self.mounted = self.sampler if lock else None

        return _Job(lambda forced: self._move(cfg.pin_s, move_pin, forced), pin_check)

    def _fail_now(self, prefix: str, code: int, why: str) -> None:
        self.last_error = f"{prefix} I {code}: {why}"
        self._reply(f"{prefix} I {code}")

    def _check_dose(self) -> tuple[int, str] | None:
        if self.mounted is None:
            return 1, "no dosing head mounted"
        if self.door != DOOR_CLOSED:
            return 5, "the front door is not closed"
        if self.ctx.world.crucible_at(self.config.location) is None:
            return 5, f"no vial at {self.config.location}"
        if self.target_mg is None:
            return 5, "no target mass set (QRD 1 1 5)"
        return None

    async def _run_job(self, prefix: str, job: _Job) -> None:
        fault = self.faults.take(FaultKind.ERROR)
        forced = None if fault is None else (3 if fault.code is None else fault.code)
        try:
            await job.run(forced)
        except JobFailed as exc:
            if self.last_error is None or not self.last_error.startswith(prefix):
                self.last_error = f"{prefix} I {exc.code}"
            self._finish(f"{prefix} I {exc.code}")
        except asyncio.CancelledError:
            self._finish(None)  # @ reset: the job is abandoned without a final reply
            raise
        else:
            self._finish(f"{prefix} A")

    def _finish(self, reply: str | None) -> None:
        self.job = None
        self._job_task = None
        if reply is not None:
            self._reply(reply)

    async def _move(self, duration_s: float, apply: Callable[[], None], forced: int | None) -> None:
        """A mechanical move: takes ``duration_s``; a forced error stops it half way, undone."""
        if forced is not None:
            await self.ctx.clock.sleep(duration_s / 2)
            raise JobFailed(forced)
        await self.ctx.clock.sleep(duration_s)
        apply()

    async def _move_door(self, target: int, forced: int | None) -> None:
        if self.door == target:
            await self._move(0.0, lambda: None, forced)
            return
        before = self.door
        self.door = DOOR_RUNNING
        try:
            await self._move(self.config.door_s, lambda: None, forced)
        except JobFailed:
            self.door = before
            raise
        except asyncio.CancelledError:
            self.door = before
            raise
        self.door = target

    def _stop_dose(self, prefix: str, params: list[str]) -> None:
        if params:
            self._reply(f"{prefix} L")
            return
        self._reply(f"{prefix} B")
        if self.job == "QRA 61 1":
            self._stop_requested = True
        self._reply(f"{prefix} A")

    async def _dose(self, forced: int | None = None) -> None:
        """Tare, dispense at the head's flow rate into the vial, settle; JobFailed on failure."""
        clock = self.ctx.clock
        assert self.mounted is not None and self.target_mg is not None
        head = self.heads[self.mounted]
        target = self.target_mg
        started = clock.now()
        self._stop_requested = False
        self.dosing_mg = 0.0
        code: int | None = None
        reading = await self.cell.wait_stable(self.config.stable_timeout_s)
        if not reading.stable:
            code = 6
        else:
            self.cell.tare_g = reading.gross_g  # the Quantos tares the vial before dosing
            head.doses += 1
            spread = self.rng.gauss(0.0, head.tolerance)
            mode = int(self.settings["tolerance_mode"])
            planned = max(0.0, target * (1.0 + (abs(spread) if mode == 1 else spread)))
            if forced is not None:
                planned /= 2.0
            code = await self._dispense(head, planned)
            if code is None and forced is not None:
                code = forced
            if code is None or code in (7, 3):
                await clock.sleep(self.config.settle_s)  # settling, then the final weighing
        self.last_dose = DoseResult(
            head=head.position,
            element=head.element,
            target_mg=target,
            actual_mg=self.dosing_mg,
            tolerance_pct=float(self.settings["tolerance_pct"]),
            tolerance_mode=int(self.settings["tolerance_mode"]),
            sample_id=str(self.settings["sample_id"]),
            outcome="A" if code is None else f"I {code}",
            started_s=started,
            ended_s=clock.now(),
        )
        if code is not None:
            raise JobFailed(code)

    async def _dispense(self, head: Head, planned_mg: float) -> int | None:
        """Move powder from the head into the vial over time; the failure code, or None.

        The dispensed mass grows at the head's flow rate until the planned mass is out (None),
        the head is empty (7), the vial is gone (8), a stop was asked (8) or ``max_dose_s``
        passed (3). The vial's weight follows step by step, so ``SI`` shows it growing.
        """
        clock = self.ctx.clock
        world = self.ctx.world
        location = self.config.location
        start = clock.now()
        available = head.powder_mg
        reachable = min(planned_mg, available)
        end = start + reachable / head.flow_mg_s
        deadline = start + self.config.max_dose_s
        step = max(DOSE_STEP_S, (end - start) / 100.0)
        while True:
            now = min(clock.now(), end, deadline)
            total = reachable if now >= end else min(head.flow_mg_s * (now - start), reachable)
            amount = min(max(0.0, total - self.dosing_mg), head.powder_mg)
            if amount > 0:
                head.powder_mg -= amount
                self.dosing_mg += amount
                if world.add_powder(location, head.element, amount) is None:
                    self.last_error = f"QRA 61 1 I 8: the vial left {location} during the dose"
                    return 8
            self.cell.track(disturbed=True)
            if now >= end:
                if planned_mg <= available:
                    return None
                head.powder_mg = 0.0
                self.last_error = (
                    f"QRA 61 1 I 7: head {head.position} ({head.element}) ran out of powder"
                )
                return 7
            if self._stop_requested:
                return 8
            if now >= deadline:
                return 3
            await clock.sleep(min(step, min(end, deadline) - now))

    # -- control channel -----------------------------------------------------------------------
    def _head_arg(self, args: dict[str, Any]) -> Head:
        pos = int(args["head"])
        head = self.heads.get(pos)
        if head is None:
            have = list(self.heads)
            raise ValueError(f"{self.name}: no dosing head at position {pos} (have {have})")
        return head

    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "mount_head":
            if self.job is not None:
                raise ValueError(f"{self.name}: cannot change heads while {self.job} runs")
            head = self._head_arg(args)
            self.sampler = head.position
            self.mounted = head.position
        elif action == "unmount_head":
            if self.job is not None:
                raise ValueError(f"{self.name}: cannot change heads while {self.job} runs")
            self.mounted = None
        elif action in ("refill", "set_powder"):
            head = self._head_arg(args)
            grams = float(args["grams"])
            if not grams >= 0 or not math.isfinite(grams):
                raise ValueError(f"{self.name}: {action} needs grams >= 0, got {grams!r}")
            mg = grams * 1000.0
            if action == "refill":
                head.powder_mg += mg
                head.filled_mg += mg
            else:
                head.powder_mg = mg
                head.filled_mg = max(head.filled_mg, mg)
        elif action == "set_door":
            if self.job is not None:
                raise ValueError(f"{self.name}: cannot move the door while {self.job} runs")
            self.door = DOOR_OPEN if bool(args["open"]) else DOOR_CLOSED
        else:
            return await super().control(action, args)
        return self.state()

    def state(self) -> dict[str, Any]:
        reading = self.cell.read()
        crucible = self.ctx.world.crucible_at(self.config.location)
        door = {DOOR_CLOSED: "closed", DOOR_OPEN: "open", DOOR_RUNNING: "running"}[self.door]
        return {
            "kind": self.kind,
            "connected": self._endpoint.connected,
            "location": self.config.location,
            "crucible": crucible.id if crucible is not None else None,
            "heads": {str(pos): h.state() for pos, h in self.heads.items()},
            "mounted": self.mounted,
            "door": door,
            "sampler": self.sampler,
            "job": self.job,
            "target_mg": self.target_mg,
            "dosing_mg": self.dosing_mg if self.job == "QRA 61 1" else None,
            "last_dose": self.last_dose.state() if self.last_dose else None,
            "last_error": self.last_error,
            "settings": dict(self.settings),
            "reading_g": float(format_weight(reading.net_g, self.config.readability_g)),
            "stable": reading.stable,
            "streaming": self.sics.streaming,
            "faults": self.faults.state(),
        }
