"""Mettler Toledo XS/XPR balance simulator (MT-SICS over serial).

SKELETON: the config is fixed; the simulator class ``BalanceSim`` is being written.
"""

from __future__ import annotations

from pydantic import Field

from .base import DeviceConfig, SerialEndpointConfig


class BalanceConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    model: str = "XS205DU"
    serial_number: str = "B943621745"
    capacity_g: float = Field(default=220.0, gt=0)
    #: Display resolution (d), grams.
    readability_g: float = Field(default=0.0001, gt=0)
    #: Standard deviation of the reading noise once settled, grams.
    noise_g: float = Field(default=0.00005, ge=0)
    #: Virtual seconds the reading takes to settle after the load changes.
    settle_s: float = Field(default=2.0, ge=0)
    #: World location whose crucible sits on the pan.
    location: str = "balance"
