"""``labctl`` as a user runs it: real subprocesses against a real daemon (see conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from labd.store import ExitStatus
from tests.support.procs import free_port

from .conftest import Cell, wait_until

LABCTL = [sys.executable, "-m", "labd.cli"]


def labctl(cell: Cell | None, who: str | None, *args: str, url: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*LABCTL, "--url", url or (cell.url if cell else "")]
    if who is not None and cell is not None:
        cmd += ["--token", cell.tokens.get(who, who)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LABD_")}
    full_env.update(env or {})
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60,
                          env=full_env)


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_read_commands(cell: Cell) -> None:
    st = ok_json(labctl(cell, "vera", "--json", "status"))
    assert st["engine"] == "idle" and st["devices"]["sig"]["values"]["sig"]["value"] == 1.5
    text = labctl(cell, "vera", "status")
    assert text.returncode == 0 and "engine    idle" in text.stdout
    devices = labctl(cell, "vera", "devices").stdout.splitlines()
    assert devices[0].split() == ["DEVICE", "STATE", "SIGNAL", "VALUE", "UNITS"]
    assert devices[2].split() == ["sig", "up", "sig", "1.5", "V"]
    protos = ok_json(labctl(cell, "vera", "--json", "protocols"))
    assert [p["name"] for p in protos] == ["count", "fail"]
    table = labctl(cell, "vera", "protocols").stdout
    assert "num:integer=3 [1..10000]" in table and "delay:number=0.0 [0..5]" in table
    me = labctl(cell, None, "whoami", env={"LABD_TOKEN": cell.tokens["tom"]})
    assert me.stdout.strip() == "tom (technician) from labctl@127.0.0.1"


def test_queue_commands_and_run_history(cell: Cell, tmp_path: Path) -> None:
    token_file = tmp_path / "tom.token"
    token_file.write_text(cell.tokens["tom"] + "\n")
    tom = ["--token-file", str(token_file)]
    a = ok_json(labctl(cell, None, *tom, "--json", "queue", "add", "count", "num=2"))
    assert a["params"] == {"num": 2, "delay": 0.0} and a["source"] == "labctl@127.0.0.1"
    batch = tmp_path / "batch.yaml"
    batch.write_text("- {protocol: count, params: {num: 4}}\n- protocol: fail\n"
                     "  params: {message: no powder}\n")
    items = ok_json(labctl(cell, "tom", "--json", "queue", "add-batch", str(batch), "--at", "0"))
    assert len(items) == 2
    moved = ok_json(labctl(cell, "tom", "--json", "queue", "move", a["item_uid"][:10], "0"))
    assert [i["params"].get("num") for i in moved["items"]] == [2, 4, None]
    listing = labctl(cell, "tom", "queue", "list").stdout.splitlines()
    assert listing[0] == "queue stopped, 3 item(s)"
    assert listing[3].split()[:4] == ["0", a["item_uid"][:8], "count", "tom"]
    removed = ok_json(labctl(cell, "tom", "--json", "queue", "remove", items[0]["item_uid"]))
    assert removed["params"]["num"] == 4
    assert ok_json(labctl(cell, "tom", "--json", "queue", "start"))["running"] is True
    wait_until(lambda: len(cell.daemon.store.history()) == 2
               and cell.daemon.engine.state.value == "idle", what="the queue to run")
    hist = ok_json(labctl(cell, "vera", "--json", "history"))
    assert [h["status"] for h in hist] == ["failed", "success"]
    text = labctl(cell, "vera", "history").stdout
    assert "RuntimeError: no powder" in text and "success" in text
    ok_json(labctl(cell, "tom", "--json", "queue", "add", "count"))
    assert labctl(cell, "tom", "queue", "clear").returncode == 5  # a technician may not
    assert ok_json(labctl(cell, "admin", "--json", "queue", "clear")) == {"removed": 1}


def test_errors_and_exit_codes(cell: Cell) -> None:
    bad = labctl(cell, "tom", "queue", "add", "count", "num=0", "delay=fast")
    assert bad.returncode == 6
    assert "invalid parameters, nothing was queued or run" in bad.stderr
    assert "num: Input should be greater than or equal to 1 (got 0)" in bad.stderr
    assert 'delay: Input should be a valid number, unable to parse string as a number ' \
           '(got "fast")' in bad.stderr
    assert cell.daemon.store.queue() == []
    unauth = labctl(cell, "labd_0123456789ab.nope", "queue", "list")
    assert unauth.returncode == 4 and "not authenticated: invalid or revoked token" in \
        unauth.stderr
    assert labctl(cell, None, "status").returncode == 4
    forbidden = labctl(cell, "vera", "queue", "add", "count")
    assert forbidden.returncode == 5
    assert "forbidden: this needs the technician role; vera is a viewer" in forbidden.stderr
    idle = labctl(cell, "tom", "pause")
    assert idle.returncode == 1 and "nothing to pause: the engine is idle" in idle.stderr
    gone = labctl(None, None, "status", url=f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 3 and "cannot reach labd at http://127.0.0.1:" in gone.stderr
    usage = labctl(cell, "tom", "queue", "add", "count", "justaword")
    assert usage.returncode == 2 and "'justaword' is not key=value" in usage.stderr
    assert cell.daemon.store.queue() == []


def test_run_pause_resume_and_follow(cell: Cell) -> None:
    item = ok_json(labctl(cell, "tom", "--json", "run", "count", "num=150", "delay=0.01"))
    follow = subprocess.Popen([*LABCTL, "--url", cell.url, "--token", cell.tokens["vera"],
                               "follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_until(lambda: cell.daemon.engine.state.value == "running", what="running")
    wait_until(lambda: cell.api.app.state.live.monitor.watchers == 1, what="follow")
    assert labctl(cell, "tom", "pause", "--now").returncode == 0
    wait_until(lambda: cell.daemon.engine.state.value == "paused", what="paused")
    assert "resume: engine" in labctl(cell, "tom", "resume").stdout
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0, err
    lines = out.splitlines()
    assert any(f"run count {item['item_uid'][:8]} started" in line for line in lines)
    assert any("pause_now by tom (labctl@127.0.0.1)" in line for line in lines)
    assert any("progress 150/150 events" in line for line in lines)
    assert lines[-1].endswith(f"run count {item['item_uid'][:8]} finished: success")
    assert cell.daemon.store.history()[0].status is ExitStatus.SUCCESS
    # a failed run makes follow exit 1
    follow = subprocess.Popen([*LABCTL, "--url", cell.url, "--token", cell.tokens["vera"],
                               "follow"], stdout=subprocess.PIPE, text=True)
    monitor = cell.api.app.state.live.monitor
    wait_until(lambda: monitor.watchers == 1, what="follow to connect")
    labctl(cell, "tom", "run", "count", "num=100", "delay=0.01")
    wait_until(lambda: cell.daemon.engine.state.value == "running", what="running")
    assert labctl(cell, "tom", "abort", "--reason", "wrong crucible").returncode == 0
    out, _ = follow.communicate(timeout=30)
    assert follow.returncode == 1 and "finished: aborted (wrong crucible)" in out


def test_token_commands(cell: Cell) -> None:
    created = ok_json(labctl(cell, "admin", "--json", "token", "create", "ola", "--role",
                             "technician"))
    assert created["token"].startswith("labd_") and created["role"] == "technician"
    me = ok_json(labctl(cell, created["token"], "--json", "whoami"))
    assert me["name"] == "ola"
    listing = labctl(cell, "admin", "token", "list").stdout
    assert "ola" in listing and "technician" in listing and created["token"] not in listing
    assert labctl(cell, "tom", "token", "list").returncode == 5
    assert labctl(cell, "admin", "token", "create", "ola", "--role", "viewer").returncode == 1
    revoked = ok_json(labctl(cell, "admin", "--json", "token", "revoke", "ola"))
    assert revoked["active"] is False
    assert labctl(cell, created["token"], "whoami").returncode == 4
