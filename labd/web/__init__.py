"""The technicians' web dashboard, served by the daemon itself (no Node.js, no build step).

The page is plain HTML, CSS and one ES module (``static/``): it signs in with an API token (kept
in ``sessionStorage``), takes everything live from the WebSocket ``/api/v1/ws`` (a ``snapshot``
first, then the event bus) and calls the REST API with ``X-Labd-Client: web``, so runs started
from it record ``source`` = ``web@<address>``.

:func:`configure` is given to :class:`~labd.api.server.ApiService` (``configure=[configure]``):

* ``GET /`` is the dashboard (``index.html``), and ``/static/...`` its files (no token: they hold
  no data; every datum comes from the API with the user's token);
* ``GET /api/v1/interlocks`` (viewer) is the state of the cell's interlocks (from the safety
  service), which the page needs on load and after a reconnect: the WebSocket only pushes their
  changes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..api.auth import Principal, require
from ..api.tokens import Role

STATIC_DIR = Path(__file__).parent / "static"
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]


def interlocks_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    @router.get("/interlocks", summary="The cell's interlocks and their state (viewer)")
    async def get_interlocks(request: Request, principal: Viewer) -> list[dict[str, Any]]:
        daemon = request.app.state.daemon
        for service in getattr(daemon, "services", ()):
            if service.name == "safety" and callable(getattr(service, "status", None)):
                return await asyncio.to_thread(service.status)
        return []  # interlocks disabled, or a daemon without a safety service

    return router


def configure(app: FastAPI) -> None:
    """Mount the dashboard on ``app`` (see the module docstring)."""
    if not any(getattr(r, "path", None) == "/api/v1/interlocks" for r in app.routes):
        app.include_router(interlocks_router())
    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        # no-cache: the page must follow the daemon's version after an upgrade and restart
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
