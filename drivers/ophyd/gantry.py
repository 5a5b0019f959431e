"""ophyd-async device for the GRBL gantry: three axes and a whole-position movable.

* ``gantry.x`` / ``gantry.y`` / ``gantry.z``: :class:`GantryAxis`, readable and movable (units mm,
  precision 3). ``set(v)`` moves that axis alone (the others stay where the machine reports them)
  and completes when GRBL reports Idle at the target; the readback is the axis of a ``?`` report.
* ``gantry.position``: :class:`GantryPosition`, movable with an ``(x, y, z)`` tuple or the name
  of a configured location (``"rack/1"``); read as the three axes' readbacks.
* ``gantry.gripper_closed``: the gripper command as last sent (GRBL does not report the coolant
  output in every status report; a reset opens it, which the device reflects).

``stop()`` on any movable is GRBL's documented stop-and-flush: feed hold (``!``, decelerate
without losing position), then soft reset (Ctrl-X, empty the planner). ``safe_state()`` does the
same; the gripper is left as the firmware leaves it (on this machine a reset opens it: a crucible
in the gripper drops where the head is, so the safety layer should not call it lightly mid-carry).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from bluesky.protocols import Reading
from event_model import DataKey
from ophyd_async.core import (
    AsyncStatus,
    Device,
    MovableLogic,
    SignalR,
    SignalRW,
    StandardMovable,
    StandardReadable,
    StandardReadableFormat,
    TimeoutCalculator,
    soft_signal_r_and_setter,
)

from ..errors import DriverError, InvalidParameter
from ..instruments.gantry import AXES, Gantry, Vec
from .backends import QuerySignalBackend

log = logging.getLogger(__name__)

UNITS = "mm"
PRECISION = 3

Target = tuple[float, float, float] | Sequence[float] | str


class _Readbacks:
    """One ``?`` shared by the three axes' readbacks when they are read together (a scan reads
    x, y, z in one gather): reads that overlap one in flight get its answer."""

    def __init__(self, client: Gantry) -> None:
        self.client = client
        self._pending: asyncio.Future[Vec] | None = None

    async def position(self) -> Vec:
        if self._pending is not None:
            return await asyncio.shield(self._pending)
        pending = self._pending = asyncio.get_running_loop().create_future()
        try:
            value = (await self.client.status()).position
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: no "never retrieved" warning
            raise
        else:
            pending.set_result(value)
            return value
        finally:
            self._pending = None

    async def axis(self, i: int) -> float:
        return (await self.position())[i]


async def _stop_motion(client: Gantry) -> None:
    """Feed hold, let it decelerate (Hold:0), then Ctrl-X to flush the planner."""
    try:
        await client.feed_hold()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            st = await client.status()
            if not st.moving:
                break
            await asyncio.sleep(client.settings.poll_interval_s)
    except DriverError as exc:
        log.warning("%s: feed hold before the reset failed: %s", client.name, exc)
    await client.soft_reset()


@dataclass
class _AxisLogic(MovableLogic[float]):
    client: Gantry
    index: int
    readbacks: _Readbacks

    async def check_move(self, new_position: float) -> None:
        target = list(await self.readbacks.position())
        target[self.index] = float(new_position)
        self.client.check_target(*target)

    async def move(self, new_position: float, timeout: TimeoutCalculator) -> None:
        await self.setpoint.set(new_position)

    async def stop(self) -> None:
        await _stop_motion(self.client)


class GantryAxis(StandardReadable, StandardMovable[float]):
    """One axis of the gantry (work coordinates, mm: MPos - WCO)."""

    def __init__(self, client: Gantry, index: int, readbacks: _Readbacks, name: str = "") -> None:
        self._client = client
        self._index = index
        self._readbacks = readbacks
        axis = AXES[index]
        source = f"grbl://{client.port.url}/{axis}"
        with self.add_children_as_readables(StandardReadableFormat.HINTED_UNCACHED_SIGNAL):
            self.user_readback = SignalR(
                QuerySignalBackend(
                    float,
                    source,
                    read=lambda: readbacks.axis(index),
                    poll_period=0.05,
                    units=UNITS,
                    precision=PRECISION,
                )
            )
        self.user_setpoint = SignalRW(
            QuerySignalBackend(
                float,
                source + "/setpoint",
                write=self._move,
                poll_period=None,
                units=UNITS,
                precision=PRECISION,
                initial_value=0.0,
            )
        )
        super().__init__(name=name)

    async def _move(self, value: float) -> float:
        target = list(await self._readbacks.position())
        target[self._index] = float(value)
        status = await self._client.move_to(*target)
        return status.position[self._index]

    @cached_property
    def movable_logic(self) -> _AxisLogic:
        return _AxisLogic(
            setpoint=self.user_setpoint,
            readback=self.user_readback,
            client=self._client,
            index=self._index,
            readbacks=self._readbacks,
        )


class GantryPosition(Device):
    """The head's position as one movable: ``set((x, y, z))`` or ``set("rack/1")``."""

    def __init__(self, client: Gantry, axes: Sequence[GantryAxis], name: str = "") -> None:
        self._client = client
        self._axes = list(axes)
        self._target: Vec | None = None
        super().__init__(name=name)

    def resolve(self, value: Target) -> Vec:
        if isinstance(value, str):
            locations = self._client.settings.locations
            if value not in locations:
                known = ", ".join(sorted(locations)) or "none configured"
                raise InvalidParameter(
                    self._client.name, f"move to {value!r}", f"unknown location (known: {known})"
                )
            x, y, z = locations[value]
        else:
            values = [float(v) for v in value]
            if len(values) != 3:
                raise InvalidParameter(
                    self._client.name, f"move to {value!r}", "a position is (x, y, z) in mm"
                )
            x, y, z = values
        return self._client.check_target(x, y, z)

    @AsyncStatus.wrap
    async def set(self, value: Target) -> None:
        target = self.resolve(value)
        self._target = target
        await self._client.move_to(*target)

    async def locate(self) -> dict[str, Vec]:
        readback = await self._client.position()
        return {"setpoint": self._target or readback, "readback": readback}

    async def read(self) -> dict[str, Reading]:
        out: dict[str, Reading] = {}
        for axis in self._axes:
            out.update(await axis.read())
        return out

    async def describe(self) -> dict[str, DataKey]:
        out: dict[str, DataKey] = {}
        for axis in self._axes:
            out.update(await axis.describe())
        return out

    async def read_configuration(self) -> dict[str, Reading]:
        return {}

    async def describe_configuration(self) -> dict[str, DataKey]:
        return {}

    async def stop(self, success: bool = False) -> None:
        await _stop_motion(self._client)


class GantryDevice(StandardReadable):
    """The gantry: axes ``x``, ``y``, ``z``, the whole ``position``, the gripper command.
    Reading the device reads the three axes (one ``?``)."""

    def __init__(self, client: Gantry, name: str = "") -> None:
        self.client = client
        readbacks = _Readbacks(client)
        with self.add_children_as_readables():
            self.x = GantryAxis(client, 0, readbacks)
            self.y = GantryAxis(client, 1, readbacks)
            self.z = GantryAxis(client, 2, readbacks)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.gripper_closed, self._set_gripper = soft_signal_r_and_setter(bool, False)
        self.position = GantryPosition(client, [self.x, self.y, self.z])
        super().__init__(name=name)

    async def grip(self, close: bool) -> None:
        await self.client.gripper(close)
        self._set_gripper(close)

    async def stop(self, success: bool = False) -> None:
        await _stop_motion(self.client)
        self._set_gripper(False)

    async def safe_state(self) -> None:
        """Stop motion (feed hold, then soft reset). The gripper stays as the firmware leaves it
        (a reset drops the coolant output, which opens this gripper)."""
        await _stop_motion(self.client)
        self._set_gripper(False)


def make_gantry_device(name: str, client: Gantry) -> GantryDevice:
    return GantryDevice(client, name=name)
