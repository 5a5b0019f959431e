"""``labd-sim`` as a user runs it: a real process, real ptys and sockets, a real broker.

A person with only ``mbpoll``, ``mosquitto_sub`` and a serial terminal must be able to talk to every
simulated instrument; these tests do exactly that with those tools (pyserial stands in for the
serial terminal), against the cell started by the same command the README gives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial

from hardware_sims.control import ControlClient
from tests.conftest import OER_CSV
from tests.support.procs import Mosquitto

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def start_sim(
    tmp_path: Path, broker: Mosquitto, *extra: str, config: Path | None = None
) -> tuple[subprocess.Popen[str], dict[str, Any], Path]:
    endpoints = tmp_path / "endpoints.json"
    cmd = [
        str(BIN / "labd-sim"),
        "--config",
        str(config or REPO / "config" / "sim-cell.yaml"),
        "--ephemeral-ports",
        "--mqtt",
        broker.url,
        "--endpoints",
        str(endpoints),
        "--time-scale",
        "200",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not endpoints.exists():
        if proc.poll() is not None:
            raise AssertionError(f"labd-sim exited {proc.returncode}: {proc.stdout.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("labd-sim wrote no endpoints file in 20 s")
        time.sleep(0.05)
    return proc, json.loads(endpoints.read_text()), endpoints


def stop_sim(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


@pytest.fixture
def running_cell(
    tmp_path: Path, mosquitto: Mosquitto
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any], Path]]:
    proc, ep, path = start_sim(tmp_path, mosquitto)
    yield proc, ep, path
    stop_sim(proc)


def serial_query(address: str, command: bytes, eol: bytes = b"\r\n", timeout: float = 3.0) -> bytes:
    with serial.serial_for_url(address, baudrate=9600, timeout=timeout) as port:
        port.reset_input_buffer()
        port.write(command)
        return port.read_until(eol)


@pytest.mark.conformance
def test_every_instrument_answers_its_own_protocol(
    running_cell: tuple[subprocess.Popen[str], dict[str, Any], Path], mosquitto: Mosquitto
) -> None:
    proc, ep, _ = running_cell
    devices = ep["devices"]
    assert set(devices) == {"balance", "doser", "gantry", "furnace", "probe", "station", "safety"}

    # Serial instruments, both on their pty and on TCP (socket:// as pyserial spells it).
    for name in ("balance", "doser", "probe", "gantry"):
        assert Path(devices[name]["pty"]).resolve().as_posix().startswith("/dev/pts/"), name
    assert serial_query(devices["balance"]["pty"], b"I4\r\n").startswith(b'I4 A "')
    assert serial_query(devices["balance"]["url"], b"Z\r\n") == b"Z A\r\n"
    assert serial_query(devices["doser"]["pty"], b"I4\r\n").startswith(b'I4 A "')
    idn = serial_query(devices["probe"]["pty"], b"*IDN?\n", eol=b"\n")
    assert idn.startswith(b"KEITHLEY INSTRUMENTS INC.,MODEL 2400,")
    status = serial_query(devices["gantry"]["pty"], b"?", eol=b">")
    assert status.startswith(b"<Alarm|MPos:") or status.startswith(b"<Idle|MPos:")

    # The furnace with mbpoll, on Modbus TCP: one holding register (mbpoll's -r is 1-based,
    # so -r 2 reads address 1, the process value).
    host, port = devices["furnace"]["modbus_tcp"].split(":")
    out = subprocess.run(
        [
            "mbpoll",
            "-m",
            "tcp",
            "-p",
            port,
            "-a",
            str(devices["furnace"]["unit_id"]),
            "-r",
            "2",
            "-c",
            "1",
            "-1",
            host,
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[2]:" in out.stdout

    # The MQTT instruments with mosquitto_sub: their retained status says online.
    prefix = ep["mqtt"]["prefix"]
    for name in ("station", "safety"):
        got = subprocess.run(
            [
                "mosquitto_sub",
                "-h",
                mosquitto.host,
                "-p",
                str(mosquitto.port),
                "-t",
                f"{prefix}/{name}/status",
                "-C",
                "1",
                "-W",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
        assert json.loads(got.stdout)["state"] == "online", (name, got.stdout, got.stderr)
    assert proc.poll() is None


def test_control_channel_and_simctl(
    running_cell: tuple[subprocess.Popen[str], dict[str, Any], Path],
) -> None:
    _, ep, _ = running_cell
    client = ControlClient(ep["control"])
    assert client.call(op="ping")["cell"] == "sim-cell"
    assert "world" in client.call(op="state")["state"]
    bad = client.request(op="fault", device="furnace", fault={"kind": "explode"})
    assert bad["ok"] is False and "invalid fault" in bad["error"]
    bad = client.request(op="state", device="laser")
    assert bad == {"ok": False, "error": bad["error"]} and "no device 'laser'" in bad["error"]
    bad = client.request(op="dance")
    assert "unknown op 'dance'" in bad["error"]

    # labd-simctl, the command-line face of the same channel.
    env = {**os.environ, "LABD_SIM_CONTROL": ep["control"]}
    run = subprocess.run(
        [str(BIN / "labd-simctl"), "fault", "balance", "no_reply", "--count", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=10,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["faults"][0]["kind"] == "no_reply"
    # The next balance reply is swallowed, the one after comes.
    assert serial_query(ep["devices"]["balance"]["pty"], b"Z\r\n", timeout=1.0) == b""
    assert serial_query(ep["devices"]["balance"]["pty"], b"Z\r\n") == b"Z A\r\n"
    run = subprocess.run(
        [str(BIN / "labd-simctl"), "state", "nosuch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=10,
    )
    assert run.returncode == 1 and "no device 'nosuch'" in run.stderr


def test_sigterm_removes_what_it_created(tmp_path: Path, mosquitto: Mosquitto) -> None:
    proc, ep, endpoints = start_sim(tmp_path, mosquitto)
    run_dir = Path(ep["run_dir"])
    links = [Path(d["pty"]) for d in ep["devices"].values() if "pty" in d]
    assert links and all(p.exists() for p in links)
    code, out = stop_sim(proc)
    assert code == 0, out
    assert "labd-sim: cell 'sim-cell' running" in out
    assert not endpoints.exists()
    assert not run_dir.exists()
    assert not any(p.exists() for p in links)


def test_ground_truth_table_from_the_command_line(tmp_path: Path, mosquitto: Mosquitto) -> None:
    proc, ep, _ = start_sim(
        tmp_path, mosquitto, "--ground-truth", str(OER_CSV), "--goal", "minimize"
    )
    try:
        gt = ep["ground_truth"]
        assert gt["pool_size"] == 2121 and gt["goal"] == "minimize"
        assert gt["elements"] == ["Ni", "Fe", "Co", "Mn", "Ce", "La"]
    finally:
        assert stop_sim(proc)[0] == 0


def test_bad_config_is_refused_with_the_key_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n  furnace:\n    unit_id: 0\n  oven: {}\n")
    run = subprocess.run(
        [str(BIN / "labd-sim"), "--config", str(bad)], capture_output=True, text=True, timeout=20
    )
    assert run.returncode == 2
    assert (
        "devices.furnace.unit_id: Input should be greater than or equal to 1 (got 0)" in run.stderr
    )
    assert "devices.oven: unknown key" in run.stderr
    run = subprocess.run(
        [str(BIN / "labd-sim"), "--ground-truth", str(OER_CSV)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert run.returncode == 2 and "--ground-truth needs --goal" in run.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path, mosquitto: Mosquitto) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        run = subprocess.run(
            [
                str(BIN / "labd-sim"),
                "--mqtt",
                mosquitto.url,
                "--control-port",
                str(port),
                "--run-dir",
                str(tmp_path / "run"),
                "--ephemeral-ports",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    # --ephemeral-ports frees the instruments' ports, but the explicit control port is taken:
    # the cell refuses to start, says why, and leaves nothing behind.
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"control channel: cannot listen on 127.0.0.1:{port}" in run.stderr
    assert not any((tmp_path / "run").iterdir())
