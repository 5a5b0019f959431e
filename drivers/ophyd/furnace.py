"""ophyd-async devices for the Eurotherm 3216 / EPC3016 furnace (on drivers.instruments.furnace).

``Furnace`` (a :class:`StandardReadable`)::

    furnace.temperature        PV, °C, precision 1 (hinted; polled while monitored)
    furnace.setpoint           a movable: set(T) writes the target SP, and completes when the PV
                               is within ``tolerance_c`` of T and stays there ``settle_s``
                               (wall seconds: the simulator's virtual clock runs fast, so tests
                               use short settle times); its readback is the PV
    furnace.output             working output, %
    furnace.status_word, furnace.over_temperature, furnace.sensor_break, furnace.program_state
    furnace.programmer         a movable: set(FurnaceProgram) runs a program and completes when
                               the run mode reports it complete
    furnace.run_program(segs)  the same as an AsyncStatus

A move or a program in progress fails with :class:`~drivers.instruments.furnace.FurnaceAlarm`
as soon as the status shows that the furnace cannot heat (over-temperature alarm, sensor break,
standby), so a plan does not wait for a temperature that will never come.

``Furnace.stop()`` and ``Furnace.safe_state()`` turn the heater off through
:meth:`~drivers.instruments.furnace.Furnace.heater_off`: programmer reset, setpoint to the safe
value, instrument standby (outputs off). ``furnace.client.operate()`` leaves standby.
``furnace.setpoint.stop()`` and ``furnace.programmer.stop()`` (which the RunEngine calls on
pause, suspend, abort *and at the end of every plan*) turn the heater off only when a move or a
program started through them is still in progress; otherwise they leave the furnace holding
its setpoint, which is the point of having moved it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from ophyd_async.core import (
    AsyncStatus,
    MovableLogic,
    SignalR,
    SignalRW,
    StandardMovable,
    StandardReadable,
    StandardReadableFormat,
    TimeoutCalculator,
    soft_signal_rw,
)

from ..errors import InvalidParameter
from ..instruments.furnace import Furnace as FurnaceClient
from ..instruments.furnace import (
    FurnaceAlarm,
    FurnaceProgram,
    RunMode,
    Segment,
)
from .backends import QuerySignalBackend


def _source(client: FurnaceClient, what: str) -> str:
    link = client.settings.link
    where = link.url if link.framing == "rtu" else f"{link.host}:{link.port}"
    return f"modbus+{link.framing}://{where}/{link.unit_id}/{what}"


@dataclass
class FurnaceMoveLogic(MovableLogic[float]):
    client: FurnaceClient
    tolerance_c: SignalRW[float]
    settle_s: SignalRW[float]
    poll_s: float = 0.05

    async def check_move(self, new_position: float) -> None:
        s = self.client.settings
        if not s.min_setpoint_c <= new_position <= s.max_setpoint_c:
            raise InvalidParameter(
                self.client.name, f"set setpoint {new_position:g} °C",
                f"setpoint {new_position:g} °C outside "
                f"{s.min_setpoint_c:g}..{s.max_setpoint_c:g} °C",
            )

    async def move(self, new_position: float, timeout: TimeoutCalculator) -> None:
        await self.setpoint.set(new_position)
        tol, settle = await asyncio.gather(self.tolerance_c.get_value(),
                                           self.settle_s.get_value())
        await self.client.wait_for_temperature(
            new_position, tolerance=tol, settle_s=settle, timeout=timeout(), poll_s=self.poll_s
        )

    async def stop(self) -> None:
        await self.client.heater_off()


class FurnaceSetpoint(StandardReadable, StandardMovable[float]):
    """The furnace's setpoint as a movable: readback PV, ``target`` the target setpoint."""

    def __init__(self, client: FurnaceClient, *, tolerance_c: float = 2.0, settle_s: float = 1.0,
                 poll_period: float = 0.2, name: str = "") -> None:
        self.client = client
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.readback = SignalR(QuerySignalBackend(
                float, _source(client, "pv"), read=client.temperature, poll_period=poll_period,
                units="degC", precision=1,
            ))
        with self.add_children_as_readables():
            self.target = SignalRW(QuerySignalBackend(
                float, _source(client, "target_sp"), read=client.setpoint,
                write=client.set_setpoint, poll_period=poll_period, units="degC", precision=1,
            ))
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.tolerance_c = soft_signal_rw(float, tolerance_c, units="degC")
            self.settle_s = soft_signal_rw(float, settle_s, units="s")
        super().__init__(name=name)

    @cached_property
    def movable_logic(self) -> FurnaceMoveLogic:
        return FurnaceMoveLogic(setpoint=self.target, readback=self.readback, client=self.client,
                                tolerance_c=self.tolerance_c, settle_s=self.settle_s)

    async def stop(self, success: bool = False) -> None:
        """Heater off if a move is in progress (pause, suspend, abort); nothing otherwise.

        The RunEngine calls ``stop(success=True)`` on every movable it has set at the end of
        every plan: a furnace that reached its setpoint keeps holding it then (turn it off with
        ``safe_state()`` or a move to a low setpoint)."""
        if self._move_status is not None and not self._move_status.done:
            await super().stop(success)


class FurnaceProgrammer(StandardReadable):
    """Runs a program: ``set(program)`` completes when the run mode reports COMPLETE (or RESET,
    for a program with ``end="reset"`` that did run); fails on an alarm."""

    def __init__(self, client: FurnaceClient, *, poll_period: float = 0.2,
                 name: str = "") -> None:
        self.client = client
        self._poll = 0.05
        self._status: AsyncStatus | None = None

        async def mode() -> str:
            return (await client.run_mode()).name

        async def segment() -> int:
            return (await client.program_state()).segment

        with self.add_children_as_readables():
            self.state = SignalR(QuerySignalBackend(
                str, _source(client, "run_mode"), read=mode, poll_period=poll_period,
            ))
            self.segment = SignalR(QuerySignalBackend(
                int, _source(client, "segment"), read=segment, poll_period=poll_period,
            ))
        super().__init__(name=name)

    def set(self, value: FurnaceProgram | Sequence[Segment]) -> AsyncStatus:
        """Run ``value``; the status completes when the run mode reports the program done."""
        self._status = AsyncStatus(self._run(value))
        return self._status

    async def _run(self, value: FurnaceProgram | Sequence[Segment]) -> None:
        await self.client.run_program(value)
        await self.client.wait_program_done(poll_s=self._poll)

    async def stop(self, success: bool = False) -> None:
        """Heater off if a program run started here is in progress (pause, suspend, abort);
        nothing otherwise (the RunEngine calls this at the end of every plan)."""
        status, self._status = self._status, None
        if status is not None and not status.done:
            status.task.cancel()
            await self.client.heater_off()


class Furnace(StandardReadable):
    """The furnace as an ophyd-async device (see the module docstring)."""

    def __init__(self, client: FurnaceClient, *, tolerance_c: float = 2.0, settle_s: float = 1.0,
                 poll_period: float = 0.2, name: str = "") -> None:
        self.client = client

        async def status_word() -> int:
            return (await client.status()).word

        async def over_temperature() -> bool:
            return (await client.status()).over_temperature

        async def sensor_break() -> bool:
            return (await client.status()).sensor_break

        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.temperature = SignalR(QuerySignalBackend(
                float, _source(client, "pv"), read=client.temperature, poll_period=poll_period,
                units="degC", precision=1,
            ))
        with self.add_children_as_readables():
            self.output = SignalR(QuerySignalBackend(
                float, _source(client, "working_output"), read=client.output,
                poll_period=poll_period, units="%", precision=1,
            ))
            self.status_word = SignalR(QuerySignalBackend(
                int, _source(client, "status_word"), read=status_word, poll_period=poll_period,
            ))
            self.over_temperature = SignalR(QuerySignalBackend(
                bool, _source(client, "status_word/alarm"), read=over_temperature,
                poll_period=poll_period,
            ))
            self.sensor_break = SignalR(QuerySignalBackend(
                bool, _source(client, "status_word/sensor_break"), read=sensor_break,
                poll_period=poll_period,
            ))
        self.setpoint = FurnaceSetpoint(client, tolerance_c=tolerance_c, settle_s=settle_s,
                                        poll_period=poll_period)
        self.programmer = FurnaceProgrammer(client, poll_period=poll_period)
        self.add_readables([self.setpoint.target, self.programmer.state])
        super().__init__(name=name)

    def run_program(self, segments: FurnaceProgram | Sequence[Segment]) -> AsyncStatus:
        """Run a program; the status completes when the run mode reports it complete."""
        return self.programmer.set(segments)

    async def stop(self, success: bool = False) -> None:
        """Heater off (the 3216 has no motion to stop: the safe state is the stop)."""
        await self.client.heater_off()

    async def safe_state(self) -> None:
        """Heater off: programmer reset, setpoint to the safe value, standby (outputs off)."""
        await self.client.heater_off()


def make_furnace_device(name: str, client: FurnaceClient, *, tolerance_c: float = 2.0,
                        settle_s: float = 1.0, poll_period: float = 0.2) -> Furnace:
    return Furnace(client, tolerance_c=tolerance_c, settle_s=settle_s, poll_period=poll_period,
                   name=name)


__all__ = [
    "Furnace",
    "FurnaceAlarm",
    "FurnaceMoveLogic",
    "FurnaceProgrammer",
    "FurnaceSetpoint",
    "RunMode",
    "make_furnace_device",
]

