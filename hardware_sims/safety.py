"""Cell safety sensors simulator on MQTT: glovebox O2/H2O ppm, door switch, e-stop.

SKELETON: the config is fixed; the simulator class ``SafetySim`` is being written.
"""

from __future__ import annotations

from pydantic import Field

from .base import DeviceConfig


class SafetyConfig(DeviceConfig):
    o2_ppm: float = Field(default=0.6, ge=0)
    h2o_ppm: float = Field(default=0.9, ge=0)
    door_open: bool = False
    estop: bool = False
    #: Wall-clock seconds between telemetry publications.
    period_s: float = Field(default=1.0, gt=0)
    keepalive_s: int = Field(default=10, ge=1)
