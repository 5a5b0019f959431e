"""Protocols: Bluesky plans registered with typed, validated parameters.

A protocol is what a technician or a campaign asks the cell to do: "home the gantry", "make this
sample". Each declares its parameters as a pydantic model (types, units, ranges, defaults), so a
bad value is refused with a message naming the field *before anything is queued or moves*, and so
the API and the web page can generate a form from the JSON schema.

Only registered protocols can be run. The daemon builds a plan by calling the protocol's factory
with the cell's devices and the validated parameters::

    @protocol("home_gantry", HomeParams, title="Home the gantry", needs=("gantry",))
    def home_gantry(devices: Devices, params: HomeParams) -> Plan:
        yield from ...
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bluesky.utils import Msg
from pydantic import BaseModel, ValidationError

Plan = Generator[Msg, Any, Any]
Devices = Mapping[str, Any]
PlanFactory = Callable[[Devices, Any], Plan]


class ProtocolError(ValueError):
    """A protocol that does not exist, or parameters it refuses; ``errors`` per field."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


@dataclass(frozen=True)
class Protocol:
    name: str
    params: type[BaseModel]
    factory: PlanFactory
    title: str
    description: str = ""
    #: Devices the plan uses; the daemon refuses to start it while one of them is down.
    needs: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)

    def validate(self, raw: Mapping[str, Any] | None) -> BaseModel:
        try:
            return self.params.model_validate(dict(raw or {}))
        except ValidationError as exc:
            errors = [
                {
                    "field": ".".join(str(p) for p in e["loc"]) or "(parameters)",
                    "message": e["msg"],
                    "input": e.get("input"),
                }
                for e in exc.errors()
            ]
            lines = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            raise ProtocolError(f"{self.name}: invalid parameters: {lines}", errors) from None

    def plan(self, devices: Devices, params: BaseModel) -> Plan:
        return self.factory(devices, params)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "needs": list(self.needs),
            "tags": list(self.tags),
            "parameters": self.params.model_json_schema(),
        }


class Registry:
    def __init__(self) -> None:
        self._protocols: dict[str, Protocol] = {}

    def register(self, proto: Protocol) -> Protocol:
        if proto.name in self._protocols:
            raise ValueError(f"protocol {proto.name!r} is registered twice")
        self._protocols[proto.name] = proto
        return proto

    def get(self, name: str) -> Protocol:
        try:
            return self._protocols[name]
        except KeyError:
            known = ", ".join(sorted(self._protocols)) or "none"
            raise ProtocolError(f"no protocol {name!r} (registered: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._protocols)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._protocols.values())

    def __contains__(self, name: object) -> bool:
        return name in self._protocols


#: The registry the daemon uses; protocol modules register into it when imported.
REGISTRY = Registry()


def protocol(
    name: str,
    params: type[BaseModel],
    *,
    title: str,
    description: str = "",
    needs: tuple[str, ...] = (),
    tags: tuple[str, ...] = (),
    registry: Registry = REGISTRY,
) -> Callable[[PlanFactory], PlanFactory]:
    """Register a plan factory as protocol ``name`` with parameters ``params``."""

    def deco(factory: PlanFactory) -> PlanFactory:
        doc = description or (factory.__doc__ or "").strip()
        registry.register(Protocol(name, params, factory, title, doc, needs, tags))
        return factory

    return deco
