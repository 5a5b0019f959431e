"""Browser tests: headless Debian Chromium (driven by Playwright, no downloaded browser) against
the real ``labd`` process on the simulated cell, with the suite's mosquitto.

One daemon serves the module (starting the simulated cell takes seconds); tokens: the bootstrap
admin token, and a technician and a viewer made through the API."""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.labd import LabdProcess, wait_until
from tests.support.procs import Mosquitto

__all__ = ["Labd", "wait_until", "with_users"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (bash .ci/system-deps)",
                allow_module_level=True)


class Labd(LabdProcess):
    """The real daemon process with named users: ``tokens`` (admin from the bootstrap file;
    :func:`with_users` adds a technician and a viewer)."""

    def __init__(self, data_dir: Path, broker: Mosquitto, log: Path, *, time_scale: float = 200,
                 args: Sequence[str] = ()) -> None:
        super().__init__(data_dir, log, ["--mqtt", broker.url, "--time-scale", str(time_scale),
                                         *args])
        self.tokens: dict[str, str] = {}

    def start(self) -> httpx.Client:
        http = super().start()
        self.tokens["admin"] = self.token_file.read_text().strip()
        return http

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.signal(signal.SIGTERM) == 0, self.log.read_text()[-3000:]

    def user(self, who: str) -> httpx.Client:
        return self.client(self.tokens[who])

    def api(self, who: str, method: str, path: str, **kw: Any) -> Any:
        with self.user(who) as c:
            r = c.request(method, path, **kw)
            r.raise_for_status()
            return r.json()

    def control_address(self) -> str:
        return str(self.endpoints()["control"])


def with_users(daemon: Labd) -> Labd:
    """Start ``daemon`` and make its users: tess (technician) and vic (viewer)."""
    daemon.start()
    for name, role in (("tess", "technician"), ("vic", "viewer")):
        daemon.tokens[name] = daemon.api("admin", "POST", "/tokens",
                                         json={"name": name, "role": role})["token"]
    return daemon


@pytest.fixture(scope="module")
def labd(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[Labd]:
    tmp = tmp_path_factory.mktemp("labd-web")
    daemon = Labd(tmp / "data", mosquitto, tmp / "labd.log")
    try:
        yield with_users(daemon)
    finally:
        daemon.cleanup()


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
