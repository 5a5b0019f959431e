"""The REST and WebSocket API (FastAPI), served by :class:`labd.api.server.ApiService`.

Everything is under ``/api/v1``; the OpenAPI document is at ``/openapi.json`` (and the docs page
at ``/docs``). Every route needs a bearer token (``Authorization: Bearer <token>``); the least
role each needs is in its summary. Errors are ``{"detail": "message"}``, and a refused parameter
is a 422 ``{"detail": {"message": ..., "errors": [{"field", "message", "input"[, "item"]}]}}``
naming the field (and, in a batch, the item's index). Nothing is queued unless everything in the
request is valid.

The WebSocket ``/api/v1/ws`` pushes every event of the daemon's :class:`~labd.events.EventBus`
(queue, engine and run state, run progress, devices, interlocks, controls). Browsers cannot set
headers on a WebSocket, so the token may come as ``?token=...``, or (keeping it out of URLs and
access logs) as the first message ``{"token": "..."}``; ``Authorization`` works too. The first
message from the server is a ``snapshot`` of the whole status (``seq`` is the last event it
includes: later events follow in order). A bad token gets an ``error`` message and close code
4401.

Other services add routes with ``create_app(daemon, tokens, extra_routers=[router])`` (e.g.
Prometheus ``/metrics``), or change the app with ``configure=[fn]`` (e.g. mount a static
dashboard); see :class:`~labd.api.server.ApiService`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, WebSocket, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.websockets import WebSocketDisconnect

from ..engine import Control, EngineError
from ..store import QueueItem, StoreError
from .auth import CLIENT_HEADER, Principal, bearer, client_source, forbidden, identify, require
from .live import DeviceMonitor, DeviceReader, ProgressTracker, jsonable
from .tokens import NAME_RE, Role, TokenError, TokenStore

if TYPE_CHECKING:
    from ..app import Daemon

from drivers.aio import wait_for
from protocols.registry import ProtocolError

log = logging.getLogger("labd.api")

PREFIX = "/api/v1"
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Technician = Annotated[Principal, Depends(require(Role.TECHNICIAN))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


# -- request models -----------------------------------------------------------------------------
class ItemSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    protocol: str = Field(description="a registered protocol's name")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="parameters, validated against the protocol")


class QueueAdd(ItemSpec):
    index: int | None = Field(None, ge=0, description="position (0: first); none: the end")


class QueueBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemSpec] = Field(min_length=1, max_length=1000)
    index: int | None = Field(None, ge=0, description="position of the first item; none: end")


class QueueMove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, description="new position (0: first)")


class ControlBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500, description="recorded in the history")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_RE.pattern, description="user name, recorded as a run's user")
    role: Role


# -- errors -------------------------------------------------------------------------------------
def invalid(message: str, errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                         {"message": message, "errors": jsonable(errors)})


def conflict(message: str) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, message)


def not_found(message: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, message)


async def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:]
        errors.append({"field": ".".join(loc) or "(body)", "message": err.get("msg", ""),
                       "input": err.get("input")})
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return JSONResponse({"detail": {"message": f"invalid request: {message}",
                                    "errors": jsonable(errors)}},
                        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


# -- the app ------------------------------------------------------------------------------------
class Live:
    """The app's live-state helpers (see :mod:`labd.api.live`)."""

    def __init__(self, daemon: Daemon, device_timeout_s: float = 2.0,
                 device_interval_s: float = 2.0) -> None:
        def devices() -> dict[str, Any]:
            cell = daemon.cell
            return {**(cell.devices if cell else {}), **daemon.engine.devices}

        def down() -> dict[str, str]:
            return dict(daemon.cell.down) if daemon.cell else {}

        def item_uid() -> str | None:
            current = daemon.engine.current
            return current.entry.item_uid if current else None

        self.reader = DeviceReader(devices, down, device_timeout_s)
        self.progress = ProgressTracker(daemon.events, item_uid)
        self.monitor = DeviceMonitor(self.reader, daemon.events, device_interval_s)


def create_app(
    daemon: Daemon,
    tokens: TokenStore,
    *,
    extra_routers: Sequence[APIRouter] = (),
    configure: Iterable[Callable[[FastAPI], None]] = (),
    live: Live | None = None,
) -> FastAPI:
    """The API app for ``daemon``. ``extra_routers`` are included as they are (their own paths);
    ``configure`` functions get the app last (mounts, middleware)."""
    app = FastAPI(
        title="labd",
        version="1",
        summary="The alloy-screening cell daemon: queue, run control, devices, history.",
    )
    live = live or Live(daemon)
    app.state.daemon = daemon
    app.state.tokens = tokens
    app.state.live = live
    app.add_exception_handler(RequestValidationError, _request_validation_error)

    engine, store, bus = daemon.engine, daemon.store, daemon.events
    api = APIRouter(prefix=PREFIX)

    async def full_status() -> dict[str, Any]:
        st, devices = await asyncio.gather(asyncio.to_thread(daemon.status),
                                           live.reader.read_all())
        st["devices"] = devices
        current = st.get("current")
        progress = live.progress.progress()
        if current and progress and progress.get("item_uid") == current["item_uid"]:
            current["progress"] = {**current["progress"], **progress}
        return jsonable(st)

    async def queue_snapshot() -> dict[str, Any]:
        items = await asyncio.to_thread(store.queue)
        return {"items": [i.to_dict() for i in items], "length": len(items),
                "running": engine.queue_running}

    async def queue_changed() -> None:
        await asyncio.to_thread(engine.notify_queue_changed)
        bus.publish("queue", **await queue_snapshot())

    def validated(spec: ItemSpec, item: int | None = None) -> dict[str, Any]:
        where = "" if item is None else f"item {item}: "
        extra = {} if item is None else {"item": item}
        try:
            return engine.validate(spec.protocol, spec.params)
        except ProtocolError as exc:
            errors = exc.errors or [{"field": "protocol", "message": str(exc),
                                     "input": spec.protocol}]
            raise invalid(where + str(exc), [{**e, **extra} for e in errors]) from None

    async def owned(principal: Principal, item_uid: str) -> QueueItem:
        try:
            item = await asyncio.to_thread(store.get, item_uid)
        except StoreError as exc:
            raise not_found(str(exc)) from None
        if item.user != principal.name and not principal.role.allows(Role.ADMIN):
            raise forbidden(principal, Role.ADMIN, f"editing {item.user}'s queue item")
        return item

    # -- reading ---------------------------------------------------------------------------------
    @api.get("/status", summary="Cell, engine, current run with progress, devices (viewer)")
    async def get_status(principal: Viewer) -> dict[str, Any]:
        return await full_status()

    @api.get("/whoami", summary="The caller's user name and role (viewer)")
    async def whoami(principal: Viewer) -> dict[str, str]:
        return principal.to_dict()

    @api.get("/devices", summary="Devices: connection state and live values (viewer)")
    async def get_devices(principal: Viewer) -> dict[str, Any]:
        return await live.reader.read_all()

    @api.get("/protocols", summary="Registered protocols with parameter JSON schemas (viewer)")
    async def get_protocols(principal: Viewer) -> list[dict[str, Any]]:
        return [p.describe() for p in sorted(daemon.registry, key=lambda p: p.name)]

    @api.get("/protocols/{name}", summary="One protocol (viewer)")
    async def get_protocol(name: str, principal: Viewer) -> dict[str, Any]:
        try:
            return daemon.registry.get(name).describe()
        except ProtocolError as exc:
            raise not_found(str(exc)) from None

    @api.get("/queue", summary="Queued items in order, and whether the queue runs (viewer)")
    async def get_queue(principal: Viewer) -> dict[str, Any]:
        return await queue_snapshot()

    @api.get("/history", summary="Finished and running items, newest first (viewer)")
    async def get_history(
        principal: Viewer,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        entries = await asyncio.to_thread(store.history, limit, offset)
        return [e.to_dict() for e in entries]

    @api.get("/history/{item_uid}", summary="One history entry (viewer)")
    async def get_history_entry(item_uid: str, principal: Viewer) -> dict[str, Any]:
        try:
            return (await asyncio.to_thread(store.history_entry, item_uid)).to_dict()
        except StoreError as exc:
            raise not_found(str(exc)) from None

    # -- queue editing ---------------------------------------------------------------------------
    @api.post("/queue", status_code=201, summary="Add one item (technician)")
    async def queue_add(body: QueueAdd, principal: Technician) -> dict[str, Any]:
        params = validated(body)
        item = QueueItem(body.protocol, params, principal.name, principal.source)
        try:
            await asyncio.to_thread(store.add, item, body.index)
        except StoreError as exc:
            raise invalid(str(exc), [{"field": "index", "message": str(exc),
                                      "input": body.index}]) from None
        await queue_changed()
        return item.to_dict()

    @api.post("/queue/batch", status_code=201, summary="Add items, all or none (technician)")
    async def queue_add_batch(body: QueueBatch, principal: Technician) -> list[dict[str, Any]]:
        items, errors, messages = [], [], []
        for n, spec in enumerate(body.items):
            try:
                items.append(QueueItem(spec.protocol, validated(spec, n), principal.name,
                                       principal.source))
            except HTTPException as exc:
                errors.extend(exc.detail["errors"])
                messages.append(exc.detail["message"])
        if errors:
            raise invalid("; ".join(messages), errors)
        await asyncio.to_thread(store.add_batch, items, body.index)
        await queue_changed()
        return [i.to_dict() for i in items]

    @api.post("/queue/{item_uid}/move", summary="Move an item (technician: own items; admin)")
    async def queue_move(item_uid: str, body: QueueMove, principal: Technician) -> dict[str, Any]:
        await owned(principal, item_uid)
        try:
            await asyncio.to_thread(store.move, item_uid, body.index)
        except StoreError as exc:
            raise not_found(str(exc)) from None
        await queue_changed()
        return await queue_snapshot()

    @api.delete("/queue/{item_uid}", summary="Remove an item (technician: own items; admin)")
    async def queue_remove(item_uid: str, principal: Technician) -> dict[str, Any]:
        await owned(principal, item_uid)
        try:
            item = await asyncio.to_thread(store.remove, item_uid)
        except StoreError as exc:
            raise not_found(str(exc)) from None
        await queue_changed()
        return item.to_dict()

    @api.delete("/queue", summary="Remove every queued item (admin)")
    async def queue_clear(principal: Admin) -> dict[str, int]:
        removed = await asyncio.to_thread(store.clear)
        await queue_changed()
        return {"removed": removed}

    @api.post("/queue/start", summary="Start taking items from the queue (technician)")
    async def queue_start(principal: Technician) -> dict[str, Any]:
        await asyncio.to_thread(engine.start_queue)
        bus.publish("control", command="queue_start", user=principal.name,
                    source=principal.source)
        return await queue_snapshot()

    @api.post("/queue/stop", summary="Stop taking items; the current one finishes (technician)")
    async def queue_stop(principal: Technician) -> dict[str, Any]:
        await asyncio.to_thread(engine.stop_queue)
        bus.publish("control", command="queue_stop", user=principal.name,
                    source=principal.source)
        return await queue_snapshot()

    # -- running ---------------------------------------------------------------------------------
    @api.post("/run", status_code=202, summary="Run one protocol now, outside the queue "
                                                "(technician)")
    async def run_now(body: ItemSpec, principal: Technician) -> dict[str, Any]:
        item = QueueItem(body.protocol, validated(body), principal.name, principal.source)
        try:
            await asyncio.to_thread(engine.run_now, item)
        except EngineError as exc:
            raise conflict(str(exc)) from None
        return item.to_dict()

    async def control(principal: Principal, command: str, call: Callable[[], None],
                      reason: str) -> dict[str, Any]:
        try:
            await asyncio.to_thread(call)
        except EngineError as exc:
            raise conflict(str(exc)) from None
        bus.publish("control", command=command, user=principal.name, source=principal.source,
                    reason=reason)
        return {"command": command, "engine": str(engine.state), "reason": reason}

    def why(principal: Principal, command: str, body: ControlBody | None) -> str:
        if body is not None and body.reason:
            return body.reason
        return f"{command} by {principal.name} ({principal.source})"

    @api.post("/run/pause", summary="Pause: at the next checkpoint (defer=true, default) or now "
                                    "(technician)")
    async def run_pause(principal: Technician, defer: bool = True) -> dict[str, Any]:
        return await control(principal, "pause" if defer else "pause_now",
                             lambda: engine.pause(defer), "")

    for command in Control:
        def make(command: Control) -> Callable[..., Any]:
            async def route(principal: Technician,
                            body: ControlBody | None = None) -> dict[str, Any]:
                reason = why(principal, str(command), body)
                return await control(principal, str(command),
                                     lambda: engine.control(command, reason), reason)
            route.__name__ = f"run_{command}"
            return route

        api.add_api_route(f"/run/{command}", make(command), methods=["POST"],
                          summary=f"{str(command).capitalize()} the current run (technician)")

    # -- administration --------------------------------------------------------------------------
    @api.get("/config", summary="The daemon's configuration (admin)")
    async def get_config(principal: Admin) -> dict[str, Any]:
        return daemon.config.model_dump(mode="json")

    @api.get("/tokens", summary="API tokens, without secrets (admin)")
    async def tokens_list(principal: Admin, include_revoked: bool = False) -> list[dict[str, Any]]:
        return [t.to_dict() for t in await asyncio.to_thread(tokens.list, include_revoked)]

    @api.post("/tokens", status_code=201, summary="Create a token; the secret is shown once "
                                                  "(admin)")
    async def tokens_create(body: TokenCreate, principal: Admin) -> dict[str, Any]:
        try:
            token, info = await asyncio.to_thread(tokens.create, body.name, body.role,
                                                  principal.name)
        except TokenError as exc:
            raise conflict(str(exc)) from None
        log.info("token %s created for %s (%s) by %s", info.token_id, info.name, info.role,
                 principal.name)
        return {"token": token, **info.to_dict()}

    @api.delete("/tokens/{name_or_id}", summary="Revoke a token by id or user name (admin)")
    async def tokens_revoke(name_or_id: str, principal: Admin) -> dict[str, Any]:
        def revoke() -> dict[str, Any]:
            active = tokens.list()
            target = next((t for t in active if name_or_id in (t.token_id, t.name)), None)
            if target is None:
                raise not_found(f"no active token with id or name {name_or_id!r}")
            admins = [t for t in active if t.role is Role.ADMIN]
            if target.role is Role.ADMIN and len(admins) == 1:
                raise conflict("refusing to revoke the last admin token (create another first)")
            return tokens.revoke(target.token_id).to_dict()

        info = await asyncio.to_thread(revoke)
        log.info("token %s of %s revoked by %s", info["token_id"], info["name"], principal.name)
        return info

    # -- the WebSocket ---------------------------------------------------------------------------
    @app.websocket(PREFIX + "/ws")
    async def websocket(ws: WebSocket, token: str | None = None) -> None:
        await ws.accept()
        token = token or bearer(ws.headers.get("authorization"))
        if token is None:
            try:
                first = await wait_for(ws.receive_json(), 10.0)
                token = first.get("token") if isinstance(first, dict) else None
            except (TimeoutError, ValueError, WebSocketDisconnect):
                token = None
        source = client_source(ws.headers.get(CLIENT_HEADER) or ws.query_params.get("client"),
                               ws.client.host if ws.client else None)
        principal = await identify(tokens, token, source) if token else None
        if principal is None:
            with contextlib.suppress(Exception):
                await ws.send_json({"type": "error", "status": 401,
                                    "detail": "missing, invalid or revoked token"})
                await ws.close(4401)
            return
        async with bus.subscribe() as q:
            with live.monitor.watching():
                seq = bus.recent[-1]["seq"] if bus.recent else 0
                await ws.send_json({"type": "snapshot", "seq": seq, "user": principal.name,
                                    "role": str(principal.role), "status": await full_status(),
                                    "queue": await queue_snapshot()})

                async def receive() -> None:
                    while True:
                        msg = await ws.receive_json()
                        if isinstance(msg, dict) and msg.get("type") == "ping":
                            await ws.send_json({"type": "pong", "time": msg.get("time")})

                async def send() -> None:
                    while True:
                        event = await q.get()
                        if event["type"] != "dropped" and event["seq"] <= seq:
                            continue  # already in the snapshot
                        await ws.send_json(jsonable(event))

                tasks = [asyncio.create_task(receive()), asyncio.create_task(send())]
                try:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

    app.include_router(api)
    for router in extra_routers:
        app.include_router(router)
    for fn in configure:
        fn(app)
    return app
