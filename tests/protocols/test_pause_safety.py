"""A pause or a suspension never makes the cell repeat a dose or a crucible move (DESIGN.md:
writes to hardware are not retried blindly).

The real RunEngine on the simulated cell in-process (``rig``); the pause and the interlock come
from another thread, as the daemon's API and safety service send them. The spies only *watch*
labd's device calls (and, to make the timing certain, let the test thread request its pause
while the real dose is in progress); every dose and move goes to the simulator. The daemon's
engine (its "pause now" turning into a deferred pause during a step) is tested at the end with
its worker thread, as ``tests/daemon`` does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import pytest
from bluesky.run_engine import RunEngine
from bluesky.suspenders import SuspendBoolHigh
from bluesky.utils import Msg, RunEngineInterrupted
from pydantic import BaseModel

import protocols  # noqa: F401  (registers every protocol)
from labd.engine import Control, Engine, EngineState
from labd.safety import FlagSignal
from labd.store import ExitStatus, QueueItem, Store
from protocols.composition import dose_masses
from protocols.registry import REGISTRY, Registry, protocol
from protocols.stubs import STEPS, safe_point, step
from tests.protocols.rig import Rig, start_rig, stop_rig
from tests.support.procs import Mosquitto
from tests.support.runengine import ValidatedDocuments, in_re_loop

COMPOSITION = {"Fe": 0.5, "Ni": 0.5}
#: A short anneal: the run takes a few wall seconds at the rig's time scale.
PROCESS = {"anneal_c": 300, "anneal_s": 600, "ramp_c_min": 300, "unload_below_c": 200}


@pytest.fixture
def rig(RE: RunEngine, tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    r = start_rig(tmp_path, mosquitto)
    yield r
    stop_rig(r)


def aside(fn: Callable[[], Any]) -> Future[Any]:
    """Run ``fn`` on a thread of its own (the RunEngine blocks the test thread)."""
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn)
    pool.shutdown(wait=False)
    return fut


def sim(rig: Rig, what: Callable[[], Any]) -> Any:
    """Read the simulator's state on the loop it runs on."""

    async def read() -> Any:
        return what()

    return in_re_loop(read())


def head_doses(rig: Rig) -> dict[str, int]:
    """Doses the simulated Quantos performed, per element (its own counters)."""
    heads = sim(rig, lambda: rig.sim.device("doser").state()["heads"])
    return {h["element"]: h["doses"] for h in heads.values() if h["element"] in COMPOSITION}


def crucible_at(rig: Rig, location: str) -> Any:
    return sim(rig, lambda: rig.sim.world.crucible_at(location))


class Hold:
    """Wraps an async method of a device so that, on its ``nth`` call, the real call is
    started, then ``started`` is set and the wrapper waits (off the loop) until the test thread
    sets ``go``: the test's pause or interlock arrives while the real operation is under way."""

    def __init__(self, obj: Any, method: str, nth: int = 1,
                 when: Callable[..., bool] = lambda *a, **k: True) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.started = threading.Event()
        self.go = threading.Event()
        real = getattr(obj, method)

        async def held(*args: Any, **kwargs: Any) -> Any:
            task = asyncio.ensure_future(real(*args, **kwargs))
            if when(*args, **kwargs):
                self.calls.append(args)
                if len(self.calls) == nth:
                    self.started.set()
                    await asyncio.to_thread(self.go.wait, 20)
            return await task

        self._restore = (obj, method, real)
        setattr(obj, method, held)

    def undo(self) -> None:
        obj, method, real = self._restore
        setattr(obj, method, real)


def sample_plan(rig: Rig, sid: str) -> Generator[Msg, Any, Any]:
    proto = REGISTRY.get("make_sample")
    params = proto.validate({"sample_id": sid, "composition": COMPOSITION, **PROCESS})
    return proto.plan(rig.devices, params)


def made_once(rig: Rig, docs: ValidatedDocuments, sid: str) -> None:
    """The run made the sample with one dose per element, each on target, and put the
    crucible back in its rack slot."""
    assert head_doses(rig) == {"Fe": 1, "Ni": 1}
    samples = [e["data"] for e in docs.of("event") if "sample_id" in e["data"]]
    (sample,) = samples
    assert sample["sample_id"] == sid
    crucible = sim(rig, lambda: rig.sim.world.crucibles[sample["crucible"]])
    targets = dose_masses(COMPOSITION, rig.layout.default_total_mg)
    assert set(crucible.powders_mg) == set(targets)
    for el, mg in targets.items():
        assert crucible.powders_mg[el] == pytest.approx(mg, rel=0.05), el
    assert crucible.location == "rack/1" and sim(rig, lambda: rig.sim.world.held) is None
    assert len(docs.event_data("doser-last_dose_mg")) == 2  # one doser event per dose


def at_doser_holding_fe_only(rig: Rig) -> None:
    """The first dose is complete, the second not started, nothing held by the gripper."""
    assert STEPS.current() is None
    assert head_doses(rig) == {"Fe": 1, "Ni": 0}
    crucible = crucible_at(rig, rig.layout.doser)
    assert crucible is not None and set(crucible.powders_mg) == {"Fe"}
    assert sim(rig, lambda: rig.sim.device("doser").state()["job"]) != "QRA 61 1"


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "now"])
def test_a_pause_during_a_dose_lands_after_it_and_the_resume_doses_each_element_once(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig, defer: bool
) -> None:
    """Deferred: the pause lands at the next safe point, after the dose is recorded and
    checked. Now: the RunEngine pauses at once, but the dose in progress is not cut (it is not
    a movable the RunEngine stops) and runs to its end; the resume takes its result, never
    sends it again."""
    doser = rig.cell.devices["doser"]
    hold = Hold(doser, "dose")

    def pause_in_first_dose() -> None:
        assert hold.started.wait(30), "no dose started"
        assert STEPS.current() is not None and "dosing" in (STEPS.current() or "")
        RE.request_pause(defer=defer)
        hold.go.set()

    pausing = aside(pause_in_first_dose)
    try:
        with pytest.raises(RunEngineInterrupted):
            RE(sample_plan(rig, "S-PAUSE"))
        pausing.result()
    finally:
        hold.undo()
    assert RE.state == "paused"
    deadline = time.monotonic() + 10  # "now": the dose finishes on its own while paused
    while STEPS.current() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    at_doser_holding_fe_only(rig)

    result = RE.resume()
    assert result.exit_status == "success", result
    made_once(rig, docs, "S-PAUSE")


def test_a_suspension_during_a_dose_finishes_the_dose_waits_and_resumes_once(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    flag = FlagSignal("glovebox-o2")  # what labd.safety feeds its suspenders
    suspended, resumed = threading.Event(), threading.Event()

    def mark(event: threading.Event) -> Callable[[], Generator[Msg, Any, None]]:
        def plan() -> Generator[Msg, Any, None]:
            event.set()
            yield from bps.null()

        return plan

    RE.install_suspender(SuspendBoolHigh(flag, sleep=0.1, pre_plan=mark(suspended),
                                         post_plan=mark(resumed)))
    hold = Hold(rig.cell.devices["doser"], "dose")

    async def put(value: bool) -> None:
        flag.put(value)

    def trip_in_first_dose() -> None:
        assert hold.started.wait(30), "no dose started"
        in_re_loop(put(True))
        hold.go.set()
        assert suspended.wait(10), "the run did not suspend"
        deadline = time.monotonic() + 10
        while STEPS.current() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        at_doser_holding_fe_only(rig)  # the dose ended normally; the run waits
        assert not resumed.is_set()
        in_re_loop(put(False))

    tripping = aside(trip_in_first_dose)
    try:
        result = RE(sample_plan(rig, "S-SUSP"))
        tripping.result()
    finally:
        hold.undo()
    assert resumed.is_set() and result.exit_status == "success", result
    made_once(rig, docs, "S-SUSP")


def test_a_suspension_while_a_crucible_is_carried_places_it_and_resumes_once(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    """The glovebox interlock trips with the crucible in the gripper (rack -> balance): the
    RunEngine stops no motion (the gantry is not a movable it has set: a GRBL reset would open
    the gripper), so the crucible is put down at the balance, then the run waits."""
    flag = FlagSignal("glovebox-o2")
    RE.install_suspender(SuspendBoolHigh(flag, sleep=0.1))
    gantry = rig.cell.devices["gantry"]
    hold = Hold(gantry, "grip", when=lambda close: close)  # the first pick

    async def put(value: bool) -> None:
        flag.put(value)

    def trip_while_carrying() -> dict[str, Any]:
        assert hold.started.wait(30), "no crucible picked"
        in_re_loop(put(True))
        hold.go.set()
        deadline = time.monotonic() + 10
        while STEPS.current() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        seen = {"held": sim(rig, lambda: rig.sim.world.held),
                "at_balance": crucible_at(rig, rig.layout.balance),
                "state": RE.state}
        in_re_loop(put(False))
        return seen

    tripping = aside(trip_while_carrying)
    try:
        result = RE(sample_plan(rig, "S-MOVE"))
        seen = tripping.result()
    finally:
        hold.undo()
    assert seen["held"] is None and seen["at_balance"] is not None, seen  # placed, not dropped
    assert seen["state"] == "running"  # suspended (the RunEngine waits in its suspender)
    assert result.exit_status == "success", result
    made_once(rig, docs, "S-MOVE")


# -- the daemon's engine: "pause now" during a step becomes a deferred pause ------------------
class NoParams(BaseModel):
    pass


def test_the_engine_defers_a_pause_now_until_the_step_in_progress_has_ended(
    tmp_path: Path,
) -> None:
    gate: dict[str, asyncio.Event] = {}
    done: list[str] = []
    reg = Registry()

    async def world_changing() -> None:
        gate["go"] = asyncio.Event()
        await gate["go"].wait()
        done.append("step")

    @protocol("one_step", NoParams, title="One step", registry=reg)
    def one_step(devices: Any, p: NoParams) -> Any:
        def plan() -> Generator[Msg, Any, None]:
            yield from step(world_changing, "dosing 10 mg of Fe (head 1)")
            yield from safe_point()
            done.append("after")

        return (yield from bps_run(plan()))

    store = Store(tmp_path / "labd.sqlite")
    eng = Engine(store, reg, cell="test")
    worker = threading.Thread(target=eng.worker, daemon=True)
    worker.start()
    try:
        eng.run_now(QueueItem("one_step", {}, user="tech1", source="test"))
        wait(lambda: STEPS.current() is not None, "the step to start")
        eng.pause(defer=False)
        (deferred,) = [e for e in eng.events.recent if e["type"] == "pause_deferred"]
        assert deferred["step"] == "dosing 10 mg of Fe (head 1)"
        assert "pausing after the step in progress" in deferred["reason"]
        time.sleep(0.3)  # a pause now would have landed by now: the engine still runs the step
        assert eng.state is EngineState.RUNNING and eng.RE.state == "running"

        async def release() -> None:
            gate["go"].set()

        in_re_loop(release())
        wait(lambda: eng.state is EngineState.PAUSED, "the pause after the step")
        assert done == ["step"]  # paused at the safe point after the step
        eng.control(Control.RESUME)
        wait(lambda: eng.state is EngineState.IDLE and store.history()[0].status
             is not ExitStatus.RUNNING, "the run to end")
        assert store.history()[0].status is ExitStatus.SUCCESS and done == ["step", "after"]
    finally:
        if eng.state is EngineState.PAUSED:
            eng.control(Control.ABORT, "test teardown")
        eng.shutdown()
        worker.join(10)
        eng.RE.loop.call_soon_threadsafe(eng.RE.loop.stop)
        store.close()


def bps_run(plan: Generator[Msg, Any, None]) -> Generator[Msg, Any, None]:
    return (yield from bpp.run_wrapper(plan, md={"protocol": "one_step"}))


def wait(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")
