"""The simulated cell's configuration (``config/sim-cell.yaml``), validated by pydantic.

A bad file is refused with a message that names the key, the value and what was expected
(:func:`load_config` raises :class:`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .balance import BalanceConfig
from .base import MqttBrokerConfig
from .doser import DoserConfig
from .furnace import FurnaceConfig
from .gantry import GantryConfig
from .probe import ProbeConfig
from .safety import SafetyConfig
from .station import StationConfig
from .world import WorldConfig


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""


class DevicesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    doser: DoserConfig = Field(default_factory=DoserConfig)
    gantry: GantryConfig = Field(default_factory=GantryConfig)
    furnace: FurnaceConfig = Field(default_factory=FurnaceConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    station: StationConfig = Field(default_factory=StationConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)


class GroundTruthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: CSV of measured data (pool-based replay); None: the built-in synthetic landscape.
    file: Path | None = None
    goal: Literal["minimize", "maximize"] = "maximize"
    #: Elements of the synthetic landscape (a CSV brings its own).
    elements: list[str] = Field(
        default_factory=lambda: ["Fe", "Co", "Ni", "Cr", "Mn"], min_length=2
    )
    seed: int = 0


class ControlConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    #: JSON-lines control channel (faults, physical actions, state); 0 = a free port.
    port: int = Field(default=8479, ge=0, le=65535)


class SimCellConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cell: str = Field(default="sim-cell", pattern=r"^[A-Za-z0-9_.-]+$")
    #: Virtual seconds per wall-clock second.
    time_scale: float = Field(default=1.0, gt=0, le=100000)
    seed: int = 0
    #: Where ptys symlinks and state go; None: a fresh temporary directory, removed at exit.
    run_dir: Path | None = None
    mqtt: MqttBrokerConfig = Field(default_factory=MqttBrokerConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    ground_truth: GroundTruthConfig = Field(default_factory=GroundTruthConfig)
    world: WorldConfig = Field(default_factory=WorldConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)


def _describe_error(err: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key (value {shown})"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {err['msg']} (got {shown})"


def validate_config(data: Any, source: str = "config") -> SimCellConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return SimCellConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe_error(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: Path | str) -> SimCellConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    cfg = validate_config(data, str(path))
    gt = cfg.ground_truth
    if gt.file is not None and not gt.file.is_absolute():
        gt.file = (path.parent / gt.file).resolve()
    return cfg
