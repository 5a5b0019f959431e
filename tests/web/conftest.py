"""Browser tests: headless Debian Chromium (driven by Playwright, no downloaded browser) against
the real ``labd`` process on the simulated cell, with the suite's mosquitto.

One daemon serves the module (starting the simulated cell takes seconds); tokens: the bootstrap
admin token, and a technician and a viewer made through the API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import Mosquitto, free_port

CHROMIUM = Path("/usr/bin/chromium")
LABD = Path(sys.executable).parent / "labd"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (bash .ci/system-deps)",
                allow_module_level=True)


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Labd:
    """The real daemon process (``labd --data-dir ... --api-port ...``), restartable."""

    data_dir: Path
    broker: Mosquitto
    log: Path
    port: int = field(default_factory=free_port)
    time_scale: float = 200
    #: more arguments of ``labd`` (e.g. ``--config``, ``--ground-truth``)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(LABD), "--data-dir", str(self.data_dir), "--api-port", str(self.port),
               "--mqtt", self.broker.url, "--time-scale", str(self.time_scale), *self.args]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        token_file = self.data_dir / "admin.token"

        def admin_token() -> str:  # the file is created, then written: wait for its content
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            return token_file.read_text().strip() if token_file.exists() else ""

        self.tokens["admin"] = wait_until(admin_token, 60, "admin.token")

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return self.client("admin").get("/status").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, 60, "labd to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0, self.log.read_text()[-3000:]

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.base + "/api/v1", timeout=10,
                            headers={"Authorization": f"Bearer {self.tokens[who]}"})

    def api(self, who: str, method: str, path: str, **kw: Any) -> Any:
        with self.client(who) as c:
            r = c.request(method, path, **kw)
            r.raise_for_status()
            return r.json()

    def control_address(self) -> str:
        endpoints = next(self.data_dir.glob("**/endpoints.json"))
        return str(json.loads(endpoints.read_text())["control"])


@pytest.fixture(scope="module")
def labd(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[Labd]:
    tmp = tmp_path_factory.mktemp("labd-web")
    daemon = Labd(tmp / "data", mosquitto, tmp / "labd.log")
    try:
        daemon.start()
        for name, role in (("tess", "technician"), ("vic", "viewer")):
            daemon.tokens[name] = daemon.api("admin", "POST", "/tokens",
                                             json={"name": name, "role": role})["token"]
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
        pidfile = next(daemon.data_dir.glob("**/labd-sim.pid"), None)  # it outlives a kill
        if pidfile is not None:
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # launch() gives the browser a fresh temporary profile of its own (and refuses
    # --user-data-dir): nothing of a previous run or of the machine's user leaks in.
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage) at tablet size; a screenshot is saved at the end."""
    context = browser.new_context(viewport={"width": 1024, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    pg.screenshot(path=str(tmp_path / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
