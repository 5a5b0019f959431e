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
  changes; ``POST /api/v1/interlocks/{name}/acknowledge`` (technician) releases a latched one
  (:meth:`labd.safety.SafetyService.acknowledge`: 409 while its condition holds or when it is not
  latched, 404 for an unknown name).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..api.auth import Principal, require
from ..api.tokens import Role

STATIC_DIR = Path(__file__).parent / "static"
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Technician = Annotated[Principal, Depends(require(Role.TECHNICIAN))]


def _safety(request: Request) -> Any:
    for service in getattr(request.app.state.daemon, "services", ()):
        if service.name == "safety" and callable(getattr(service, "status", None)):
            return service
    return None  # interlocks disabled, or a daemon without a safety service


def interlocks_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    @router.get("/interlocks", summary="The cell's interlocks and their state (viewer)")
    async def get_interlocks(request: Request, principal: Viewer) -> list[dict[str, Any]]:
        safety = _safety(request)
        return [] if safety is None else await asyncio.to_thread(safety.status)

    @router.post("/interlocks/{name}/acknowledge",
                 summary="Acknowledge a latched interlock once the cell is checked (technician)")
    async def acknowledge(name: str, request: Request, principal: Technician) -> dict[str, Any]:
        from ..safety import InterlockError

        safety = _safety(request)
        if safety is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "interlocks are disabled")
        try:
            return dict(await safety.acknowledge(name, principal.name, principal.source))
        except KeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc.args[0])) from None
        except InterlockError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None

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
