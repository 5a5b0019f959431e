"""The API service: uvicorn serving :func:`labd.api.app.create_app` on the daemon's own loop.

The loop already runs (in the RunEngine's thread), so uvicorn gets ``loop="none"`` and
``lifespan="off"`` and its ``serve()`` runs as a task there. The listening socket is bound here,
before the task starts: a port in use is an ``OSError`` from :meth:`ApiService.start` with the
address in the message (uvicorn itself would call ``sys.exit`` inside the loop's thread), and
port 0 picks a free port (:attr:`ApiService.port` says which). uvicorn does not touch signals
(it only does from the main thread) nor the logging configuration (``log_config=None``).

Other engineers' routes (``/metrics``, the dashboard) join the same app::

    ApiService(daemon, extra_routers=[metrics_router], configure=[mount_dashboard])
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import APIRouter, FastAPI

from drivers.aio import wait_for

from .app import Live, create_app
from .auth import bootstrap_admin
from .tokens import TokenStore

if TYPE_CHECKING:
    from ..app import Daemon

log = logging.getLogger("labd.api")


class ApiService:
    name = "api"

    def __init__(
        self,
        daemon: Daemon,
        *,
        extra_routers: Sequence[APIRouter] = (),
        configure: Iterable[Callable[[FastAPI], None]] = (),
    ) -> None:
        self.daemon = daemon
        self.host = daemon.config.api.host
        self.port = daemon.config.api.port
        self.extra_routers = list(extra_routers)
        self.configure = list(configure)
        self.app: FastAPI | None = None
        self.tokens: TokenStore | None = None
        self.admin_token_file: Path | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[Any] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._unsubscribe: int | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        daemon = self.daemon
        data_dir = daemon.config.data_dir
        self.tokens = await asyncio.to_thread(TokenStore, data_dir / "labd.sqlite")
        self.admin_token_file = await asyncio.to_thread(bootstrap_admin, self.tokens, data_dir)
        live = Live(daemon)
        from ..metrics import metrics_router  # Prometheus /metrics, unauthenticated

        routers = [metrics_router(daemon), *self.extra_routers]
        self.app = create_app(daemon, self.tokens, extra_routers=routers,
                              configure=self.configure, live=live)
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"the API cannot listen on {self.host}:{self.port}: "
                                     f"{exc.strerror}") from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, loop="none", lifespan="off", log_config=None,
                                access_log=False, timeout_graceful_shutdown=5,
                                ws_ping_interval=20, ws_ping_timeout=20)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="labd-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)
        self._unsubscribe = daemon.engine.RE.subscribe(live.progress)
        self._tasks = [asyncio.create_task(live.monitor.run(), name="labd-api-devices"),
                       asyncio.create_task(self._queue_watch(), name="labd-api-queue")]
        log.info("API listening on %s (OpenAPI document at %s/openapi.json)", self.url, self.url)

    async def _queue_watch(self) -> None:
        """The engine takes items off the queue without a queue event: publish the queue's new
        content when a run starts, so clients see it without asking."""
        daemon = self.daemon
        async with daemon.events.subscribe() as q:
            while True:
                event = await q.get()
                if event["type"] in ("engine_state", "queue_blocked", "item_refused") and (
                        event["type"] != "engine_state" or event.get("state") == "running"):
                    items = await asyncio.to_thread(daemon.store.queue)
                    daemon.events.publish("queue", items=[i.to_dict() for i in items],
                                          length=len(items),
                                          running=daemon.engine.queue_running)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self.daemon.engine.RE.unsubscribe(self._unsubscribe)
            self._unsubscribe = None
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await wait_for(asyncio.shield(self._task), 10)
            except TimeoutError:
                self._server.force_exit = True
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self.tokens is not None:
            await asyncio.to_thread(self.tokens.close)
        log.info("API stopped")
