"""The router queue: slots, a bounded wait line, 429 when full."""

import asyncio

import pytest

from router.admission import Admission
from router.errors import InvalidRequest, QueueFull


async def test_requests_wait_in_order_and_the_queue_overflows_into_429():
    adm = Admission(max_running=2, max_queue=1)
    order = []
    release = asyncio.Event()

    async def request(name, n=1):
        async with adm.admit(n) as waited:
            order.append((name, waited > 0))
            await release.wait()

    a = asyncio.create_task(request("a"))
    b = asyncio.create_task(request("b"))
    await asyncio.sleep(0)
    assert adm.num_running == 2 and adm.num_waiting == 0
    c = asyncio.create_task(request("c"))
    await asyncio.sleep(0)
    assert adm.num_waiting == 1
    with pytest.raises(QueueFull):            # the line is full: refused at once
        async with adm.admit():
            pass
    release.set()
    await asyncio.gather(a, b, c)
    assert order == [("a", False), ("b", False), ("c", True)]
    assert adm.num_running == 0 and adm.num_waiting == 0


async def test_a_cancelled_waiter_leaves_the_line_without_taking_slots():
    adm = Admission(max_running=1, max_queue=4)
    hold = asyncio.Event()

    async def holder():
        async with adm.admit():
            await hold.wait()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)

    async def waiter():
        async with adm.admit():
            pass

    w = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    assert adm.num_waiting == 1
    w.cancel()                                # the client went away while queued
    await asyncio.gather(w, return_exceptions=True)
    assert adm.num_waiting == 0
    hold.set()
    await h
    assert adm.num_running == 0


async def test_a_request_of_n_samples_takes_n_slots_and_cannot_exceed_the_total():
    adm = Admission(max_running=4, max_queue=0)
    async with adm.admit(3):
        assert adm.num_running == 3
        with pytest.raises(QueueFull):        # 2 more do not fit and nobody may wait
            adm.check(2)
        adm.check(1)
    with pytest.raises(InvalidRequest):
        adm.check(5)
