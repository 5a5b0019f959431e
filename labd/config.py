"""The daemon's configuration (``labd --config FILE``), validated by pydantic.

Every key is optional: the embedded defaults run the simulated cell (``labd-sim`` started by the
daemon, instruments found from its endpoints). A real cell sets ``simulator.enabled: false`` and
lists its ``instruments`` (addresses) and ``layout`` (where things are). A bad file is refused with
a message naming the key, the value and what was expected, and the daemon does not start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.cell import InstrumentsConfig

from .safety import InterlocksConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


class SimulatorConfig(BaseModel):
    """The simulated cell the daemon starts (a ``labd-sim`` process of its own)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: The simulated cell's YAML (``labd-sim --config``); None: labd-sim's embedded defaults.
    config: Path | None = None
    #: Virtual seconds per wall-clock second: 60 turns an hour of furnace time into a minute, so
    #: a sample made from the dashboard is done in minutes; 1 runs at the hardware's own pace.
    time_scale: float | None = Field(default=60.0, gt=0)
    ground_truth: Path | None = None
    goal: Literal["minimize", "maximize"] | None = None
    #: The broker the simulated MQTT instruments use, ``HOST:PORT`` (None: as in their config).
    mqtt: str | None = None
    start_timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _goal(self) -> SimulatorConfig:
        if self.ground_truth is not None and self.goal is None:
            raise ValueError("simulator.ground_truth needs simulator.goal (minimize|maximize)")
        return self


class ApiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8470, ge=0, le=65535)


class QueueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Start the queue at start-up if it was running when the daemon stopped (or was killed).
    autostart: bool = False


class JournalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: SQLite ``synchronous``: FULL (a committed batch survives a power cut) or NORMAL.
    synchronous: Literal["FULL", "NORMAL"] = "FULL"


class _Secret(BaseModel):
    """A password from a file (first line) or an environment variable; never in the YAML, never
    logged, never shown by ``GET /config`` (only where it comes from)."""

    model_config = ConfigDict(extra="forbid")

    password_file: Path | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> _Secret:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        return self

    def password(self) -> str | None:
        """The secret, read now; :class:`ConfigError` names the source that failed."""
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read password_file {self.password_file}: "
                                  f"{exc.strerror}") from None
            return lines[0].strip() if lines else ""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"password_env: ${self.password_env} is not set")
            return value
        return None


class HubMqttConfig(_Secret):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    topic_root: str = Field(default="labd", pattern=r"^[^#+]+$")


class HubPostgresConfig(_Secret):
    enabled: bool = False
    #: libpq connection string or URL *without* the password (e.g. ``host=hub dbname=lab
    #: user=labd``); the password comes from password_file or password_env.
    conninfo: str = ""

    @model_validator(mode="after")
    def _conninfo(self) -> HubPostgresConfig:
        if not self.enabled:
            return self
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(self.conninfo)
        except Exception as exc:
            raise ValueError(f"conninfo is not a libpq connection string: {exc}") from None
        if "password" in params:
            raise ValueError("conninfo must not hold the password: use password_file or "
                             "password_env")
        if not self.conninfo:
            raise ValueError("conninfo is required when the PostgreSQL forwarder is enabled")
        return self


class HubTiledConfig(BaseModel):
    """A Tiled server (the optional extra ``labd[tiled]``); the API key from a file (first line)
    or an environment variable, never in the YAML."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    #: The server, or a container on it (``http://hub:8000/api/v1/metadata/lab``).
    uri: str = Field(default="", pattern=r"^(https?://\S+)?$")
    api_key_file: Path | None = None
    api_key_env: str | None = None

    @model_validator(mode="after")
    def _check(self) -> HubTiledConfig:
        if self.api_key_file is not None and self.api_key_env is not None:
            raise ValueError("give api_key_file or api_key_env, not both")
        if self.enabled and not self.uri:
            raise ValueError("uri is required when the Tiled forwarder is enabled")
        return self

    def password(self) -> str | None:
        """The API key, read now (named like the other sections' secret, for the hub service)."""
        return _Secret(password_file=self.api_key_file, password_env=self.api_key_env).password()


class HubConfig(BaseModel):
    """The document journal and the forwarders to the lab's data hub (labd.hubservice)."""

    model_config = ConfigDict(extra="forbid")

    journal: JournalConfig = Field(default_factory=JournalConfig)
    mqtt: HubMqttConfig = Field(default_factory=HubMqttConfig)
    postgres: HubPostgresConfig = Field(default_factory=HubPostgresConfig)
    tiled: HubTiledConfig = Field(default_factory=HubTiledConfig)


class DaemonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cell: str = Field(default="sim-cell", pattern=r"^[A-Za-z0-9_.-]+$")
    #: Durable state: queue, history, journal, campaign state, tokens.
    data_dir: Path = Path("var/labd")
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    #: The instruments' addresses and settings (a real cell); with the simulator enabled they
    #: come from its endpoints, and what is given here overrides settings per instrument.
    instruments: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Where things are (locations, rack, furnace slots, doser heads); with the simulator enabled
    #: it comes from the simulator's endpoints.
    layout: dict[str, Any] | None = None
    api: ApiConfig = Field(default_factory=ApiConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    interlocks: InterlocksConfig = Field(default_factory=InterlocksConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    #: Seconds a device may take to connect at start-up; a device that does not is reported down
    #: and retried every ``device_retry_s`` in the background.
    device_timeout_s: float = Field(default=10.0, gt=0)
    device_retry_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _instruments(self) -> DaemonConfig:
        if not self.simulator.enabled:
            try:
                InstrumentsConfig.model_validate(self.instruments)
            except ValidationError as exc:
                raise ValueError(_errors(exc, "instruments")) from None
        return self

    def instruments_config(self) -> InstrumentsConfig:
        return InstrumentsConfig.model_validate(self.instruments)


def _errors(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        where = f"{prefix}.{where}" if prefix and where else (prefix or where or "(top level)")
        shown = repr(err.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key (value {shown})")
        elif err["type"] == "missing":
            parts.append(f"{where}: required key is missing")
        else:
            parts.append(f"{where}: {err['msg']} (got {shown})")
    return "\n  ".join(parts)


def validate_config(data: Any, source: str = "config") -> DaemonConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level, got {kind}")
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid configuration:\n  {_errors(exc)}") from None


def load_config(path: Path | str) -> DaemonConfig:
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
    # Relative paths in the file are relative to the file.
    base = path.parent
    sim = cfg.simulator
    if sim.config is not None and not sim.config.is_absolute():
        sim.config = (base / sim.config).resolve()
    if sim.ground_truth is not None and not sim.ground_truth.is_absolute():
        sim.ground_truth = (base / sim.ground_truth).resolve()
    for secret in (cfg.hub.mqtt, cfg.hub.postgres):
        if secret.password_file is not None and not secret.password_file.is_absolute():
            secret.password_file = (base / secret.password_file).resolve()
    tiled = cfg.hub.tiled
    if tiled.api_key_file is not None and not tiled.api_key_file.is_absolute():
        tiled.api_key_file = (base / tiled.api_key_file).resolve()
    return cfg
