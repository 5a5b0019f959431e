"""ophyd-async device for the Quantos powder doser: ``set(mg)`` doses, a movable in Bluesky terms.

``bps.mv(doser, 50)`` doses 50 mg of the powder in the head selected by ``doser.head`` (a
configuration signal: ``bps.mv(doser.head, 3)``) and completes when the Quantos answers
``QRA 61 1 A``. Readings:

* ``<name>-last_dose_mg`` (hinted, the readback): the mass the doser reports it delivered, also
  after a failed dose (``I 7``: the head ran out of powder), so a plan sees what is in the vial.
* ``<name>-target_mg`` (the setpoint): the last dose asked for.
* configuration: ``<name>-head``, ``<name>-last_dose_valid`` (the Quantos' tolerance verdict).

A dose is not an absolute position: ``bps.mv(doser, 50)`` twice doses 100 mg. Plans that retry
after an error must look at the error's ``check`` / ``dosed_mg`` (see
:mod:`drivers.instruments.doser`) before dosing again.

``stop()`` sends the Quantos' real stop (``QRA 61 4``); ``safe_state()`` stops any dose and
closes the front door.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ophyd_async.core import (
    Device,
    MovableLogic,
    SignalRW,
    StandardMovable,
    StandardReadable,
    StandardReadableFormat,
    TimeoutCalculator,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from ..instruments.doser import DoseFailed
from ..instruments.doser import Doser as DoserClient


@dataclass
class DoseLogic(MovableLogic[float]):
    """How the doser 'moves': one dose of ``new_position`` mg with the selected head."""

    device: Doser

    async def check_move(self, new_position: float) -> None:
        head = await self.device.head.get_value()
        self.device.client.check_dose(head, new_position)

    async def calculate_timeout(self, old_position: float, new_position: float) -> float | None:
        return self.device.client.settings.dose_timeout_s

    async def move(self, new_position: float, timeout: TimeoutCalculator) -> None:
        await self.device.dose(float(new_position), timeout())

    async def stop(self) -> None:
        await self.device.client.stop()


class Doser(StandardReadable, StandardMovable[float]):
    """A Quantos: set(mg) doses with the head selected by ``head``."""

    def __init__(self, client: DoserClient, name: str = "", head: int = 1) -> None:
        self.client = client
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.last_dose_mg, self._set_last = soft_signal_r_and_setter(
                float, 0.0, units="mg", precision=3
            )
        with self.add_children_as_readables():
            self.target_mg: SignalRW[float] = soft_signal_rw(float, 0.0, units="mg", precision=3)
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.head: SignalRW[int] = soft_signal_rw(int, head)
            self.last_dose_valid, self._set_valid = soft_signal_r_and_setter(bool, False)
        super().__init__(name=name)

    @cached_property
    def movable_logic(self) -> DoseLogic:
        return DoseLogic(setpoint=self.target_mg, readback=self.last_dose_mg, device=self)

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        # Keep ``<name>-last_dose_mg`` (StandardMovable would rename the readback to ``<name>``):
        # a dose is not a position, and the documents should say what the number is.
        Device.set_name(self, name, child_name_separator=child_name_separator)

    async def dose(self, mg: float, timeout: float | None = None) -> float:
        head = await self.head.get_value()
        await self.target_mg.set(mg)
        try:
            result = await self.client.dose(head, mg, timeout=timeout)
        except DoseFailed as exc:
            if exc.dosed_mg is not None:
                self._set_last(exc.dosed_mg)
            self._set_valid(False)
            raise
        self._set_last(result.dosed_mg)
        self._set_valid(bool(result.valid))
        return result.dosed_mg

    async def safe_state(self) -> None:
        """Stop any dose (``QRA 61 4``) and close the front door."""
        await self.client.safe_state()

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        await super().connect(*args, **kwargs)
        if kwargs.get("mock"):
            return
        await self.client.door_position()  # the doser answers: fail at connect, not mid-plan


def make_doser_device(name: str, client: DoserClient) -> Device:
    return Doser(client, name=name)
