"""A real Daemon (simulator off, no instruments) with test protocols on ophyd-async soft signals,
its API served by uvicorn on a free port, and one token per role."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from ophyd_async.core import soft_signal_rw

from labd.api.server import ApiService
from labd.app import Daemon
from labd.config import DaemonConfig
from labd.engine import EngineState
from labd.store import ExitStatus
from tests.support.procs import wait_until
from tests.support.protocols import make_registry

__all__ = ["Cell", "make_registry", "wait_until"]


@dataclass
class Cell:
    daemon: Daemon
    url: str
    tokens: dict[str, str]
    docs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def api(self) -> ApiService:
        (svc,) = [s for s in self.daemon.services if isinstance(s, ApiService)]
        return svc

    def client(self, who: str | None, **headers: str) -> httpx.Client:
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(who, who)}"
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=30)

    def shutdown(self) -> None:
        if not self.daemon.stopping.is_set():
            self.daemon.shutdown()

    def wait_idle(self) -> None:
        """Nothing runs or is about to: the worker may have taken an item (recorded as running
        in the history) a moment before the engine's state says so."""
        eng, store = self.daemon.engine, self.daemon.store
        wait_until(lambda: eng.state is EngineState.IDLE and eng._immediate.empty()
                   and not (eng.queue_running and store.queue())
                   and not any(h.status is ExitStatus.RUNNING for h in store.history()),
                   what="the engine to be idle")


def start_daemon(data_dir: Path) -> Daemon:
    cfg = DaemonConfig(simulator={"enabled": False}, data_dir=data_dir, api={"port": 0})
    daemon = Daemon(cfg, registry=make_registry())
    daemon.start()
    sig = soft_signal_rw(float, 1.5, name="sig", units="V")
    daemon.call(sig.connect())
    daemon.engine.devices["sig"] = sig
    return daemon


@pytest.fixture
def cell(tmp_path: Path) -> Iterator[Cell]:
    daemon = start_daemon(tmp_path / "data")
    try:
        api = next(s for s in daemon.services if isinstance(s, ApiService))
        admin = (tmp_path / "data" / "admin.token").read_text().strip()
        tokens = {"admin": admin}
        with httpx.Client(base_url=api.url + "/api/v1",
                          headers={"Authorization": f"Bearer {admin}"}) as c:
            for name, role in (("vera", "viewer"), ("tom", "technician"),
                               ("tina", "technician")):
                r = c.post("/tokens", json={"name": name, "role": role})
                assert r.status_code == 201, r.text
                tokens[name] = r.json()["token"]
        result = Cell(daemon, api.url, tokens)
        daemon.engine.RE.subscribe(lambda n, d: result.docs.append((n, d)))
        yield result
    finally:
        if not daemon.stopping.is_set():
            daemon.shutdown()
