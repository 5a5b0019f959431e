"""Signal backends for instruments that ophyd-async has no backend for.

ophyd-async ships EPICS and Tango backends and a soft backend; a lab instrument on a serial line,
a Modbus register or an MQTT topic has none. Two backends cover them:

* :class:`QuerySignalBackend` reads by *asking* (a Modbus register read, a serial query such as
  ``S`` or ``:READ?``) and writes by a command; while a Bluesky subscription is active it polls at
  ``poll_period``. A read that fails while polling is not swallowed: the reading keeps its last
  value with ``alarm_severity`` INVALID (3) and the failure is logged, so a plan or a monitor can
  see that the value went stale; a direct read raises the driver's error.
* :class:`PushSignalBackend` holds a value that the instrument *pushes* (MQTT telemetry), updated
  by the transport's subscription through :meth:`PushSignalBackend.update`; a write is a command
  that completes when the instrument acknowledges it.

Both are generic over the value's datatype and give ``describe()`` its units and precision, and a
``source`` URI naming the transport and address (``modbus://127.0.0.1:5020/1/hr/1``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic

from bluesky.protocols import Reading
from event_model import DataKey
from ophyd_async.core import (
    Callback,
    NotConnectedError,
    SignalBackend,
    SignalDatatypeT,
    make_datakey,
)

from ..aio import wait_for

log = logging.getLogger(__name__)

ALARM_NONE = 0
ALARM_INVALID = 3

Reader = Callable[[], Awaitable[Any]]
Writer = Callable[[Any], Awaitable[Any]]


def _metadata(units: str | None, precision: int | None, choices: list[str] | None) -> Any:
    md: dict[str, Any] = {}
    if units is not None:
        md["units"] = units
    if precision is not None:
        md["precision"] = precision
    if choices is not None:
        md["choices"] = choices
    return md


class _ValueBackend(SignalBackend[SignalDatatypeT], Generic[SignalDatatypeT]):
    """What both backends share: the cached reading, the callback, the datakey."""

    def __init__(
        self,
        datatype: type[SignalDatatypeT],
        source: str,
        *,
        units: str | None = None,
        precision: int | None = None,
        choices: list[str] | None = None,
        initial_value: SignalDatatypeT | None = None,
    ) -> None:
        super().__init__(datatype)
        self._datatype = datatype
        self._source = source
        self.metadata = _metadata(units, precision, choices)
        self.reading: Reading[SignalDatatypeT] | None = None
        self.callback: Callback[Reading[SignalDatatypeT]] | None = None
        self._setpoint: SignalDatatypeT | None = initial_value
        if initial_value is not None:
            self._store(initial_value)

    def convert(self, value: Any) -> SignalDatatypeT:
        if self._datatype in (int, float, str, bool) and not isinstance(value, self._datatype):
            return self._datatype(value)  # type: ignore[call-arg,return-value]
        return value  # type: ignore[no-any-return]

    def _store(
        self, value: Any, severity: int = ALARM_NONE, timestamp: float | None = None
    ) -> Reading[SignalDatatypeT]:
        self.reading = Reading(
            value=self.convert(value),
            timestamp=time.time() if timestamp is None else timestamp,
            alarm_severity=severity,
        )
        if self.callback is not None:
            self.callback(self.reading)
        return self.reading

    def source(self, name: str, read: bool) -> str:
        return self._source

    async def get_datakey(self, source: str) -> DataKey:
        value = self.reading["value"] if self.reading else await self.get_value()
        return make_datakey(self._datatype, value, source, self.metadata)

    async def get_setpoint(self) -> SignalDatatypeT:
        if self._setpoint is None:
            return await self.get_value()
        return self._setpoint


class QuerySignalBackend(_ValueBackend[SignalDatatypeT], Generic[SignalDatatypeT]):
    """A value read by a request to the instrument, and written by a command.

    ``read`` and ``write`` are coroutines of the protocol client (e.g. ``furnace.temperature``,
    ``furnace.set_setpoint``). ``write`` is called once per ``put``: whether a failed write may be
    repeated is the protocol client's decision, never the backend's.
    """

    def __init__(
        self,
        datatype: type[SignalDatatypeT],
        source: str,
        *,
        read: Reader | None = None,
        write: Writer | None = None,
        poll_period: float | None = 1.0,
        units: str | None = None,
        precision: int | None = None,
        choices: list[str] | None = None,
        initial_value: SignalDatatypeT | None = None,
    ) -> None:
        if read is None and initial_value is None:
            raise ValueError(f"{source}: a write-only signal needs an initial_value")
        super().__init__(
            datatype,
            source,
            units=units,
            precision=precision,
            choices=choices,
            initial_value=initial_value,
        )
        self._read = read
        self._write = write
        self._poll_period = poll_period
        self._poll_task: asyncio.Task[None] | None = None

    async def connect(self, timeout: float) -> None:
        if self._read is None:
            return
        try:
            await wait_for(self.get_reading(), timeout)
        except Exception as exc:
            raise NotConnectedError(f"{self._source}: {exc}") from exc

    async def put(self, value: SignalDatatypeT | None) -> None:
        if self._write is None:
            raise PermissionError(f"{self._source} is read-only")
        if value is None:
            raise ValueError(f"{self._source}: a put needs a value")
        value = self.convert(value)
        self._setpoint = value
        result = await self._write(value)
        if self._read is not None:
            await self.get_reading()
        else:
            self._store(value if result is None else result)

    async def get_reading(self) -> Reading[SignalDatatypeT]:
        if self._read is None:
            assert self.reading is not None
            return self.reading
        return self._store(await self._read())

    async def get_value(self) -> SignalDatatypeT:
        return (await self.get_reading())["value"]

    def set_callback(self, callback: Callback[Reading[SignalDatatypeT]] | None) -> None:
        if callback is not None and self.callback is not None:
            raise RuntimeError(f"{self._source}: a callback is already set")
        self.callback = callback
        if callback is None:
            if self._poll_task is not None:
                self._poll_task.cancel()
                self._poll_task = None
            return
        if self.reading is not None:
            callback(self.reading)
        if self._read is not None and self._poll_period:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        assert self._read is not None and self._poll_period is not None
        failing = False
        while True:
            try:
                self._store(await self._read())
                if failing:
                    log.info("%s: reads work again", self._source)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("%s: read failed while monitoring: %s", self._source, exc)
                failing = True
                if self.reading is not None:
                    self._store(self.reading["value"], ALARM_INVALID, self.reading["timestamp"])
            await asyncio.sleep(self._poll_period)


class PushSignalBackend(_ValueBackend[SignalDatatypeT], Generic[SignalDatatypeT]):
    """A value the instrument publishes (MQTT telemetry); writes are acknowledged commands.

    The transport calls :meth:`update` for every message. ``connect`` waits for the first value
    (retained telemetry arrives on subscribe). :meth:`mark_stale` flags the value INVALID when the
    instrument is known to be gone (its last will fired).
    """

    def __init__(
        self,
        datatype: type[SignalDatatypeT],
        source: str,
        *,
        write: Writer | None = None,
        units: str | None = None,
        precision: int | None = None,
        choices: list[str] | None = None,
        initial_value: SignalDatatypeT | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(
            datatype,
            source,
            units=units,
            precision=precision,
            choices=choices,
            initial_value=initial_value,
        )
        self._write = write
        self._on_connect = on_connect
        self._first = asyncio.Event()
        if initial_value is not None:
            self._first.set()

    def update(self, value: Any, timestamp: float | None = None) -> None:
        self._store(value, ALARM_NONE, timestamp)
        self._first.set()

    def mark_stale(self) -> None:
        if self.reading is not None:
            self._store(self.reading["value"], ALARM_INVALID, self.reading["timestamp"])

    async def connect(self, timeout: float) -> None:
        try:
            if self._on_connect is not None:
                await wait_for(self._on_connect(), timeout)
            await wait_for(self._first.wait(), timeout)
        except TimeoutError as exc:
            raise NotConnectedError(f"{self._source}: no value within {timeout} s") from exc

    async def put(self, value: SignalDatatypeT | None) -> None:
        if self._write is None:
            raise PermissionError(f"{self._source} is read-only")
        if value is None:
            raise ValueError(f"{self._source}: a put needs a value")
        value = self.convert(value)
        self._setpoint = value
        await self._write(value)

    async def get_reading(self) -> Reading[SignalDatatypeT]:
        if self.reading is None:
            raise NotConnectedError(f"{self._source}: no value received yet")
        return self.reading

    async def get_value(self) -> SignalDatatypeT:
        return (await self.get_reading())["value"]

    def set_callback(self, callback: Callback[Reading[SignalDatatypeT]] | None) -> None:
        if callback is not None and self.callback is not None:
            raise RuntimeError(f"{self._source}: a callback is already set")
        self.callback = callback
        if callback is not None and self.reading is not None:
            callback(self.reading)
