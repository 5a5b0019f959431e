"""systemd integration: the notify protocol on a real NOTIFY_SOCKET, and the unit files.

The real ``labd`` process is started with the simulated cell (its own ``labd-sim``), the suite's
mosquitto, a free API port and a temporary data directory, with ``NOTIFY_SOCKET`` pointing at an
AF_UNIX datagram socket this test binds and ``WATCHDOG_USEC`` set, as systemd would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
LABD = Path(sys.executable).with_name("labd")


def _receive(sock: socket.socket, until: str, timeout: float, got: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while not any(until in m for m in got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {until!r} in {timeout} s; received {got}")
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue


def test_labd_speaks_the_notify_protocol(tmp_path: Path, mosquitto: Mosquitto) -> None:
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    env = {**os.environ, "NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    log = tmp_path / "labd.log"
    proc = subprocess.Popen(
        [str(LABD), "--data-dir", str(tmp_path / "data"), "--mqtt",
         f"{mosquitto.host}:{mosquitto.port}", "--api-port", str(free_port()),
         "--time-scale", "200", "--log-json"],
        env=env, cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # a file, not a pipe nobody reads while it runs
    got: list[str] = []
    try:
        _receive(sock, "READY=1", 90, got)
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=ready" in ready
        statuses = [line for m in got for line in m.splitlines() if line.startswith("STATUS=")]
        assert "STATUS=connecting devices" in statuses
        assert any(s.startswith("STATUS=starting safety") for s in statuses)
        n = len(got)
        _receive(sock, "WATCHDOG=1", 5, got)
        # At the watchdog's pace (WATCHDOG_USEC/2 = 0.2 s): several more within a second.
        end = time.monotonic() + 1.0
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        assert sum("WATCHDOG=1" in m for m in got[n:]) >= 3
        proc.send_signal(signal.SIGTERM)
        _receive(sock, "STOPPING=1", 30, got)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()
    assert "interlocks armed" in log.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
@pytest.mark.parametrize("unit", ["labd.service", "labd-sim.service"])
def test_unit_files_verify(tmp_path: Path, unit: str) -> None:
    text = (REPO / "systemd" / unit).read_text()
    # Verify against this checkout's labd (the unit names the installed path, /opt/labd).
    assert "/opt/labd/.venv/bin/labd " in text
    (tmp_path / unit).write_text(text.replace("/opt/labd/.venv/bin/labd", str(LABD)))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                       capture_output=True, text=True, timeout=60)
    own = [line for line in (r.stdout + r.stderr).splitlines() if unit in line]
    assert r.returncode == 0 and not own, r.stdout + r.stderr
    for key in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure",
                "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                "ProtectHome=yes", "StateDirectory="):
        assert key in text, f"{unit} lacks {key}"
    if unit == "labd.service":
        assert "SupplementaryGroups=dialout" in text
        assert "--config /etc/labd/labd.yaml --data-dir /var/lib/labd --log-json" in text
