"""Eurotherm 3216 / EPC3016 furnace controller simulator (Modbus RTU on a pty, Modbus TCP).

SKELETON: the config is fixed; the simulator class ``FurnaceSim`` is being written.
"""

from __future__ import annotations

from pydantic import Field

from .base import DeviceConfig, SerialEndpointConfig


class FurnaceConfig(DeviceConfig):
    #: Modbus RTU on a pseudo-terminal (RS-485 as the 3216 has it).
    serial: SerialEndpointConfig = Field(default_factory=SerialEndpointConfig)
    #: Modbus TCP (EPC3016 port 502 in the lab); 0 = a free port.
    tcp_port: int | None = Field(default=0, ge=0, le=65535)
    tcp_host: str = "127.0.0.1"
    unit_id: int = Field(default=1, ge=1, le=247)
    ambient_c: float = 25.0
    max_c: float = Field(default=1200.0, gt=0)
    #: Over-temperature alarm (alarm 1, status bit 0) threshold.
    overtemp_c: float = Field(default=1150.0, gt=0)
    #: First-order lag of the chamber, virtual seconds.
    time_constant_s: float = Field(default=120.0, gt=0)
    #: Heating power at 100 % output, °C per virtual second of rise at ambient.
    max_heating_c_s: float = Field(default=2.0, gt=0)
    #: Decimal places of the scaled-integer registers.
    decimals: int = Field(default=1, ge=0, le=3)
