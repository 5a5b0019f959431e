"""ophyd-async device for an MT-SICS balance: a triggered weighing, and tare/zero plan stubs.

``trigger()`` takes one *stable* weight (``S``) and ``read()`` returns it as ``<name>-weight`` in
grams, with the balance's readability as the precision. Reading does not ask the balance again,
so every event of ``bp.count([balance])`` holds exactly the weighing its trigger made. The tare
in effect is a configuration signal (``<name>-tare``), updated by :func:`tare`, :func:`zero` and
at connect.

Tare and zero change what the following weighings mean, so they are explicit plan steps
(:func:`tare`, :func:`zero`), not side effects of reading::

    yield from tare(balance)          # returns the tare weight, g
    yield from bp.count([balance], 3)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any

import bluesky.plan_stubs as bps
from bluesky.utils import Msg
from ophyd_async.core import (
    AsyncStatus,
    Device,
    StandardReadable,
    StandardReadableFormat,
    soft_signal_r_and_setter,
)

from ..instruments.balance import Balance as BalanceClient


class Balance(StandardReadable):
    """An analytical balance: trigger = one stable weighing."""

    def __init__(self, client: BalanceClient, name: str = "") -> None:
        self.client = client
        precision = client.decimals if client.decimals is not None else 4
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.weight, self._set_weight = soft_signal_r_and_setter(
                float, 0.0, units="g", precision=precision
            )
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.tare_weight, self._set_tare = soft_signal_r_and_setter(
                float, 0.0, units="g", precision=precision
            )
        super().__init__(name=name)

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        await super().connect(*args, **kwargs)
        if kwargs.get("mock"):
            return
        # One immediate reading teaches the client the readability (precision of the data).
        await self.client.immediate_weight()
        self._set_tare(await self.client.tare_value())
        if self.client.decimals is not None:
            for sig in (self.weight, self.tare_weight):
                backend: Any = sig._connector.backend  # soft backend's datakey metadata
                backend.metadata["precision"] = self.client.decimals

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        """Weigh: the next stable weight (``S``)."""
        self._set_weight(await self.client.stable_weight())

    async def do_tare(self) -> float:
        grams = await self.client.tare()
        self._set_tare(grams)
        return grams

    async def do_zero(self) -> None:
        await self.client.zero()
        self._set_tare(0.0)

    async def safe_state(self) -> None:
        """Nothing to make safe on a balance: no heater, no motion, no dispenser.

        Deliberately not ``@`` (reset): it would clear the tare a weighing in progress relies on.
        """
        return None


def _run(factory: Callable[[], Awaitable[Any]]) -> Generator[Msg, Any, Any]:
    """Await ``factory()`` on the RunEngine's loop; return its result or raise its error."""
    futures = yield from bps.wait_for([factory])
    fut = futures[0]
    exc = fut.exception()
    if exc is not None:
        raise exc
    return fut.result()


def tare(balance: Balance) -> Generator[Msg, Any, float]:
    """Plan stub: tare the balance (``T``); returns the tare weight in grams."""
    grams: float = yield from _run(balance.do_tare)
    return grams


def zero(balance: Balance) -> Generator[Msg, Any, None]:
    """Plan stub: zero the balance (``Z``; clears the tare)."""
    yield from _run(balance.do_zero)


def make_balance_device(name: str, client: BalanceClient) -> Device:
    return Balance(client, name=name)
