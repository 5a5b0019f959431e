"""``/api/v1/campaigns``: start, follow, pause, resume, stop and report closed-loop campaigns.

Reading needs a viewer token; changing a campaign needs a technician. Errors: 404 for an unknown
campaign, 409 for a request that does not fit its state (e.g. resume a running campaign), 422 for
a spec or run options that are not valid (the body names the fields; nothing is stored).

``POST /api/v1/campaigns`` takes the spec as an object (``spec``, with ``run``) or as the text of
a campaign file (``spec_yaml``: YAML or JSON, with its optional ``run:`` section, as ``labctl
campaign start`` reads it): the dashboard sends what the technician pasted, and the daemon parses
it. A pasted spec has no folder, so its ``pool`` must be an absolute path on the daemon's machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols.campaign import CampaignSpec

from .. import report
from ..campaigns import CampaignError, CampaignService, RunOptions
from .app import PREFIX, Technician, Viewer


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any] | None = Field(
        None, description="the campaign spec (protocols.campaign.CampaignSpec)")
    spec_yaml: str | None = Field(
        None, max_length=1_000_000,
        description="or: a campaign file's text (YAML or JSON), with an optional run: section")
    run: dict[str, Any] | None = Field(None, description="labd.campaigns.RunOptions")


def _refuse(field: str, message: str) -> HTTPException:
    return HTTPException(422, {"message": f"invalid {field.split('.')[0]}: {message}",
                               "errors": [{"field": field, "message": message, "input": None}]})


def _spec_and_run(body: StartRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec and run options of a start request (see the module docstring)."""
    if (body.spec is None) == (body.spec_yaml is None):
        raise _refuse("spec", "give exactly one of spec (an object) or spec_yaml (text)")
    if body.spec is not None:
        return body.spec, body.run or {}
    assert body.spec_yaml is not None
    try:
        data = yaml.safe_load(body.spec_yaml)  # JSON is YAML too
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise _refuse("spec_yaml", f"not valid YAML or JSON: {where}{problem}") from None
    if not isinstance(data, dict):
        raise _refuse("spec_yaml", "expected a mapping (the campaign spec), got "
                      f"{type(data).__name__}")
    run = data.pop("run", None)
    if run is not None and body.run is not None:
        raise _refuse("run", "given both in the text's run: section and as run: give one")
    run = body.run if body.run is not None else run or {}
    if not isinstance(run, dict):
        raise _refuse("run", f"expected a mapping, got {type(run).__name__}")
    pool = data.get("pool")
    if isinstance(pool, str) and not Path(pool).is_absolute():
        raise _refuse("spec.pool", f"{pool!r} is relative, and a pasted spec has no folder to "
                      "take it from: give the absolute path on the daemon's machine")
    return data, run


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refilled: bool = Field(False, description="the used crucibles were replaced by empty ones")


def _fail(exc: CampaignError) -> HTTPException:
    return HTTPException(exc.code, str(exc))


def _invalid(where: str, exc: ValidationError) -> HTTPException:
    errors = [{"field": ".".join(str(p) for p in e["loc"]) or where, "message": e["msg"],
               "input": e.get("input") if isinstance(e.get("input"), str | int | float | None)
               else None} for e in exc.errors()]
    return HTTPException(422, {"message": f"invalid {where}", "errors": errors})


def campaigns_router(service: CampaignService) -> APIRouter:
    router = APIRouter(prefix=f"{PREFIX}/campaigns", tags=["campaigns"])

    @router.post("", status_code=201)
    async def start(body: StartRequest, who: Technician) -> dict[str, Any]:
        raw_spec, raw_run = _spec_and_run(body)
        try:
            spec = CampaignSpec.model_validate(raw_spec)
        except ValidationError as exc:
            raise _invalid("spec", exc) from None
        try:
            options = RunOptions.model_validate(raw_run)
        except ValidationError as exc:
            raise _invalid("run", exc) from None
        try:
            return await service.create(spec, options, who.name)
        except CampaignError as exc:
            raise _fail(exc) from None

    @router.get("")
    async def list_campaigns(_: Viewer) -> list[dict[str, Any]]:
        return service.list()

    @router.get("/{cid}")
    async def get(cid: str, _: Viewer) -> dict[str, Any]:
        try:
            return service.describe(cid)
        except CampaignError as exc:
            raise _fail(exc) from None

    @router.post("/{cid}/pause")
    async def pause(cid: str, _: Technician) -> dict[str, Any]:
        try:
            return await service.pause(cid)
        except CampaignError as exc:
            raise _fail(exc) from None

    @router.post("/{cid}/resume")
    async def resume(cid: str, _: Technician,
                     body: ResumeRequest | None = None) -> dict[str, Any]:
        try:
            return await service.resume(cid, refilled=bool(body and body.refilled))
        except CampaignError as exc:
            raise _fail(exc) from None

    @router.post("/{cid}/stop")
    async def stop(cid: str, _: Technician) -> dict[str, Any]:
        try:
            return await service.stop_campaign(cid)
        except CampaignError as exc:
            raise _fail(exc) from None

    def state_of(cid: str) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            return service.observations(cid), service.describe(cid)
        except CampaignError as exc:
            raise _fail(exc) from None

    @router.get("/{cid}/report")
    async def get_report(cid: str, _: Viewer) -> dict[str, Any]:
        state, status = state_of(cid)
        return report.report(state, status)

    @router.get("/{cid}/report.png", response_class=Response)
    async def get_png(cid: str, _: Viewer) -> Response:
        state, _status = state_of(cid)
        png = await asyncio.to_thread(report.plot_png, state)
        return Response(png, media_type="image/png")

    @router.get("/{cid}/samples.csv", response_class=Response)
    async def get_csv(cid: str, _: Viewer) -> Response:
        state, _status = state_of(cid)
        return Response(report.samples_csv(state), media_type="text/csv")

    return router
