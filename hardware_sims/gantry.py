"""XYZ gantry simulator: GRBL 1.1 over serial, with a gripper on the coolant outputs.

SKELETON: the config is fixed; the simulator class ``GantrySim`` is being written.
"""

from __future__ import annotations

from pydantic import Field

from .base import DeviceConfig, SerialEndpointConfig


class GantryConfig(DeviceConfig):
    serial: SerialEndpointConfig = Field(
        default_factory=lambda: SerialEndpointConfig(baudrate=115200)
    )
    #: Travel (mm) from the home position, per axis: X 0..x, Y 0..y, Z -z..0 (Z homes up).
    travel_mm: tuple[float, float, float] = (450.0, 300.0, 100.0)
    #: $110-$112, mm/min.
    max_rate_mm_min: tuple[float, float, float] = (6000.0, 6000.0, 1500.0)
    #: $120-$122, mm/s^2.
    acceleration_mm_s2: tuple[float, float, float] = (500.0, 500.0, 200.0)
    #: $22: homing cycle enabled (start-up requires $H or $X, as on the real machine).
    homing_required: bool = True
    #: $20: soft limits.
    soft_limits: bool = True
