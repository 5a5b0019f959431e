"""drivers.aio.wait_for keeps a cancellation that arrives as the awaited thing completes, which
``asyncio.wait_for`` of Python 3.11 loses (CPython gh-86296): the race, made deterministic."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from drivers.aio import wait_for

Waiter = Callable[[Awaitable[Any], float | None], Awaitable[Any]]


async def reply_and_cancel_together(waiter: Waiter) -> str:
    """A task waits for a reply; the reply arrives in the same loop iteration as a cancellation
    of the task (a RunEngine pause, a service's stop)."""
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def body() -> Any:
        return await waiter(fut, 10.0)

    task = asyncio.create_task(body())
    await asyncio.sleep(0)  # the task now waits for the reply
    fut.set_result("reply")
    task.cancel()
    try:
        return f"returned {await task!r}"
    except asyncio.CancelledError:
        return "cancelled"


async def test_a_cancellation_that_races_the_reply_is_kept() -> None:
    assert await reply_and_cancel_together(wait_for) == "cancelled"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in CPython 3.12")
async def test_asyncio_wait_for_of_311_loses_it() -> None:
    """Why drivers.aio exists: if this ever passes on 3.11 the helper may go."""
    assert await reply_and_cancel_together(asyncio.wait_for) == "returned 'reply'"


async def test_timeout_and_result() -> None:
    assert await wait_for(asyncio.sleep(0, "x"), 1.0) == "x"
    assert await wait_for(asyncio.sleep(0, "y"), None) == "y"
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.sleep(10), 0.01)
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_for(fut, 0.01)
    assert fut.cancelled()  # as asyncio.wait_for: what timed out is cancelled


async def test_cancel_and_wait_ends_a_loop_that_swallows_a_cancellation() -> None:
    from drivers.aio import cancel_and_wait

    swallowed = 0

    async def stubborn_poll() -> None:  # as a poll loop whose library call loses a cancel
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    polls = [asyncio.create_task(stubborn_poll()), asyncio.create_task(asyncio.sleep(10))]
    await asyncio.sleep(0.02)
    await asyncio.wait_for(cancel_and_wait(polls), 5)
    assert swallowed == 1 and all(t.cancelled() for t in polls)
