"""ophyd-async device of the characterisation station: a triggered measurement.

``trigger()`` measures the crucible at the station as the sample named by the ``sample_id``
signal (an ack-then-result exchange, see :mod:`drivers.instruments.station`); ``read()`` then
gives the composition per element (``<name>-composition-<El>``, atomic fractions), the screened
property (``<name>-property``, in the cell's unit), the anneal temperature and the crucible::

    station = make_station_device("station", client)   # client.settings.elements = [...]
    await station.connect()
    RE(bp.count([station], 1))                          # after bps.mv(station.sample_id, "S-1")

The element list is fixed when the device is made (a Bluesky stream's keys may not change from
one event to the next): an element the cell does not know in a result is a ProtocolError rather
than a silently dropped column; an element not found in a sample reads 0.

The station has no abort command in its protocol: a measurement it accepted runs to the end.
:meth:`Station.stop` and :meth:`Station.safe_state` therefore stop the *driver's* wait (the
trigger fails) and leave the station to finish; the station is passive (nothing to switch off).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

from ophyd_async.core import (
    AsyncStatus,
    DeviceMap,
    SignalR,
    StandardReadable,
    StandardReadableFormat,
    soft_signal_r_and_setter,
    soft_signal_rw,
)

from ..errors import InvalidParameter, ProtocolError
from ..instruments.station import Station as StationClient
from ..instruments.station import StationResult

log = logging.getLogger(__name__)

FRACTION = "at. fraction"


class Station(StandardReadable):
    """Characterisation station: ``sample_id`` (config), composition per element, property."""

    def __init__(
        self,
        client: StationClient,
        elements: Sequence[str],
        *,
        property_unit: str | None = None,
        timeout: float | None = None,
        name: str = "",
    ) -> None:
        if not elements:
            raise ValueError(f"{client.name}: the station device needs the cell's element list")
        self._client = client
        self._timeout = timeout
        self._elements = list(dict.fromkeys(elements))
        self._task: asyncio.Task[StationResult] | None = None
        self.last_result: StationResult | None = None
        self._setters: dict[str, Callable[[float], None]] = {}
        unit = property_unit if property_unit is not None else client.settings.property_unit
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.sample_id = soft_signal_rw(str, "")
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            comp: dict[str, SignalR[float]] = {}
            for el in self._elements:
                comp[el], self._setters[el] = soft_signal_r_and_setter(
                    float, 0.0, units=FRACTION, precision=4
                )
            self.composition = DeviceMap(comp)
            self.property_value, self._set_property = soft_signal_r_and_setter(
                float, math.nan, units=unit, precision=4
            )
        with self.add_children_as_readables(StandardReadableFormat.UNCACHED_SIGNAL):
            self.anneal_c, self._set_anneal = soft_signal_r_and_setter(
                float, math.nan, units="degC", precision=1
            )
            self.crucible, self._set_crucible = soft_signal_r_and_setter(str, "")
            self.measured_sample, self._set_measured = soft_signal_r_and_setter(str, "")
        super().__init__(name=name)

    @property
    def client(self) -> StationClient:
        return self._client

    async def connect(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        """Start the client's subscriptions and wait for the station to be online."""
        await self._client.start()
        await self._client.wait_online()
        await super().connect(*args, **kwargs)  # type: ignore[arg-type]

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        sample = await self.sample_id.get_value()
        if not sample:
            raise InvalidParameter(
                self._client.name, "measure", f"set {self.sample_id.name} before triggering"
            )
        self._task = asyncio.ensure_future(self._client.measure(sample, self._timeout))
        try:
            result = await self._task
        finally:
            self._task = None
        unknown = set(result.composition) - set(self._elements)
        if unknown:
            raise ProtocolError(
                self._client.name, f"measure {sample!r}",
                f"composition has element(s) {sorted(unknown)} this cell does not use "
                f"({self._elements})",
            )
        for el in self._elements:
            self._setters[el](float(result.composition.get(el, 0.0)))
        self._set_property(result.property.value if result.property else math.nan)
        self._set_anneal(math.nan if result.anneal_c is None else float(result.anneal_c))
        self._set_crucible(result.crucible or "")
        self._set_measured(result.sample_id)
        self.last_result = result

    async def stop(self, success: bool = True) -> None:
        """End the driver's wait for a measurement (the station has no abort command)."""
        task = self._task
        if task is not None and not task.done():
            log.warning("%s: stop: no longer waiting for the measurement (the station has no "
                        "abort command and finishes it)", self.name)
            task.cancel()

    async def safe_state(self) -> None:
        """Nothing on the station to switch off; stop waiting for a measurement in progress."""
        await self.stop(success=False)


def make_station_device(
    name: str, client: StationClient, *, timeout: float | None = None
) -> Station:
    """The station device with the elements and property unit from the client's settings."""
    return Station(client, client.settings.elements, timeout=timeout, name=name)
