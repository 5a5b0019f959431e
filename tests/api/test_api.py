"""The REST + WebSocket API against a real Daemon (real RunEngine, SQLite, uvicorn on a free port).

Protocols run on ophyd-async soft signals (the API's job is auth, queueing and run control, which
they exercise fully); the real simulated cell is in ``test_daemon_process.py``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from labd.api.app import create_app
from labd.api.tokens import TokenStore
from labd.engine import EngineState
from labd.store import ExitStatus, QueueItem

from .conftest import Cell, start_daemon, wait_until


def state(cell: Cell) -> dict[str, Any]:
    """Everything a refused request must leave unchanged."""
    store, eng = cell.daemon.store, cell.daemon.engine
    return {
        "queue": [(i.item_uid, i.protocol, i.params, i.user) for i in store.queue()],
        "queue_running": eng.queue_running,
        "stored_running": store.get_value("queue_running", False),
        "history": [(h.item_uid, h.status) for h in store.history()],
        "engine": eng.state,
        "tokens": [(t.token_id, t.revoked_at) for t in cell.api.tokens.list(True)],
    }


def fresh(cell: Cell) -> list[str]:
    """Queue two items of tom's, the queue stopped, the engine idle."""
    cell.wait_idle()
    store = cell.daemon.store
    cell.daemon.engine.stop_queue()
    store.clear()
    items = store.add_batch([QueueItem("count", {"num": 1, "delay": 0.0}, "tom", "test")
                             for _ in range(2)])
    return [i.item_uid for i in items]


# (name, least role, expected status for an allowed role, request(cell, uids) -> method, path, json)
Request = Callable[[Cell, list[str]], tuple[str, str, Any]]
OPERATIONS: list[tuple[str, str, int, Request]] = [
    ("status", "viewer", 200, lambda c, u: ("GET", "/status", None)),
    ("devices", "viewer", 200, lambda c, u: ("GET", "/devices", None)),
    ("protocols", "viewer", 200, lambda c, u: ("GET", "/protocols", None)),
    ("queue list", "viewer", 200, lambda c, u: ("GET", "/queue", None)),
    ("history", "viewer", 200, lambda c, u: ("GET", "/history", None)),
    ("whoami", "viewer", 200, lambda c, u: ("GET", "/whoami", None)),
    ("queue add", "technician", 201,
     lambda c, u: ("POST", "/queue", {"protocol": "count", "params": {"num": 2}})),
    ("queue add batch", "technician", 201,
     lambda c, u: ("POST", "/queue/batch", {"items": [{"protocol": "count"}] * 2})),
    ("queue move own", "technician", 200,
     lambda c, u: ("POST", f"/queue/{u[1]}/move", {"index": 0})),
    ("queue remove own", "technician", 200, lambda c, u: ("DELETE", f"/queue/{u[0]}", None)),
    ("queue start", "technician", 200, lambda c, u: ("POST", "/queue/start", None)),
    ("queue stop", "technician", 200, lambda c, u: ("POST", "/queue/stop", None)),
    ("run now", "technician", 202,
     lambda c, u: ("POST", "/run", {"protocol": "count", "params": {"num": 1}})),
    ("pause (idle: conflict)", "technician", 409, lambda c, u: ("POST", "/run/pause", None)),
    ("resume (idle: conflict)", "technician", 409, lambda c, u: ("POST", "/run/resume", None)),
    ("stop (idle: conflict)", "technician", 409, lambda c, u: ("POST", "/run/stop", None)),
    ("abort (idle: conflict)", "technician", 409, lambda c, u: ("POST", "/run/abort", None)),
    ("halt (idle: conflict)", "technician", 409, lambda c, u: ("POST", "/run/halt", None)),
    ("queue clear", "admin", 200, lambda c, u: ("DELETE", "/queue", None)),
    ("config", "admin", 200, lambda c, u: ("GET", "/config", None)),
    ("token list", "admin", 200, lambda c, u: ("GET", "/tokens", None)),
    ("token create", "admin", 201,
     lambda c, u: ("POST", "/tokens", {"name": f"new{len(u[0])}{os.urandom(3).hex()}",
                                       "role": "viewer"})),
    ("token revoke", "admin", 200, lambda c, u: ("DELETE", "/tokens/vera", None)),
]
RANK = {"viewer": 0, "technician": 1, "admin": 2}
CALLERS = [(None, -1), ("not-a-token", -1), ("labd_0123456789ab.wrong", -1), ("vera", 0),
           ("tom", 1), ("admin", 2)]


def test_every_role_against_every_operation(cell: Cell) -> None:
    """Refusals are 401 (no or bad token) or 403 (role too low) and change nothing; allowed
    callers get the operation's own answer."""
    for name, least, expected, request in OPERATIONS:
        for caller, rank in CALLERS:
            uids = fresh(cell)
            if name == "token revoke" and rank >= RANK[least]:
                cell.api.tokens.revoke("vera")  # a fresh victim for each allowed caller
                token, _ = cell.api.tokens.create("vera", "viewer", "test")
                cell.tokens["vera"] = token
            method, path, body = request(cell, uids)
            before = state(cell)
            with cell.client(caller) as c:
                r = c.request(method, path, json=body)
            what = f"{name} by {caller}: {r.status_code} {r.text}"
            if rank >= RANK[least]:
                assert r.status_code == expected, what
            else:
                assert r.status_code == (401 if rank < 0 else 403), what
                if rank < 0:
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert "token" in r.json()["detail"]
                else:
                    role = next(r for r, n in RANK.items() if n == rank)
                    assert r.json()["detail"].endswith(
                        f"needs the {least} role; {caller} is a {role}"), what
                assert state(cell) == before, what
    cell.wait_idle()


def test_technicians_edit_only_their_own_items(cell: Cell) -> None:
    uids = fresh(cell)
    before = state(cell)
    with cell.client("tina") as tina:
        r = tina.delete(f"/queue/{uids[0]}")
        assert r.status_code == 403
        assert r.json()["detail"] == "editing tom's queue item needs the admin role; " \
                                     "tina is a technician"
        assert tina.post(f"/queue/{uids[1]}/move", json={"index": 0}).status_code == 403
        assert tina.delete("/queue").status_code == 403
    assert state(cell) == before
    with cell.client("admin") as admin:
        assert admin.post(f"/queue/{uids[1]}/move", json={"index": 0}).status_code == 200
        assert admin.delete(f"/queue/{uids[0]}").status_code == 200
        assert admin.delete("/queue/nope").json()["detail"] == "no queued item 'nope'"
    assert [i.item_uid for i in cell.daemon.store.queue()] == [uids[1]]


def test_bad_parameters_are_422_naming_the_field_and_nothing_is_queued(cell: Cell) -> None:
    before = state(cell)
    with cell.client("tom") as c:
        r = c.post("/queue", json={"protocol": "count", "params": {"num": 0, "delay": 1}})
        assert r.status_code == 422
        (err,) = r.json()["detail"]["errors"]
        assert err == {"field": "num", "message": "Input should be greater than or equal to 1",
                       "input": 0}
        assert r.json()["detail"]["message"].startswith("count: invalid parameters: num:")

        r = c.post("/queue", json={"protocol": "dance", "params": {}})
        assert r.status_code == 422 and r.json()["detail"]["errors"][0]["field"] == "protocol"
        assert "no protocol 'dance' (registered: count, fail)" in r.json()["detail"]["message"]

        r = c.post("/queue/batch", json={"items": [
            {"protocol": "count", "params": {"num": 2}},
            {"protocol": "count", "params": {"num": "many"}},
            {"protocol": "count", "params": {"delay": 9}},
        ]})
        assert r.status_code == 422
        errors = r.json()["detail"]["errors"]
        assert [(e["item"], e["field"]) for e in errors] == [(1, "num"), (2, "delay")]

        r = c.post("/queue", json={"params": {"num": 2}})  # no protocol at all
        assert r.status_code == 422
        assert r.json()["detail"]["errors"][0]["field"] == "protocol"
        assert r.json()["detail"]["errors"][0]["message"] == "Field required"

        r = c.post("/run", json={"protocol": "count", "params": {"num": -5}})
        assert r.status_code == 422 and r.json()["detail"]["errors"][0]["field"] == "num"

        r = c.post("/queue", json={"protocol": "count", "params": {"num": 2}, "index": -1})
        assert r.status_code == 422 and r.json()["detail"]["errors"][0]["field"] == "index"
    assert state(cell) == before


def test_bad_tokens_get_401(cell: Cell) -> None:
    revoked = cell.tokens["tina"]
    with cell.client("admin") as admin:
        assert admin.delete("/tokens/tina").status_code == 200
        # the last admin token cannot be revoked (that would lock everyone out)
        r = admin.delete("/tokens/admin")
        assert r.status_code == 409 and "last admin token" in r.json()["detail"]
        assert admin.post("/tokens", json={"name": "tom", "role": "admin"}).status_code == 409
    tom = cell.tokens["tom"]
    bad = [revoked, tom[:-1] + ("A" if tom[-1] != "A" else "B"), tom.replace("labd_", "labx_"),
           "labd_", "labd_zzzzzzzzzzzz.x"]
    before = state(cell)
    for token in bad:
        with httpx.Client(base_url=cell.url + "/api/v1", timeout=10) as c:
            r = c.post("/queue", json={"protocol": "count"},
                       headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, token
            r = c.post("/queue/start", headers={"Authorization": f"Basic {token}"})
            assert r.status_code == 401
    assert state(cell) == before


def test_queue_operations_and_who_started_each_run(cell: Cell) -> None:
    with cell.client("tom", **{"X-Labd-Client": "web"}) as c:
        a = c.post("/queue", json={"protocol": "count", "params": {"num": 2}}).json()
        b = c.post("/queue", json={"protocol": "count", "params": {"num": 3}}).json()
        first = c.post("/queue", json={"protocol": "count", "params": {"num": 1}, "index": 0})
        batch = c.post("/queue/batch", json={"items": [
            {"protocol": "count", "params": {"num": 4}},
            {"protocol": "fail", "params": {"message": "crucible missing"}}], "index": 1}).json()
        order = [i["params"].get("num") for i in c.get("/queue").json()["items"]]
        assert order == [1, 4, None, 2, 3]
        moved = c.post(f"/queue/{b['item_uid']}/move", json={"index": 0}).json()
        assert [i["params"].get("num") for i in moved["items"]] == [3, 1, 4, None, 2]
        removed = c.delete(f"/queue/{a['item_uid']}").json()
        assert removed["item_uid"] == a["item_uid"]
        assert c.get("/queue").json()["length"] == 4
        assert first.json()["user"] == "tom" and first.json()["source"] == "web@127.0.0.1"
        r = c.post("/queue/start")
        assert r.json()["running"] is True
    wait_until(lambda: len(cell.daemon.store.history()) == 4
               and cell.daemon.engine.state is EngineState.IDLE, what="the queue to run")
    cell.wait_idle()
    with cell.client("vera") as c:
        hist = c.get("/history").json()
        assert [(h["params"].get("num"), h["status"]) for h in reversed(hist)] == [
            (3, "success"), (1, "success"), (4, "success"), (None, "failed")]
        assert "crucible missing" in hist[0]["error"]
        assert c.get(f"/history/{batch[1]['item_uid']}").json()["status"] == "failed"
        assert c.get("/history/nope").status_code == 404
        q = c.get("/queue").json()
        assert q == {"items": [], "length": 0, "running": False}  # ran dry: stopped
    starts = [d for n, d in cell.docs if n == "start"]
    assert len(starts) == 3
    assert all(d["user"] == "tom" and d["source"] == "web@127.0.0.1" for d in starts)
    assert starts[0]["protocol"] == "count" and starts[0]["parameters"] == {"num": 3,
                                                                            "delay": 0.0}
    with cell.client("admin") as admin:
        admin.post("/queue", json={"protocol": "count"})
        assert admin.delete("/queue").json() == {"removed": 1}


def test_pause_resume_and_stop_a_slow_run(cell: Cell) -> None:
    store = cell.daemon.store
    with cell.client("tom", **{"X-Labd-Client": "labctl"}) as c:
        item = c.post("/run", json={"protocol": "count",
                                    "params": {"num": 400, "delay": 0.01}}).json()
        wait_until(lambda: c.get("/status").json()["current"], what="the run to start")
        r = c.post("/run", json={"protocol": "count", "params": {"num": 1}})
        assert r.status_code == 409 and "the engine is running" in r.json()["detail"]
        assert c.post("/run/pause", params={"defer": "false"}).status_code == 200
        wait_until(lambda: c.get("/status").json()["engine"] == "paused", what="paused")
        st = c.get("/status").json()
        assert st["current"]["item_uid"] == item["item_uid"]
        paused_at = st["current"]["progress"]["events"]
        assert 0 < paused_at < 400 and st["current"]["progress"]["total"] == 400
        assert c.post("/run/pause").status_code == 409  # already paused
        assert c.post("/run/resume").status_code == 200
        wait_until(lambda: (c.get("/status").json()["current"] or {}).get(
            "progress", {}).get("events", 0) > paused_at, what="progress after resume")
        r = c.post("/run/stop", json={"reason": "sample looked wrong"})
        assert r.status_code == 200, r.text
        wait_until(lambda: store.history()[0].status is not ExitStatus.RUNNING, what="stopped")
        entry = store.history()[0]
        assert entry.status is ExitStatus.STOPPED and entry.error == "sample looked wrong"
        assert c.post("/run/resume").json()["detail"] == "cannot resume: the engine is idle"
        # pause at the next checkpoint, then abort: the default reason names who did it
        c.post("/run", json={"protocol": "count", "params": {"num": 400, "delay": 0.01}})
        wait_until(lambda: c.get("/status").json()["engine"] == "running", what="running")
        assert c.post("/run/pause", params={"defer": "true"}).status_code == 200
        wait_until(lambda: c.get("/status").json()["engine"] == "paused", what="paused")
        assert c.post("/run/abort").status_code == 200
        wait_until(lambda: store.history()[0].status is not ExitStatus.RUNNING, what="aborted")
        assert store.history()[0].status is ExitStatus.ABORTED
        assert store.history()[0].error == "abort by tom (labctl@127.0.0.1)"


def recv(ws: Any) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=10))


def test_websocket_pushes_queue_and_run_events_in_order(cell: Cell) -> None:
    ws_url = cell.url.replace("http", "ws") + "/api/v1/ws"
    with connect(ws_url) as ws:
        ws.send(json.dumps({"token": cell.tokens["vera"]}))
        snap = recv(ws)
        assert snap["type"] == "snapshot" and snap["user"] == "vera"
        assert snap["status"]["engine"] == "idle" and snap["queue"]["length"] == 0
        assert snap["status"]["devices"]["sig"]["values"]["sig"]["units"] == "V"
        with cell.client("tom") as c:
            item = c.post("/queue", json={"protocol": "count", "params": {"num": 5}}).json()
            c.post("/queue/start")
        uid = item["item_uid"]
        events: list[dict[str, Any]] = []
        while not (events and events[-1]["type"] == "item_finished"):
            events.append(recv(ws))
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > snap["seq"]
        kinds = [e["type"] for e in events if e["type"] not in ("re_state", "device_values")]
        assert kinds[:2] == ["queue_changed", "queue"]
        assert events[[e["type"] for e in events].index("queue")]["items"][0]["item_uid"] == uid
        run = [k for k in kinds if k in ("engine_state", "run_started", "run_progress",
                                         "run_stopped", "item_finished")]
        assert run[0] == "engine_state" and run[1] == "run_started"
        assert run[-4:] == ["run_progress", "run_stopped", "engine_state", "item_finished"]
        progress = [e for e in events if e["type"] == "run_progress"]
        assert progress[-1]["events"] == 5 and progress[-1]["total"] == 5
        assert progress[-1]["fraction"] == 1.0 and progress[-1]["item_uid"] == uid
        assert events[-1]["item"]["status"] == "success" and events[-1]["item"]["user"] == "tom"
        states = [e["state"] for e in events if e["type"] == "engine_state"]
        assert states == ["running", "idle"]


def test_websocket_token_in_the_url_and_bad_tokens(cell: Cell) -> None:
    base = cell.url.replace("http", "ws") + "/api/v1/ws"
    with connect(f"{base}?token={cell.tokens['tom']}") as ws:
        assert recv(ws)["user"] == "tom"
        ws.send(json.dumps({"type": "ping", "time": 1}))
        msg = recv(ws)
        while msg["type"] != "pong":
            msg = recv(ws)
    for url, first in ((f"{base}?token=labd_0123456789ab.nope", None),
                       (base, {"token": "garbage"}), (base, {"hello": 1})):
        with connect(url) as ws:
            if first is not None:
                ws.send(json.dumps(first))
            err = recv(ws)
            assert err == {"type": "error", "status": 401,
                           "detail": "missing, invalid or revoked token"}
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 4401


class BrokenDevice:
    name = "broken"

    async def read(self) -> dict[str, Any]:
        raise RuntimeError("the furnace stopped answering")

    async def describe(self) -> dict[str, Any]:
        return {}


class SlowDevice(BrokenDevice):
    name = "slow"

    async def read(self) -> dict[str, Any]:
        import asyncio

        await asyncio.sleep(30)
        return {}


def test_status_reports_device_errors_per_device(cell: Cell) -> None:
    cell.daemon.engine.devices["broken"] = BrokenDevice()
    cell.daemon.engine.devices["slow"] = SlowDevice()
    cell.api.app.state.live.reader.timeout_s = 0.3
    with cell.client("vera") as c:
        devices = c.get("/status").json()["devices"]
    sig = devices["sig"]
    assert sig["connected"] is True and sig["error"] is None
    assert sig["values"]["sig"] == {"value": 1.5, "units": "V", "dtype": "number", "shape": [],
                                    "timestamp": sig["values"]["sig"]["timestamp"]}
    assert devices["broken"] == {"connected": True, "values": {},
                                 "error": "RuntimeError: the furnace stopped answering"}
    assert devices["slow"]["error"] == "read timed out after 0.3 s"


def test_openapi_document_and_bootstrap_token(cell: Cell, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with httpx.Client(base_url=cell.url) as c:
        doc = c.get("/openapi.json").json()
    for path in ("/api/v1/status", "/api/v1/queue", "/api/v1/queue/batch", "/api/v1/run/pause",
                 "/api/v1/run/halt", "/api/v1/history", "/api/v1/tokens"):
        assert path in doc["paths"], path
    token_file = tmp_path / "data" / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # a second daemon on the same data: no new token, the file is untouched
    content = token_file.read_text()
    cell.shutdown()
    caplog.set_level(logging.INFO, "labd.api")
    again = start_daemon(tmp_path / "data")
    try:
        assert token_file.read_text() == content
        assert not [r for r in caplog.records if "bootstrap admin token" in r.getMessage()]
        (api,) = [s for s in again.services if s.name == "api"]
        with httpx.Client(base_url=api.url + "/api/v1") as c:  # type: ignore[attr-defined]
            r = c.get("/whoami", headers={"Authorization": f"Bearer {content.strip()}"})
            assert r.json()["name"] == "admin" and r.json()["role"] == "admin"
    finally:
        again.shutdown()


def test_first_start_logs_the_bootstrap_token_once(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "labd.api")
    daemon = start_daemon(tmp_path / "d")
    try:
        token = (tmp_path / "d" / "admin.token").read_text().strip()
        logged = [r.getMessage() for r in caplog.records if "bootstrap" in r.getMessage()]
        assert len(logged) == 1 and str(tmp_path / "d") in logged[0]
        # The log names the token (its public id) and where it is, never the secret.
        assert token.split(".", 1)[0] in logged[0] and token not in logged[0]
        assert TokenStore(tmp_path / "d" / "labd.sqlite").verify(token) is not None
    finally:
        daemon.shutdown()


async def test_extra_routers_in_process(cell: Cell) -> None:
    """The app factory used directly through httpx's ASGI transport, with a router of another
    service (as /metrics will be) included."""
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> dict[str, int]:
        return {"queue_length": len(cell.daemon.store.queue())}

    app = create_app(cell.daemon, cell.api.tokens, extra_routers=[router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://labd") as c:
        assert (await c.get("/metrics")).json() == {"queue_length": 0}
        auth = {"Authorization": f"Bearer {cell.tokens['tom']}"}
        r = await c.post("/api/v1/queue", json={"protocol": "count"}, headers=auth)
        assert r.status_code == 201 and r.json()["source"] == "api@127.0.0.1"
        assert (await c.get("/api/v1/queue")).status_code == 401
    assert len(cell.daemon.store.queue()) == 1


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        from labd.app import Daemon
        from labd.config import DaemonConfig

        from .conftest import make_registry

        daemon = Daemon(DaemonConfig(simulator={"enabled": False}, data_dir=tmp_path,
                                     api={"port": port}), registry=make_registry())
        with pytest.raises(OSError, match=f"the API cannot listen on 127.0.0.1:{port}: "
                                          "Address already in use"):
            daemon.start()
        daemon.shutdown()


async def test_device_values_come_in_a_stable_order_hinted_first() -> None:
    """ophyd-async merges a device's readings in no fixed order; the API (and the dashboard's
    rows) give the hinted fields first, then the rest by name, whatever the merge did."""
    from ophyd_async.core import StandardReadable, StandardReadableFormat, soft_signal_rw

    from labd.api.live import DeviceReader

    class Stage(StandardReadable):
        def __init__(self, name: str = "") -> None:
            with self.add_children_as_readables():
                self.zeta = soft_signal_rw(float, 1.0)
                self.alpha = soft_signal_rw(float, 2.0)
            with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
                self.position = soft_signal_rw(float, 3.0, units="mm")
            super().__init__(name=name)

    stage = Stage(name="stage")
    await stage.connect()
    reader = DeviceReader(lambda: {"stage": stage}, dict)
    for _ in range(3):
        values = (await reader.read_one("stage", stage))["values"]
        assert list(values) == ["stage-position", "stage-alpha", "stage-zeta"]
        assert values["stage-position"]["units"] == "mm"
