"""A heat treatment survives pause, resume and suspend: the furnace controller runs its program by
itself, so pausing the *plan* (a technician's pause, a transient interlock suspending the run)
must not switch the furnace off or restart the program; an abort still does switch it off.

The real RunEngine on the simulated cell in-process (``rig``); the pause, suspension and abort
come from another thread, as the daemon's API and safety service send them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import pytest
from bluesky.run_engine import RunEngine
from bluesky.suspenders import SuspendBoolHigh
from bluesky.utils import Msg, RunEngineInterrupted

import protocols  # noqa: F401  (registers every protocol)
from labd.safety import FlagSignal
from protocols.registry import REGISTRY
from tests.protocols.rig import Rig, start_rig, stop_rig
from tests.support.procs import Mosquitto, wait_for
from tests.support.runengine import ValidatedDocuments, in_re_loop

#: 300 °C at 300 °C/min, then a 4,000 s dwell: about 2 wall seconds of dwell at the rig's 2000x.
BAKEOUT = {"temperature_c": 300, "hold_s": 4000, "ramp_c_min": 300}


@pytest.fixture
def rig(RE: RunEngine, tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    r = start_rig(tmp_path, mosquitto)
    yield r
    stop_rig(r)


@pytest.fixture
def starts(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts program starts sent by labd's furnace client (a spy: the real call goes out)."""
    client = rig.cell.devices["furnace"].client
    real = client.run_program
    calls: list[int] = []

    async def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        await real(*args, **kwargs)

    monkeypatch.setattr(client, "run_program", counted)
    return calls


def furnace(rig: Rig) -> dict[str, Any]:
    """The simulated furnace's state, read on the loop it runs on."""

    async def read() -> dict[str, Any]:
        return rig.sim.device("furnace").state()

    return in_re_loop(read())


def until(rig: Rig, predicate: Callable[[dict[str, Any]], bool], what: str,
          timeout: float = 10.0) -> dict[str, Any]:
    """Wait (on the loop) until the simulated furnace's state satisfies ``predicate``."""

    def check() -> dict[str, Any] | None:
        st = rig.sim.device("furnace").state()
        return st if predicate(st) else None

    return in_re_loop(wait_for(check, timeout=timeout, what=what), timeout=timeout + 5)


def in_dwell(st: dict[str, Any]) -> bool:
    return st["program"]["state"] == "run" and st["program"]["segment"] == 2


def running(st: dict[str, Any]) -> bool:
    """The program runs and the furnace heats (operating, not standby)."""
    return st["program"]["state"] == "run" and st["instrument_mode"] == 0


def heater_off(st: dict[str, Any]) -> bool:
    return st["instrument_mode"] == 1 and st["target_sp"] <= 30.0 and st["run_mode"] == 1


def bakeout(rig: Rig) -> Generator[Msg, Any, Any]:
    proto = REGISTRY.get("furnace_bakeout")
    return proto.plan(rig.devices, proto.validate(BAKEOUT))


def aside(fn: Callable[[], Any]) -> Future[Any]:
    """Run ``fn`` on a thread of its own (the RunEngine blocks the test thread)."""
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn)
    pool.shutdown(wait=False)
    return fut


def stream(docs: ValidatedDocuments, name: str) -> list[dict[str, Any]]:
    names = {d["uid"]: d["name"] for d in docs.of("descriptor")}
    return [e["data"] for e in docs.of("event") if names[e["descriptor"]] == name]


def one_program_ran_to_its_end(docs: ValidatedDocuments, starts: list[int]) -> None:
    assert len(starts) == 1  # started once, never replayed
    (program,) = stream(docs, "furnace_program")
    assert '"duration_s":4000' in program["program"]
    segments = [d["furnace-programmer-segment"] for d in stream(docs, "furnace_segment")]
    # 0 is "no segment": before the start, and once the program is COMPLETE (if the monitor's
    # poll catches that before the plan stops monitoring). The running segments never go back.
    running = [s for s in segments if s != 0]
    assert 2 in running and running == sorted(running)  # never back to segment 1


@pytest.mark.parametrize("defer", [False, True], ids=["pause-now", "pause-at-checkpoint"])
def test_a_paused_bakeout_keeps_the_furnace_program_running_and_resumes_to_success(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig, starts: list[int], defer: bool
) -> None:
    def pause_in_dwell() -> None:
        until(rig, in_dwell, "the dwell")
        RE.request_pause(defer=defer)

    pausing = aside(pause_in_dwell)
    with pytest.raises(RunEngineInterrupted):
        RE(bakeout(rig))
    pausing.result()
    assert RE.state == "paused"

    # Paused (a deferred pause too: at a checkpoint inside the wait), the furnace goes on with
    # its program on its own: still running, heating, and its program clock runs down.
    paused = furnace(rig)
    assert running(paused), paused
    left = paused["program"]["time_left_s"]
    assert left > 0
    later = until(rig, lambda st: st["program"]["time_left_s"] <= left - 400, "the dwell to run")
    assert running(later) and RE.state == "paused"

    result = RE.resume()
    assert result.exit_status == "success", result
    end = furnace(rig)
    # The plan waited for the program's own end after the resume, then switched the heater off.
    assert end["virtual_time_s"] >= paused["virtual_time_s"] + left
    assert heater_off(end), end
    one_program_ran_to_its_end(docs, starts)
    assert docs.of("stop")[-1]["exit_status"] == "success"


def test_a_suspension_during_the_anneal_leaves_the_furnace_on_and_the_run_resumes(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig, starts: list[int]
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

    async def put(value: bool) -> None:
        flag.put(value)

    def trip_in_dwell() -> dict[str, Any]:
        until(rig, in_dwell, "the dwell")
        in_re_loop(put(True))
        assert suspended.wait(10), "the run did not suspend"
        st = furnace(rig)
        left = st["program"]["time_left_s"]
        during = until(rig, lambda s: s["program"]["time_left_s"] <= left - 400,
                       "the dwell to run while suspended")
        assert not resumed.is_set()
        in_re_loop(put(False))
        return during

    tripping = aside(trip_in_dwell)
    result = RE(bakeout(rig))
    during = tripping.result()
    # While suspended, the controller held its program at the bake-out temperature.
    assert running(during) and during["working_sp"] == pytest.approx(300.0), during
    assert resumed.is_set() and result.exit_status == "success", result
    assert heater_off(furnace(rig))
    one_program_ran_to_its_end(docs, starts)


@pytest.mark.parametrize("paused_first", [True, False], ids=["paused-then-abort", "abort-now"])
def test_an_abort_during_the_anneal_switches_the_heater_off(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig, starts: list[int], paused_first: bool
) -> None:
    def interrupt_in_dwell() -> Any:
        until(rig, in_dwell, "the dwell")
        if paused_first:
            RE.request_pause(defer=False)
            return None
        return RE.abort("interlock e-stop")  # from another thread, as the daemon does

    interrupting = aside(interrupt_in_dwell)
    with pytest.raises(RunEngineInterrupted):
        RE(bakeout(rig))
    result = interrupting.result()
    if paused_first:
        assert running(furnace(rig))
        result = RE.abort("technician abort")
    assert result.exit_status == "abort", result
    assert RE.state == "idle"
    st = furnace(rig)
    assert heater_off(st) and st["program"]["state"] == "reset", st
    assert len(starts) == 1
    assert docs.of("stop")[-1]["exit_status"] == "abort"


def test_make_sample_paused_in_the_anneal_and_in_the_cooling_makes_the_sample_once(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig, starts: list[int]
) -> None:
    """A resume rewinds into the wait it was paused in, never further: nothing dosed, moved or
    started before it is replayed."""
    proto = REGISTRY.get("make_sample")
    params = proto.validate({"sample_id": "S-P", "composition": {"Fe": 0.5, "Ni": 0.5},
                             "anneal_c": 500, "anneal_s": 3000, "ramp_c_min": 300,
                             "unload_below_c": 60})

    def cooling(st: dict[str, Any]) -> bool:
        return st["program"]["state"] == "complete" and st["pv"] > 150.0

    for phase, reached in (("the anneal's dwell", in_dwell), ("the cooling", cooling)):
        def pause_in(reached: Callable[[dict[str, Any]], bool] = reached,
                     phase: str = phase) -> None:
            until(rig, reached, phase, timeout=30)
            RE.request_pause(defer=False)

        pausing = aside(pause_in)
        with pytest.raises(RunEngineInterrupted):
            if phase == "the cooling":
                RE.resume()
            else:
                RE(proto.plan(rig.devices, params))
        pausing.result()
        st = furnace(rig)
        assert reached(st) and st["instrument_mode"] == 0, (phase, st)  # the furnace went on

    result = RE.resume()
    assert result.exit_status == "success", result
    assert len(starts) == 1
    assert len(stream(docs, "doser")) == 2  # Fe, Ni: dosed once each
    (sample,) = stream(docs, "sample")
    assert sample["sample_id"] == "S-P" and sample["anneal_s"] == 3000.0
    temps = [d["furnace-temperature"] for d in stream(docs, "furnace")]
    assert temps[-1] <= 60.0  # unloaded only once cooled, after both resumes
    crucible = rig.sim.world.crucibles[sample["crucible"]]
    assert crucible.location == params.rack_slot and crucible.sample_id == "S-P"
    assert heater_off(furnace(rig))


def test_the_recorded_profile_ends_with_the_reading_that_released_the_crucibles(
    RE: RunEngine, docs: ValidatedDocuments, rig: Rig
) -> None:
    """The ``furnace`` stream is the profile actually followed; its last point must be the PV at
    which the cooling wait let the crucibles go, whatever the phase of the monitor's own poll.
    The monitor's poll is slowed to an hour here, so only the waits' own readings can end it
    (and they alone must record the anneal)."""
    import bluesky.preprocessors as bpp

    from drivers.instruments.furnace import Dwell, FurnaceProgram, Ramp
    from protocols.stubs import heat_treatment

    dev = rig.cell.devices["furnace"]
    dev.temperature._connector.backend._poll_period = 3600.0  # private: see docstring
    program = FurnaceProgram(segments=[Ramp(target_c=250, rate_c_min=300),
                                       Dwell(duration_s=600), Ramp(target_c=20, rate_c_min=300)])
    RE(bpp.run_wrapper(heat_treatment(dev, program, unload_below_c=120.0, poll_s=0.05)))
    temps = [d["furnace-temperature"] for d in stream(docs, "furnace")]
    assert max(temps) >= 240.0  # the waits' readings recorded the anneal
    assert temps[-1] <= 120.0 < max(temps[:-1])
