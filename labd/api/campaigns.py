"""``/api/v1/campaigns``: start, follow, pause, resume, stop and report closed-loop campaigns.

Reading needs a viewer token; changing a campaign needs a technician. Errors: 404 for an unknown
campaign, 409 for a request that does not fit its state (e.g. resume a running campaign), 422 for
a spec or run options that are not valid (the body names the fields; nothing is stored).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols.campaign import CampaignSpec

from .. import report
from ..campaigns import CampaignError, CampaignService, RunOptions
from .app import PREFIX, Technician, Viewer


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: dict[str, Any] = Field(description="the campaign spec (protocols.campaign.CampaignSpec)")
    run: dict[str, Any] = Field(default_factory=dict, description="labd.campaigns.RunOptions")


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
        try:
            spec = CampaignSpec.model_validate(body.spec)
        except ValidationError as exc:
            raise _invalid("spec", exc) from None
        try:
            options = RunOptions.model_validate(body.run)
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
