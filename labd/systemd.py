"""systemd's notify protocol, without a dependency: ``READY=1``, ``WATCHDOG=1``, ``STATUS=``,
``STOPPING=1`` as datagrams on ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same way from a
terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds (systemd's advice), or None if no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


async def watchdog(healthy: Callable[[], bool], interval: float) -> None:
    """Send ``WATCHDOG=1`` every ``interval`` while ``healthy()``; an event loop that is stuck
    (blocking work on it) sends nothing, and systemd restarts the daemon."""
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)
