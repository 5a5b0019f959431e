"""The drivers' exception hierarchy, and the one retry helper (for reads only).

Every error a driver raises is a :class:`DriverError` that names the device and the command, so a
technician reading a log or an API error knows which instrument failed doing what::

    furnace: no reply to 'read PV (reg 1)' within 1.0 s

``DriverError``
    ``DeviceTimeout``   no (complete) reply within the command's timeout.
    ``ProtocolError``   a reply came but is garbled or not what the protocol says (bad CRC,
                        wrong echo, unparsable number); carries the raw bytes.
    ``InstrumentError`` the instrument understood and refused: its own ``code`` and ``message``
                        (a Modbus exception reply, MT-SICS ``ES``/``EL``/``I n``, GRBL ``error:N``).
    ``InvalidParameter`` a value out of the instrument's range or in the wrong unit: refused by
                        the driver before anything was sent (also a ``ValueError``).
    ``NotConnected``    the link is down (port vanished, broker gone, connection refused); the
                        transport reopens it on a later command, with a backoff.

Retries: a *read* may be repeated; a command that changes the world (a dispense, a move, a
setpoint, a program start) is never repeated automatically, because the first attempt may have
happened even if its reply was lost. :func:`retry_read` is for reads only, and transports take
``idempotent=True`` on the call to opt in; the default is ``False``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class DriverError(Exception):
    """Base of every driver error: carries the ``device`` name and the ``command`` that failed."""

    def __init__(self, device: str, command: str | None, detail: str) -> None:
        self.device = device
        self.command = command
        self.detail = detail
        super().__init__(self._format())

    def _format(self) -> str:
        return f"{self.device}: {self.detail}"


class DeviceTimeout(DriverError):
    """No complete reply within the command's timeout."""

    def __init__(
        self, device: str, command: str | None, timeout: float, detail: str | None = None
    ) -> None:
        self.timeout = timeout
        text = detail or f"no reply to {command!r} within {timeout:g} s"
        super().__init__(device, command, text)


class ProtocolError(DriverError):
    """A reply arrived but is garbled or unexpected; ``raw`` holds the bytes as received."""

    def __init__(
        self, device: str, command: str | None, detail: str, raw: bytes | None = None
    ) -> None:
        self.raw = raw
        text = f"bad reply to {command!r}: {detail}" if command else detail
        if raw is not None:
            text += f" (raw {raw!r})"
        super().__init__(device, command, text)


class InstrumentError(DriverError):
    """The instrument refused the command with its own error ``code`` and ``message``."""

    def __init__(
        self, device: str, command: str | None, code: int | str | None, message: str
    ) -> None:
        self.code = code
        self.message = message
        where = f"{command!r} refused" if command else "instrument error"
        text = f"{where}: {message}" if code is None else f"{where}: error {code} ({message})"
        super().__init__(device, command, text)


class NotConnected(DriverError):
    """The link to the device is down; a later command reopens it (with a backoff)."""

    def __init__(self, device: str, command: str | None, detail: str = "not connected") -> None:
        text = f"{detail} (command {command!r} not sent)" if command else detail
        super().__init__(device, command, text)


class InvalidParameter(DriverError, ValueError):
    """A parameter the instrument cannot take; nothing was sent."""

    def __init__(self, device: str, command: str | None, detail: str) -> None:
        text = f"{command}: {detail} (nothing sent)" if command else f"{detail} (nothing sent)"
        super().__init__(device, command, text)


#: What a read may be retried on: a lost or garbled reply, or a link that dropped and reopens.
RETRYABLE: tuple[type[DriverError], ...] = (DeviceTimeout, ProtocolError, NotConnected)


async def retry_read(
    fn: Callable[[], Awaitable[T]],
    attempts: int = 3,
    backoff: float = 0.1,
    *,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> T:
    """Call the *read* ``fn`` up to ``attempts`` times, sleeping ``backoff * 2**i`` in between.

    Only for reads: never wrap a command that changes the world (see the module docstring).
    :class:`InstrumentError` is not retried: the instrument answered, and asking again gets the
    same answer. The last error is raised unchanged.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for i in range(attempts):
        try:
            return await fn()
        except retry_on as exc:
            if i == attempts - 1:
                raise
            log.info("retrying read after %s (attempt %d of %d)", exc, i + 2, attempts)
            await asyncio.sleep(backoff * (2**i))
    raise AssertionError("unreachable")  # pragma: no cover
