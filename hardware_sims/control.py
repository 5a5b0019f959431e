"""The simulated cell's control channel: JSON lines over TCP.

This is how a test bench injects faults and acts on the physical world while drivers talk to the
instruments over their own wire protocols. One JSON object per line in, one per line out; an ``id``
in a request is echoed in its reply. Every reply has ``"ok": true`` or ``"ok": false`` with an
``"error"`` that says what was wrong.

Requests (``op``):

``ping``                                  -> ``{"ok": true, "cell": ..., "virtual_time_s": ...}``
``endpoints``                             -> where every device listens (as ``--endpoints``)
``state`` ``[device]``                    -> one device's physical state, or all and the world
``world``                                 -> crucibles, their contents, locations, heat history
``refill_rack`` ``[slots]``                -> the operator replaces used crucibles in rack slots
                                             (all by default) with empty ones
``clear_cell``                            -> the operator takes every crucible that is not in
                                             a rack slot out of the cell (after an interruption)
``fault`` ``device`` ``fault``            -> inject ``fault`` (see :mod:`hardware_sims.faults`)
``clear`` ``device`` ``[kind]``           -> end one kind of fault, or all of that device's
``faults`` ``[device]``                   -> the active faults
``action`` ``device`` ``action`` ``args`` -> a physical action, e.g. open the glovebox door
``time_scale`` ``value``                  -> change the virtual clock's scale

Example (``nc 127.0.0.1 8479``)::

    {"op": "fault", "device": "furnace", "fault": {"kind": "no_reply", "count": 2}}
    {"ok": true, "faults": [{"kind": "no_reply", "count": 2, ...}]}
    {"op": "action", "device": "safety", "action": "open_door", "args": {}}
    {"ok": true, "result": {...}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .faults import Fault, FaultKind

if TYPE_CHECKING:
    from .cell import SimCell

log = logging.getLogger(__name__)


class ControlError(ValueError):
    pass


class ControlServer:
    def __init__(self, cell: SimCell, host: str, port: int) -> None:
        self.cell = cell
        self.host = host
        self._port = port
        self.port: int | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                reply = await self.handle_line(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"not JSON: {exc.msg} at column {exc.colno}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request must be a JSON object"}
        reply = await self.handle(request)
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            result = await self._dispatch(op, request)
        except (ControlError, KeyError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return {"ok": False, "error": str(message)}
        return {"ok": True, **result}

    async def _dispatch(self, op: object, req: dict[str, Any]) -> dict[str, Any]:
        cell = self.cell
        if op == "ping":
            return {"cell": cell.config.cell, "virtual_time_s": cell.clock.now()}
        if op == "endpoints":
            return {"endpoints": cell.endpoints()}
        if op == "state":
            device = req.get("device")
            return {"state": cell.state(device if isinstance(device, str) else None)}
        if op == "world":
            return {"world": cell.world.state()}
        if op == "refill_rack":
            slots = req.get("slots")
            if slots is not None and (not isinstance(slots, list)
                                      or not all(isinstance(x, str) for x in slots)):
                raise ControlError("slots must be a list of rack slot names")
            result = cell.world.refill_rack(slots)
            log.info("rack refilled: %s", result)
            return result
        if op == "clear_cell":
            result = cell.world.clear_cell()
            log.info("cell cleared by the operator: %s", result)
            return result
        if op == "faults":
            names = [req["device"]] if req.get("device") else list(cell.devices)
            return {"faults": {n: cell.device(n).faults.state() for n in names}}
        if op == "fault":
            name = _need_str(req, "device")
            try:
                fault = Fault.model_validate(req.get("fault"))
            except ValidationError as exc:
                raise ControlError(_fault_error(exc)) from None
            await cell.set_fault(name, fault)
            log.info("fault set on %s: %s", name, fault.model_dump(mode="json"))
            return {"faults": cell.device(name).faults.state()}
        if op == "clear":
            name = _need_str(req, "device")
            kind_raw = req.get("kind")
            try:
                kind = FaultKind(kind_raw) if kind_raw is not None else None
            except ValueError:
                kinds = ", ".join(k.value for k in FaultKind)
                raise ControlError(f"unknown fault kind {kind_raw!r}; kinds: {kinds}") from None
            await cell.clear_fault(name, kind)
            return {"faults": cell.device(name).faults.state()}
        if op == "action":
            name = _need_str(req, "device")
            action = _need_str(req, "action")
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise ControlError("args must be a JSON object")
            return {"result": await cell.device(name).control(action, args)}
        if op == "time_scale":
            value = req.get("value")
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ControlError("time_scale needs a numeric 'value'")
            cell.clock.set_time_scale(float(value))
            return {"time_scale": cell.clock.time_scale}
        ops = ("ping, endpoints, state, world, refill_rack, clear_cell, faults, fault, clear, "
               "action, time_scale")
        raise ControlError(f"unknown op {op!r}; ops: {ops}")


def _need_str(req: dict[str, Any], key: str) -> str:
    value = req.get(key)
    if not isinstance(value, str) or not value:
        raise ControlError(f"'{key}' is required (a string)")
    return value


def _fault_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "fault"
        parts.append(f"fault.{where}: {err['msg']}" if where != "fault" else err["msg"])
    return "invalid fault: " + "; ".join(parts)


class ControlClient:
    """A small synchronous client for the control channel (used by ``labd-simctl`` and tests)."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port, self.timeout = host or "127.0.0.1", int(port), timeout

    def request(self, **request: Any) -> dict[str, Any]:
        import socket

        with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("control channel closed before replying")
                buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        return reply

    def call(self, **request: Any) -> dict[str, Any]:
        """Like :meth:`request`, but raises :class:`ControlError` on ``ok: false``."""
        reply = self.request(**request)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"))
        return reply
