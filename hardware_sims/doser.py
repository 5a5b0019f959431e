"""Mettler Toledo Quantos powder doser simulator (MT-SICS with QRA/QRD extensions, serial).

SKELETON: the config is fixed; the simulator class ``DoserSim`` is being written.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .base import DeviceConfig, SerialEndpointConfig


class DosingHeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    element: str
    #: Powder left in the head, grams.
    powder_g: float = Field(default=25.0, ge=0)
    #: Dosing rate, mg per virtual second.
    flow_mg_s: float = Field(default=5.0, gt=0)
    #: Relative standard deviation of the dosed mass around the target.
    tolerance: float = Field(default=0.01, ge=0, le=0.5)


class DoserConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    model: str = "QB1"
    serial_number: str = "Q1039527"
    #: Dosing heads by sampler position (1..30). Empty: one head per ground-truth element,
    #: in positions 1, 2, ...
    heads: dict[int, DosingHeadConfig] = Field(default_factory=dict)
    #: Head mounted at start (None: none).
    mounted: int | None = None
    #: World location whose crucible is under the dosing head.
    location: str = "doser"
