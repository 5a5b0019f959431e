"""What every simulated instrument has: a config section, a context, a lifecycle, faults."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .clock import VirtualClock
from .faults import Fault, FaultBox, FaultKind
from .world import World


class MqttBrokerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    #: Topic prefix of the simulated cell's MQTT devices: ``<prefix>/<cell>/<device>/...``.
    prefix: str = "labd-sim"


class DeviceConfig(BaseModel):
    """Fields common to every simulated device's config section."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Faults active from start-up (more can be set at run time through the control channel).
    faults: list[Fault] = Field(default_factory=list)


class SerialEndpointConfig(BaseModel):
    """How a serial instrument is served: a pseudo-terminal, a TCP socket, or both."""

    model_config = ConfigDict(extra="forbid")

    #: Serve on a pseudo-terminal; its path is a symlink ``<run_dir>/<device>`` (stable across
    #: simulated cable pulls, which replace the pty behind it).
    pty: bool = True
    #: Also serve the raw byte stream on TCP (``socket://host:port`` for pyserial); 0 = free port.
    tcp_port: int | None = Field(default=None, ge=0, le=65535)
    tcp_host: str = "127.0.0.1"
    baudrate: int = 9600


@dataclass
class SimContext:
    """Shared by all simulators of one cell."""

    cell: str
    clock: VirtualClock
    world: World
    run_dir: Path
    mqtt: MqttBrokerConfig
    seed: int = 0

    def rng(self, device: str) -> random.Random:
        return random.Random(f"{self.seed}:{device}")


class SimInstrument(ABC):
    """A simulated instrument: started and stopped by the cell, controlled by the control channel.

    Subclasses set ``kind`` and implement :meth:`start`, :meth:`stop`, :meth:`endpoint` and
    :meth:`state`; they may override :meth:`control` for physical actions that a test bench needs
    (open the door, load powder, ...).
    """

    kind: ClassVar[str]

    def __init__(self, name: str, config: DeviceConfig, ctx: SimContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.faults = FaultBox(name, ctx.seed)

    async def apply_initial_faults(self) -> None:
        for fault in self.config.faults:
            await self.faults.set(fault)

    async def set_fault(self, fault: Fault) -> None:
        """Inject ``fault`` now (event faults happen through the FaultBox listeners)."""
        await self.faults.set(fault)

    async def clear_fault(self, kind: FaultKind | None = None) -> None:
        """End ``kind`` (or every fault). Devices override it to undo event faults at once:
        plug a pulled cable back in, bring a dropped MQTT device back."""
        self.faults.clear(kind)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def endpoint(self) -> dict[str, Any]:
        """Where the device listens: ``{"transport": ..., "address": ..., ...}`` (JSON-able)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """The device's physical state as a JSON-able dict (for the control channel and tests)."""

    async def control(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """A device-specific physical action; the default knows none."""
        raise ValueError(f"{self.name}: unknown action {action!r}")
