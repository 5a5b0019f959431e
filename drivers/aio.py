"""asyncio helpers shared by the drivers and the daemon.

:func:`wait_for` replaces ``asyncio.wait_for`` everywhere in labd. Why: on Python 3.11 (the
version this project supports from), ``asyncio.wait_for`` can lose a cancellation that arrives
as the awaited thing completes (CPython gh-86296, fixed in 3.12 by re-implementing it on
``asyncio.timeout``): the result is returned and the task goes on as if never cancelled. For
labd that meant a service whose polling loop survived its ``stop()`` (a shutdown that hung), and
a RunEngine pause that never happened. ``asyncio.timeout`` does not have that race.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """Await ``aw`` for at most ``timeout`` seconds (None: no limit); TimeoutError after that.

    As ``asyncio.wait_for``, without its lost cancellation on 3.11 (see the module docstring).
    ``aw`` runs in the caller's task (no task of its own): a future it creates is registered
    before anything else can run."""
    async with asyncio.timeout(timeout):
        return await aw


async def cancel_and_wait(tasks: Collection[asyncio.Future[Any]], resend_s: float = 0.1) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again any that is still
    running after ``resend_s``: a cancellation swallowed by code outside labd (a library's own
    ``asyncio.wait_for`` on 3.11) must not leave a loop running after its service stopped."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=resend_s)
    await asyncio.gather(*tasks, return_exceptions=True)  # collect their outcomes
