"""relay/deadline.py: coarse deadlines shared by many waits, on the loop portfwd runs on."""

from __future__ import annotations

import asyncio
import time

import pytest

from portfwd.relay.deadline import Deadlines


async def wait_with(deadlines: Deadlines, seconds: float, waited: asyncio.Future[None]) -> str:
    try:
        await deadlines.within(seconds, waited)
    except TimeoutError:
        return "timeout"
    return "done"


async def test_a_deadline_fires_late_never_early() -> None:
    deadlines = Deadlines(tick=0.05)
    began = time.monotonic()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await wait_with(deadlines, 0.2, never) == "timeout"
    took = time.monotonic() - began
    assert 0.2 <= took < 0.2 + 0.05 + 2.0  # one tick late at most (plus slack for a loaded machine)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_wait_that_ends_in_time_leaves_nothing_behind() -> None:
    deadlines = Deadlines(tick=0.05)
    loop = asyncio.get_running_loop()
    waited: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.01, waited.set_result, None)
    assert await wait_with(deadlines, 5, waited) == "done"
    assert not deadlines._waits
    assert not deadlines._expired
    await asyncio.sleep(0.12)
    assert deadlines._timer is None, "the timer stops once nobody waits"


async def test_many_waits_share_one_timer_and_expire_apart() -> None:
    deadlines = Deadlines(tick=0.05)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(3)]
    tasks = [
        asyncio.create_task(wait_with(deadlines, seconds, future))
        for seconds, future in zip((0.1, 5, 5), futures, strict=True)
    ]
    await asyncio.sleep(0)
    timer = deadlines._timer
    assert timer is not None
    assert len(deadlines._waits) == 3
    futures[1].set_result(None)
    assert await tasks[1] == "done"
    assert await tasks[0] == "timeout"
    tasks[2].cancel()  # someone else's cancel is not a timeout
    with pytest.raises(asyncio.CancelledError):
        await tasks[2]
    assert not deadlines._waits
    assert not deadlines._expired
    deadlines.close()
    assert deadlines._timer is None


async def test_enter_outside_a_task_is_refused() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    def outside() -> None:
        try:
            deadlines.enter(1)
        except RuntimeError as exc:
            errors.append(exc)

    loop.call_soon(outside)
    await asyncio.sleep(0.01)
    assert [str(exc) for exc in errors] == ["Deadlines.enter() needs a running task"]
