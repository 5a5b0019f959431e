"""The simulated cell as a process of its own, started and stopped by the daemon.

It is a separate process (``python -m hardware_sims.launcher``) on purpose: the simulated
instruments stand in for hardware, so they must not share the daemon's event loop, its crashes or
its SIGKILL. The daemon reads where they listen from the endpoints file, as it would read a real
cell's addresses from its config.

Like hardware, the simulated cell outlives a daemon that is killed: a daemon that starts and finds
the simulator of its predecessor still running (pid file, endpoints file) re-attaches to it, so the
crucibles, powders and furnace are as the killed daemon left them. A clean stop (SIGTERM to the
daemon) stops the simulator too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import SimulatorConfig

log = logging.getLogger(__name__)


class SimulatorError(RuntimeError):
    pass


class SimulatorProcess:
    def __init__(self, config: SimulatorConfig, data_dir: Path, cell: str) -> None:
        self.config = config
        self.dir = data_dir / "sim"
        self.cell = cell
        self.endpoints_file = self.dir / "endpoints.json"
        self.log_file = self.dir / "labd-sim.log"
        self.pid_file = self.dir / "labd-sim.pid"
        self.pid: int | None = None
        self.attached = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, Any] = {}

    def command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "hardware_sims.launcher", "--endpoints",
               str(self.endpoints_file), "--ephemeral-ports", "--run-dir", str(self.dir / "run")]
        if c.config is not None:
            cmd += ["--config", str(c.config)]
        if c.time_scale is not None:
            cmd += ["--time-scale", str(c.time_scale)]
        if c.ground_truth is not None:
            cmd += ["--ground-truth", str(c.ground_truth)]
        if c.goal is not None:
            cmd += ["--goal", c.goal]
        if c.mqtt is not None:
            cmd += ["--mqtt", c.mqtt]
        return cmd

    def _leftover(self) -> int | None:
        """The pid of a simulator a previous daemon left running, if there is one."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if b"hardware_sims.launcher" not in cmdline or not self.endpoints_file.exists():
            return None
        return pid

    def start(self) -> dict[str, Any]:
        pid = self._leftover()
        if pid is not None:
            self.pid, self.attached = pid, True
            self.endpoints = json.loads(self.endpoints_file.read_text())
            log.warning("re-attached to the simulated cell (pid %d) a previous daemon left", pid)
            return self.endpoints
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "run").mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.endpoints_file.unlink()
        log.info("starting the simulated cell: %s", " ".join(self.command()))
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid = self.proc.pid
        self.pid_file.write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + self.config.start_timeout_s
        while not self.endpoints_file.exists():
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise SimulatorError(f"the simulated cell exited with {self.proc.returncode}:\n"
                                     f"{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise SimulatorError(f"the simulated cell did not start within "
                                     f"{self.config.start_timeout_s:g} s (log: {self.log_file})")
            time.sleep(0.05)
        self.endpoints = json.loads(self.endpoints_file.read_text())
        return self.endpoints

    def stop(self, timeout: float = 10.0) -> None:
        proc, pid, self.proc, self.pid = self.proc, self.pid, None, None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        if proc is not None:
            if proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the simulated cell did not stop in %.0f s: killing it", timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        elif pid is not None:  # attached: not our child, so no wait(); poll /proc instead
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
