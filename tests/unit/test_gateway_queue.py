"""The gateway's queue, without network: beyond the per-replica limit a request
waits for a slot instead of failing, and with no replica at all it does not wait."""

import asyncio

from controller.gateway import Gateway


async def test_a_request_waits_for_a_free_slot_then_gets_one():
    gw = Gateway("127.0.0.1", 0, max_in_flight=1)
    gw.update_replicas([{"replica_id": "r0", "url": "http://10.0.0.1:8000", "state": "READY"}])
    first = await gw._acquire(set())
    first.in_flight += 1
    waiter = asyncio.create_task(gw._acquire(set()))
    await asyncio.sleep(0.05)
    assert not waiter.done() and gw.counts["queued"] == 1  # full: queued, not refused
    first.in_flight -= 1
    gw._notify()
    assert (await asyncio.wait_for(waiter, 1)).replica_id == "r0"


async def test_no_ready_replica_means_no_wait():
    gw = Gateway("127.0.0.1", 0)
    gw.update_replicas([{"replica_id": "r0", "url": "http://10.0.0.1:8000", "state": "STARTING"}])
    assert await asyncio.wait_for(gw._acquire(set()), 1) is None
    assert not gw.can_serve()
    gw.update_replicas([{"replica_id": "r0", "url": "http://10.0.0.1:8000", "state": "READY"}])
    assert gw.can_serve()
    gw.start_draining()
    assert not gw.can_serve()
