"""gateway.deadline.Deadline: the proxy's first-byte and idle timer, on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from gateway.deadline import Deadline


async def test_expiry_raises_timeout_error_at_the_end_of_the_block() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError), Deadline(loop, 0.05) as d:
        await asyncio.sleep(5)
    assert d.expired and loop.time() - t0 < 2


async def test_push_keeps_a_run_of_short_waits_alive() -> None:
    loop = asyncio.get_running_loop()
    # Wide margins: a loaded CI machine may stall the loop for a while between two pushes.
    with Deadline(loop, 0.5) as d:
        for _ in range(12):  # 0.6 s in all, never 0.5 s without a push
            await asyncio.sleep(0.05)
            d.push(0.5)
    assert not d.expired
    await asyncio.sleep(0.6)  # the timer is gone: nothing cancels this task later


async def test_push_sooner_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError), Deadline(loop, 30) as d:
        d.push(0.05)
        await asyncio.sleep(5)
    assert loop.time() - t0 < 2


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def wait() -> None:
        with Deadline(loop, 30):
            started.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(wait())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_outside_a_task_is_an_error() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[BaseException] = loop.create_future()

    def callback() -> None:  # a plain loop callback runs in no task
        try:
            Deadline(loop, 1)
        except RuntimeError as e:
            fut.set_result(e)

    loop.call_soon(callback)
    assert "inside a task" in str(await fut)
