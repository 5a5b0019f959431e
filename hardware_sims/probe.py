"""Keithley 2400 source-meter simulator (SCPI over serial), as a 4-point resistivity probe.

SKELETON: the config is fixed; the simulator class ``ProbeSim`` is being written.
"""

from __future__ import annotations

from pydantic import Field

from .base import DeviceConfig, SerialEndpointConfig


class ProbeConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    serial_number: str = "1278437"
    firmware: str = "C30   Mar 17 2006 09:29:29/A02  /K/J"
    #: World location whose crucible the probe touches.
    location: str = "station"
    #: Relative noise of a resistance reading.
    noise: float = Field(default=0.002, ge=0)
