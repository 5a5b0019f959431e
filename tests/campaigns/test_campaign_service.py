"""Campaigns in the daemon, as the user meets them: an in-process :class:`labd.app.Daemon` on the
simulated cell (``labd-sim`` replaying the OER plate, the suite's mosquitto, virtual time at
2000x), the real RunEngine, HTTP through the daemon's API, the WebSocket, and ``labctl``
subprocesses where it is the user's interface.

Campaigns are tiny (budget 2-8, batches of 2, a 30-composition slice of the OER plate as the
pool, a 60 s anneal at 400 °C, a 5 s station measurement), so a batch takes a few seconds.
Covered: pause (the running batch finishes, no new one starts) and resume; stop ("stopped by
user"); running out of crucibles, the operator's refill in the simulator and ``resume
--refilled``; the rack shared between campaigns; a failed batch (the doser's heads run dry)
pausing with the rack slots to clear; refused requests (422 naming the field with nothing stored,
404, 409); ``campaign`` events on the WebSocket; the report JSON, PNG and CSV; ``labctl campaign
status/report --json``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from hardware_sims.control import ControlClient
from labd.api.server import ApiService
from labd.app import Daemon
from labd.config import DaemonConfig
from tests.conftest import OER_CSV
from tests.support.procs import Mosquitto, wait_until

LABCTL = Path(sys.executable).parent / "labctl"
ELEMENTS = ["Ni", "Fe", "Co", "Mn", "Ce", "La"]
#: Fixed make_batch parameters: a short anneal the simulated furnace does in ~2 wall seconds.
PARAMS = {"anneal_c": 400, "anneal_s": 60, "ramp_c_min": 600, "unload_below_c": 380}
PNG = b"\x89PNG\r\n\x1a\n"


class Events:
    """The daemon's WebSocket, read in a thread: every ``campaign`` event, in order."""

    def __init__(self, url: str, token: str) -> None:
        self.ws = connect(url.replace("http", "ws") + "/api/v1/ws")
        self.ws.send(json.dumps({"token": token}))
        assert json.loads(self.ws.recv(timeout=10))["type"] == "snapshot"
        self.campaign: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                msg = json.loads(self.ws.recv())
                if msg["type"] == "campaign":
                    with self.lock:
                        self.campaign.append(msg)
        except ConnectionClosed:
            pass

    def of(self, cid: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.campaign if e["id"] == cid]

    def close(self) -> None:
        self.ws.close()
        self.thread.join(5)


@dataclass
class Lab:
    daemon: Daemon
    url: str
    token: str
    http: httpx.Client
    control: ControlClient
    pool: Path
    token_file: Path
    closers: list[Callable[[], None]] = field(default_factory=list)

    def labctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LABD_URL": self.url, "LABD_TOKEN_FILE": str(self.token_file)}
        env.pop("LABD_TOKEN", None)
        return subprocess.run([str(LABCTL), *args], capture_output=True, text=True, env=env,
                              timeout=60)

    def events(self) -> Events:
        ev = Events(self.url, self.token)
        self.closers.append(ev.close)
        return ev

    def get(self, cid: str) -> dict[str, Any]:
        r = self.http.get(f"/campaigns/{cid}")
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    def wait(self, cid: str, pred: Callable[[dict[str, Any]], Any], what: str,
             timeout: float = 60) -> dict[str, Any]:
        """Poll the campaign until ``pred`` holds; returns its status then."""
        return wait_until(lambda: (lambda c: c if pred(c) else None)(self.get(cid)), timeout,
                          f"campaign {cid}: {what}")

    def start(self, name: str, budget: int, batch: int = 2, **run: Any) -> str:
        r = self.http.post("/campaigns", json=request(self.pool, name, budget, batch, **run))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def queue(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.http.get("/queue").json()["items"]
        return data

    def world(self) -> dict[str, Any]:
        data: dict[str, Any] = self.control.call(op="world")["world"]
        return data


def request(pool: Path, name: str, budget: int, batch: int = 2, **run: Any) -> dict[str, Any]:
    return {"spec": {
        "name": name, "elements": {el: {} for el in ELEMENTS}, "pool": str(pool),
        "objective": {"goal": "minimize", "property": "overpotential_V"}, "batch_size": batch,
        "budget": {"samples": budget}, "optimizer": {"kind": "gp", "seed": 0}},
        "run": {"params": dict(PARAMS), **run}}


@pytest.fixture
def lab(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Lab]:
    # a cell name of its own: the daemons of these tests share the broker, one after another
    cell = f"camp-{tmp_path.name[-40:].strip('_-')}"
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({"cell": cell, "world": {"anneal_hold_s": 30},
                                   "devices": {"station": {"measure_s": 5}}}))
    pool = tmp_path / "pool.csv"
    pool.write_text("".join(OER_CSV.read_text().splitlines(keepends=True)[:31]))
    cfg = DaemonConfig(cell=cell, data_dir=tmp_path / "data", api={"port": 0}, simulator={
        "config": sim, "time_scale": 2000, "ground_truth": OER_CSV, "goal": "minimize",
        "mqtt": mosquitto.url})
    daemon = Daemon(cfg)
    try:
        daemon.start()
        api = next(s for s in daemon.services if isinstance(s, ApiService))
        token_file = tmp_path / "data" / "admin.token"
        token = token_file.read_text().strip()
        with httpx.Client(base_url=api.url + "/api/v1", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            lab = Lab(daemon, api.url, token, http, ControlClient(daemon.endpoints["control"]),
                      pool, token_file)
            yield lab
            for close in lab.closers:
                close()
    finally:
        daemon.shutdown()


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def slots_of(lab: Lab, item_uid: str) -> list[str]:
    entry = lab.http.get(f"/history/{item_uid}").json()
    return [s["rack_slot"] for s in entry["params"]["samples"]]


# -- refused requests ---------------------------------------------------------------------------
def test_refused_requests_say_why_and_store_nothing(lab: Lab, tmp_path: Path) -> None:
    good = request(lab.pool, "refused", 4)

    def refused(body: dict[str, Any]) -> str:
        r = lab.http.post("/campaigns", json=body)
        assert r.status_code == 422, r.text
        return json.dumps(r.json()["detail"])

    def spec(**change: Any) -> dict[str, Any]:
        return {**good, "spec": {**good["spec"], **change}}

    def run(**change: Any) -> dict[str, Any]:
        return {**good, "run": {**good["run"], **change}}

    # the spec (pydantic): each error names its field
    r = lab.http.post("/campaigns", json=spec(batch_size=0))
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["detail"]["errors"]] == ["batch_size"]
    assert '"objective"' in refused({**good, "spec": {k: v for k, v in good["spec"].items()
                                                      if k != "objective"}})
    assert "'ni' is not an element symbol" in refused(spec(elements={"ni": {}, "Fe": {}}))
    assert "budget needs samples or hours" in refused(spec(budget={}))
    # the spec against this cell and its files
    assert "spec.elements: no doser head holds Cr" in refused(
        spec(elements={"Ni": {}, "Cr": {}}))
    assert "spec: pool: cannot read" in refused(spec(pool=str(tmp_path / "nowhere.csv")))
    # the run options
    r = lab.http.post("/campaigns", json=run(rack_slot=["rack/1"]))
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["detail"]["errors"]] == ["rack_slot"]
    assert "run.rack_slots: ['furnace/1'] are not rack slots" in refused(
        run(rack_slots=["rack/1", "furnace/1"]))
    detail = refused(run(params={**PARAMS, "anneal_c": 5000}))
    assert "run.params: anneal_c" in detail, detail
    # nothing stored, nothing queued, and the name is still free
    assert lab.http.get("/campaigns").json() == []
    assert lab.queue() == []
    cid = lab.start("refused", 2)
    assert cid == "refused"
    r = lab.http.post("/campaigns", json=good)
    assert r.status_code == 409 and "exists already" in r.json()["detail"]
    # an unknown campaign is 404 everywhere
    for method, path in [("get", ""), ("post", "/pause"), ("post", "/resume"), ("post", "/stop"),
                         ("get", "/report"), ("get", "/report.png"), ("get", "/samples.csv")]:
        r = lab.http.request(method.upper(), f"/campaigns/nope{path}")
        assert r.status_code == 404, (path, r.text)
        assert r.json()["detail"] == "no campaign 'nope'"
    r = lab.labctl("campaign", "status", "nope")
    assert r.returncode == 1 and "no campaign 'nope'" in r.stderr
    # a viewer may read, not change
    r = lab.http.post("/tokens", json={"name": "vera", "role": "viewer"})
    viewer = {"Authorization": f"Bearer {r.json()['token']}"}
    assert lab.http.get(f"/campaigns/{cid}", headers=viewer).status_code == 200
    assert lab.http.post(f"/campaigns/{cid}/pause", headers=viewer).status_code == 403
    lab.wait(cid, lambda c: c["status"] == "finished", "finish")


# -- pause, resume, stop ------------------------------------------------------------------------
def test_pause_lets_the_batch_finish_resume_goes_on_stop_ends(lab: Lab) -> None:
    events = lab.events()
    cid = lab.start("pausing", 8)
    # batch 1 runs on the cell
    first = lab.wait(cid, lambda c: any(b["state"] == "queued" for b in c["batches"])
                     and lab.http.get("/status").json()["current"], "batch 1 running")
    item1 = first["batches"][0]["item_uid"]
    assert lab.http.post(f"/campaigns/{cid}/resume").status_code == 409  # it is running
    r = lab.labctl("--json", "campaign", "pause", cid)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "paused"
    assert json.loads(r.stdout)["reason"] == "paused by user"
    # the running batch finishes; no new batch is queued while paused
    paused = lab.wait(cid, lambda c: c["samples_made"] == 2
                      and c["batches"][0]["state"] == "done", "batch 1 to finish")
    assert paused["status"] == "paused" and paused["batches"][0]["outcome"] == "success"
    assert lab.http.get(f"/history/{item1}").json()["status"] == "success"
    assert lab.queue() == []
    assert [b["state"] for b in paused["batches"]] in (["done"], ["done", "planned"])
    assert lab.http.post(f"/campaigns/{cid}/pause").status_code == 409  # paused already
    # resume: the next batch is queued and runs
    r = lab.labctl("--json", "campaign", "resume", cid)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "running"
    second = lab.wait(cid, lambda c: len(c["batches"]) >= 2 and c["batches"][1]["state"]
                      == "queued", "batch 2 queued")
    item2 = second["batches"][1]["item_uid"]
    wait_until(lambda: (lab.http.get("/status").json()["current"] or {}).get("item_uid")
               == item2, 30, "batch 2 to run")
    # stop while batch 2 runs: it finishes, nothing else is made
    r = lab.labctl("--json", "campaign", "stop", cid)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "stopping"
    done = lab.wait(cid, lambda c: c["status"] == "finished", "the campaign to finish")
    assert done["reason"] == "stopped by user"
    assert done["samples_made"] == 4 and done["pending"] == 0
    assert lab.http.get(f"/history/{item2}").json()["status"] == "success"
    assert lab.queue() == []
    # a batch planned ahead but never queued is not made: nothing was dosed for it
    for b in done["batches"][2:]:
        assert b["outcome"] == "not made" and b["item_uid"] is None
    rep = lab.http.get(f"/campaigns/{cid}/report").json()
    assert all(o["reason"].startswith("not made") for o in rep["interrupted"])
    assert rep["samples_made"] == 4
    # a finished campaign cannot be paused, resumed or stopped
    for op in ("pause", "resume", "stop"):
        r = lab.http.post(f"/campaigns/{cid}/{op}")
        assert r.status_code == 409, (op, r.text)
    r = lab.labctl("campaign", "pause", cid)
    assert r.returncode == 1 and "finished" in r.stderr
    # the WebSocket told the story in order
    statuses = [e["status"] for e in events.of(cid)]
    compact = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    assert compact == ["running", "paused", "running", "stopping", "finished"], statuses
    made = [e["samples_made"] for e in events.of(cid)]
    assert made == sorted(made) and made[-1] == 4


# -- crucibles ----------------------------------------------------------------------------------
def test_out_of_crucibles_pauses_until_the_rack_is_refilled(lab: Lab) -> None:
    slots = ["rack/11", "rack/12"]
    cid = lab.start("crucibles", 4, rack_slots=slots)
    st = lab.wait(cid, lambda c: c["status"] == "paused", "the campaign to run out of crucibles")
    assert st["reason"] == ("out of empty crucibles: 0 left, the next batch needs 2. Replace "
                            "the used crucibles in the rack with empty ones, then resume with "
                            "--refilled")
    assert st["samples_made"] == 2 and st["rack_slots_free"] == 0 and lab.queue() == []
    (b1,) = st["batches"]
    assert slots_of(lab, b1["item_uid"]) == slots
    # resuming without a refill: the rack is still full of samples
    r = lab.labctl("--json", "campaign", "resume", cid)
    assert r.returncode == 0, r.stderr
    st = lab.wait(cid, lambda c: c["status"] == "paused", "pause again")
    assert st["reason"].startswith("out of empty crucibles") and len(st["batches"]) == 1
    # the operator takes the two samples out and puts empty crucibles in
    world = lab.world()
    used = {c["location"]: c for c in world["crucibles"].values() if c["location"] in slots}
    assert {c["sample_id"] for c in used.values()} == set(b1["sample_ids"])
    out = lab.control.call(op="refill_rack", slots=slots)
    assert sorted(out["removed"]) == sorted(c["id"] for c in used.values())
    r = lab.labctl("--json", "campaign", "resume", cid, "--refilled")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rack_slots_free"] == 2
    done = lab.wait(cid, lambda c: c["status"] == "finished", "the campaign to finish")
    assert done["reason"].startswith("sample budget spent: 4 of 4"), done["reason"]
    b2 = done["batches"][1]
    assert slots_of(lab, b2["item_uid"]) == slots
    # the new crucibles hold batch 2's samples; the removed ones keep batch 1's
    world = lab.world()
    assert {world["crucibles"][out["refilled"][s]]["sample_id"] for s in slots} == set(
        b2["sample_ids"])
    assert {c["sample_id"] for c in world["removed"].values()} == set(b1["sample_ids"])


def test_campaigns_share_the_rack(lab: Lab) -> None:
    """A crucible another campaign used holds its sample: it is not dosed again."""
    a = lab.start("rack-a", 2, rack_slots=["rack/1", "rack/2"])
    lab.wait(a, lambda c: c["status"] == "finished", "campaign a to finish")
    b = lab.start("rack-b", 2, rack_slots=["rack/2", "rack/3"])
    st = lab.wait(b, lambda c: c["status"] == "paused", "campaign b to find rack/2 used")
    assert st["reason"].startswith("out of empty crucibles: 1 left, the next batch needs 2")
    assert lab.queue() == []
    lab.control.call(op="refill_rack")
    r = lab.http.post(f"/campaigns/{b}/resume", json={"refilled": True})
    assert r.status_code == 200, r.text
    done = lab.wait(b, lambda c: c["status"] == "finished", "campaign b to finish")
    assert slots_of(lab, done["batches"][0]["item_uid"]) == ["rack/2", "rack/3"]
    assert lab.get(a)["rack_slots_free"] == 1  # the refill freed a's slots; b holds rack/2


# -- a failed batch -----------------------------------------------------------------------------
def test_a_failed_batch_pauses_and_names_the_slots_to_clear(lab: Lab) -> None:
    for head in sorted(set(lab.daemon.layout.heads.values())):
        lab.control.call(op="action", device="doser", action="set_powder",
                         args={"head": head, "grams": 0.0})
    cid = lab.start("dry", 4, rack_slots=["rack/5", "rack/6", "rack/7"])
    st = lab.wait(cid, lambda c: c["status"] == "paused", "the failed batch to pause it")
    (batch,) = st["batches"]
    assert batch["state"] == "done"
    entry = lab.http.get(f"/history/{batch['item_uid']}").json()
    assert entry["status"] == "failed", entry
    assert st["interrupted"] == 2 and st["samples_made"] == 0 and st["pending"] == 0
    assert st["reason"].startswith(f"batch 1 ended failed: {entry['error']}")
    assert (f"samples {', '.join(batch['sample_ids'])} are recorded interrupted. Their "
            "crucibles (from rack slots rack/5, rack/6) may still be in the furnace, on the "
            "balance, at the doser, the station or the gripper: clear the cell, then resume"
            ) in st["reason"]
    assert lab.queue() == []
    rep = lab.http.get(f"/campaigns/{cid}/report").json()
    assert [o["sample_id"] for o in rep["interrupted"]] == batch["sample_ids"]
    assert all(o["reason"].startswith("failed") for o in rep["interrupted"])


# -- report -------------------------------------------------------------------------------------
def test_report_json_png_csv_websocket_and_labctl(lab: Lab, tmp_path: Path) -> None:
    events = lab.events()
    cid = lab.start("report", 4)
    done = lab.wait(cid, lambda c: c["status"] == "finished", "the campaign to finish")
    assert done["samples_made"] == 4 and done["samples_left"] == 0
    rep = lab.http.get(f"/campaigns/{cid}/report").json()
    state = lab.daemon.call(_state(lab, cid))
    values = {o["sample_id"]: o["value"] for o in state["observations"]}
    assert len(values) == 4
    best_id = min(values, key=lambda k: values[k])
    assert rep["best"]["sample_id"] == best_id and rep["best"]["value"] == values[best_id]
    assert rep["samples_made"] == 4 and rep["samples_pending"] == 0
    assert rep["budget"]["samples"] == 4 and rep["budget"]["samples_left"] == 0
    assert rep["best_after_sample"][-1] == values[best_id] and len(rep["best_after_sample"]) == 4
    assert len(rep["best_after_batch"]) == 2
    # every value is the simulator's measurement of what was dosed: the journal agrees
    samples = {r["sample_id"]: r for r in lab.http.get(
        "/samples", params={"campaign": cid}).json()}
    assert {s: samples[s]["property_value"] for s in values} == values
    png = lab.http.get(f"/campaigns/{cid}/report.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == PNG and len(png.content) > 10_000
    rows = csv_rows(lab.http.get(f"/campaigns/{cid}/samples.csv").text)
    assert [r["sample_id"] for r in rows] == [o["sample_id"] for o in state["observations"]]
    assert {r["status"] for r in rows} == {"made"}
    assert {r["sample_id"]: float(r["value"]) for r in rows} == values
    # the WebSocket: status changes, samples made as they came, the best at the end
    evs = events.of(cid)
    assert evs[0]["status"] == "running" and evs[-1]["status"] == "finished"
    assert {0, 2, 4} <= {e["samples_made"] for e in evs}
    assert evs[-1]["best"]["sample_id"] == best_id
    # labctl, for scripts
    r = lab.labctl("--json", "campaign", "status", cid)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["status"] == "finished" and st["best"]["value"] == values[best_id]
    r = lab.labctl("--json", "campaign", "status")
    assert [c["id"] for c in json.loads(r.stdout)] == [cid]
    r = lab.labctl("--json", "campaign", "report", cid, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["best"] == rep["best"] and out["budget"]["samples_left"] == 0
    assert (tmp_path / "out" / f"{cid}-report.png").read_bytes()[:8] == PNG
    assert len((tmp_path / "out" / f"{cid}-samples.csv").read_text().splitlines()) == 5
    r = lab.labctl("campaign", "report", cid)
    assert r.returncode == 0 and f"best: {best_id}" in r.stdout, r.stdout


async def _state(lab: Lab, cid: str) -> dict[str, Any]:
    svc = next(s for s in lab.daemon.services if getattr(s, "name", "") == "campaigns")
    return svc.observations(cid)  # type: ignore[attr-defined, no-any-return]
