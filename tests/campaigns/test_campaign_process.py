"""End-to-end: the real ``labd`` process with the simulated cell replaying the OER plate
(``--ground-truth oer_plate_3496.csv --goal minimize``), a 40-sample campaign in batches of 4
started with ``labctl campaign start``, once straight through and once with the daemon SIGKILLed
in the middle of a batch and restarted.

Crucibles: a used crucible holds a sample, so the simulated cell of these tests has 48 rack slots
with an empty crucible each (``world.locations``/``world.crucibles``), enough for 40 samples plus
the batch spoiled by the kill. The protocol's waits are short (anneal 60 s at 400 °C, unload
below 380 °C, 20 s station measurement, virtual time at 2000x) so a campaign takes about a minute.

After the kill the simulated cell goes on (as a real cell would: a daemon crash does not reset
the hardware), and the restarted labd re-attaches to it. The campaign is paused for the operator:
the interrupted batch's crucibles are somewhere in the cell. The test plays the operator:
``labd-simctl clear-cell`` (the crucibles outside the rack taken away), then ``labctl campaign
resume``; the campaign skips the rack slots it used.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import OER_CSV
from tests.support.labd import LABD, LabdProcess, wait_until
from tests.support.procs import Mosquitto
from tests.support.protocols import campaign_cell

SPEC = Path(__file__).parents[2] / "config" / "campaigns" / "oer-demo.yaml"
BUDGET = 40


def make_labd(tmp: Path, broker: Mosquitto) -> LabdProcess:
    (tmp / "sim.yaml").write_text(yaml.safe_dump(campaign_cell(48, per_row=8)))
    (tmp / "labd.yaml").write_text(yaml.safe_dump({"simulator": {
        "config": str(tmp / "sim.yaml"), "time_scale": 2000, "ground_truth": str(OER_CSV),
        "goal": "minimize"}}))
    return LabdProcess(tmp / "data", tmp / "labd.log",
                       ["--config", str(tmp / "labd.yaml"), "--mqtt", broker.url],
                       http_timeout=30)


@pytest.fixture
def labd(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[LabdProcess]:
    daemon = make_labd(tmp_path, mosquitto)
    yield daemon
    daemon.cleanup()


def start_campaign(labd: LabdProcess) -> str:
    r = labd.labctl("--json", "campaign", "start", str(SPEC))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["status"] == "running"
    return str(data["id"])


def truth_of(composition: dict[str, float]) -> float:
    """The measured overpotential of ``composition`` in the shared OER table."""
    import csv

    with OER_CSV.open() as fh:
        rows = list(csv.DictReader(fh))
    els = [k for k in rows[0] if k != "overpotential_V"]
    for row in rows:
        if all(abs(float(row[el]) - composition.get(el, 0.0)) < 1e-6 for el in els):
            return float(row["overpotential_V"])
    raise AssertionError(f"{composition} is not in the OER table")


def check_finished(labd: LabdProcess, c: httpx.Client, cid: str,
                   interrupted: int) -> dict[str, Any]:
    st = c.get(f"/campaigns/{cid}").json()
    assert st["status"] == "finished", st
    assert st["reason"].startswith("sample budget spent"), st["reason"]
    rep = c.get(f"/campaigns/{cid}/report").json()
    assert rep["samples_made"] == BUDGET and rep["samples_pending"] == 0
    assert rep["samples_interrupted"] == interrupted
    # each sample id once (made or interrupted), the journal's sample table agrees
    rows = [r for r in csv_rows(c.get(f"/campaigns/{cid}/samples.csv").text)]
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)) == BUDGET + interrupted
    made = [r for r in rows if r["status"] == "made"]
    # the best value found is the best of the stored observations, and the simulator's
    # ground truth for that composition
    best = rep["best"]
    assert best["value"] == min(float(r["value"]) for r in made)
    assert best["value"] == pytest.approx(truth_of(best["composition"]), abs=1e-9)
    assert rep["best_after_sample"][-1] == best["value"]
    # report files through labctl
    out = labd.data_dir.parent / "report"
    r = labd.labctl("campaign", "report", cid, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / f"{cid}-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / f"{cid}-samples.csv").read_text().splitlines()) == BUDGET + interrupted + 1
    return rep


def csv_rows(text: str) -> list[dict[str, str]]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.timeout(300)  # ~95 s on 2 cores; runs in the default suite
def test_full_campaign_of_40_samples(labd: LabdProcess) -> None:
    c = labd.start()
    t0 = time.monotonic()
    cid = start_campaign(labd)
    wait_until(lambda: c.get(f"/campaigns/{cid}").json()["status"] == "finished", 240,
               "the campaign to finish")
    elapsed = time.monotonic() - t0
    rep = check_finished(labd, c, cid, interrupted=0)
    hist = c.get("/history", params={"limit": 100}).json()
    assert [h["status"] for h in hist] == ["success"] * (BUDGET // 4)
    print(f"\n40-sample campaign: {elapsed:.1f} s wall, best {rep['best']['value']:.4f} V")


@pytest.mark.timeout(360)  # ~150 s on 2 cores; runs in the default suite
def test_sigkill_in_the_middle_then_restart(labd: LabdProcess) -> None:
    c = labd.start()
    t0 = time.monotonic()
    cid = start_campaign(labd)

    def mid_batch() -> Any:
        st = c.get("/status").json()
        camp = c.get(f"/campaigns/{cid}").json()
        done = sum(b["state"] == "done" for b in camp["batches"])
        active = [b["item_uid"] for b in camp["batches"] if b["state"] == "queued"]
        # the running batch is past its first readings and has no result yet
        return (camp["samples_made"] >= 16 and camp["samples_made"] == 4 * done
                and st["current"] and active == [st["current"]["item_uid"]]
                and st["current"]["progress"].get("events", 0) > 3)

    wait_until(mid_batch, 180, "a batch in progress after 16 samples")
    before = c.get(f"/campaigns/{cid}").json()
    assert labd.signal(signal.SIGKILL, 10) == -signal.SIGKILL
    c.close()

    c = labd.start()
    st = wait_until(lambda: (lambda s: s if s["status"] == "paused" else None)(
        c.get(f"/campaigns/{cid}").json()), 60, "the campaign to pause for the operator")
    assert st["interrupted"] >= 1 and "interrupted" in st["reason"]
    assert st["samples_made"] >= before["samples_made"]
    hist = c.get("/history", params={"limit": 100}).json()
    assert hist[0]["status"] == "interrupted"
    interrupted_ids = set(hist[0]["params"] and [s["sample_id"] for s in
                                                 hist[0]["params"]["samples"]])
    # The same simulated cell, re-attached: the interrupted batch's crucibles are still out
    # of the rack. The operator takes them away, then resumes the campaign.
    log = labd.log.read_text()
    assert "re-attached to the simulated cell" in log
    assert "every device driven to its safe state: a run was interrupted" in log
    simctl = [str(LABD.parent / "labd-simctl"), "--control", labd.endpoints()["control"]]

    def sim_state(device: str) -> dict[str, Any]:
        out = subprocess.run([*simctl, "state", device], capture_output=True, text=True,
                             check=True, timeout=30).stdout
        state: dict[str, Any] = json.loads(out)["state"]
        return state

    # the restarted daemon made the cell safe: heater off, the gripper open
    furnace = sim_state("furnace")
    assert furnace["instrument_mode"] == 1 and not furnace["heater_on"], furnace
    assert not sim_state("gantry")["gripper_closed"]
    world = json.loads(subprocess.run([*simctl, "world"], capture_output=True, text=True,
                                      check=True, timeout=30).stdout)["world"]
    outside = {cid_ for cid_, cr in world["crucibles"].items()
               if not str(cr["location"]).startswith("rack/")}
    assert outside, world["crucibles"]
    cleared = subprocess.run([*simctl, "clear-cell"], capture_output=True, text=True,
                             check=True, timeout=30)
    assert set(json.loads(cleared.stdout)["removed"]) == outside
    r = labd.labctl("campaign", "resume", cid)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: c.get(f"/campaigns/{cid}").json()["status"] == "finished", 240,
               "the campaign to finish after the restart")
    rep = check_finished(labd, c, cid, interrupted=len(interrupted_ids))
    assert {o["sample_id"] for o in rep["interrupted"]} == interrupted_ids
    print(f"\n40-sample campaign with a SIGKILL: {time.monotonic() - t0:.1f} s wall")
