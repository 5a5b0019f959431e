"""Characterisation station simulator (XRF composition and the screened property) on MQTT.

SKELETON: the config is fixed; the simulator class ``StationSim`` is being written.
"""

from __future__ import annotations

from pydantic import Field

from .base import DeviceConfig


class StationConfig(DeviceConfig):
    #: World location whose crucible the station measures.
    location: str = "station"
    #: Standard deviation of XRF atomic fractions (absolute).
    xrf_sigma: float = Field(default=0.003, ge=0)
    #: Relative noise of the property measurement.
    property_noise: float = Field(default=0.0, ge=0)
    #: Virtual seconds one measurement takes.
    measure_s: float = Field(default=180.0, ge=0)
    keepalive_s: int = Field(default=10, ge=1)
