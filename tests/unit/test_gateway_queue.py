"""The gateway's queue, without network: beyond the per-replica limit a request
waits for a slot instead of failing, and with no replica at all it does not wait."""

import asyncio

from aiohttp import web

from controller.cluster.records import ReplicaState, ReplicaStatus
from controller.serving.gateway import Gateway


async def test_a_request_waits_for_a_free_slot_then_gets_one():
    gw = Gateway("127.0.0.1", 0, max_in_flight=1)
    gw.update_replicas([ReplicaStatus("r0", None, "http://10.0.0.1:8000", ReplicaState("READY"))])
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
    gw.update_replicas([ReplicaStatus("r0", None, "http://10.0.0.1:8000", ReplicaState("STARTING"))])
    assert await asyncio.wait_for(gw._acquire(set()), 1) is None
    assert not gw.can_serve()
    gw.update_replicas([ReplicaStatus("r0", None, "http://10.0.0.1:8000", ReplicaState("READY"))])
    assert gw.can_serve()
    gw.start_draining()
    assert not gw.can_serve()


async def _health_server(port: int = 0) -> tuple[web.AppRunner, int]:
    app = web.Application()
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def test_an_idle_replica_that_stops_answering_is_marked_within_an_interval_and_cleared_when_back():
    runner, port = await _health_server()
    signals: list[str] = []
    gw = Gateway("127.0.0.1", 0, on_unhealthy=lambda reason, since: signals.append(reason),
                 liveness_interval=0.05)
    await gw.start()
    try:
        gw.update_replicas([ReplicaStatus("r0", None, f"http://127.0.0.1:{port}", ReplicaState("READY"))])
        await asyncio.sleep(0.3)
        assert gw.failure() is None and not signals  # answering: nothing marked
        await runner.cleanup()  # the engine is gone: its port refuses
        for _ in range(40):
            if gw.failure():
                break
            await asyncio.sleep(0.05)
        assert gw.failure() and "health check" in gw.failure() and len(signals) == 1
        assert not gw.can_serve()
        runner, _ = await _health_server(port)  # back on the same port
        for _ in range(40):
            if gw.failure() is None:
                break
            await asyncio.sleep(0.05)
        assert gw.failure() is None and gw.can_serve()
    finally:
        await gw.stop()
        await runner.cleanup()


async def test_a_request_waits_for_a_marked_but_ready_replica_to_clear_rather_than_get_a_503():
    gw = Gateway("127.0.0.1", 0)
    gw.update_replicas([ReplicaStatus("r0", None, "http://10.0.0.1:8000", ReplicaState("READY"))])
    gw.pool.mark_unhealthy("r0", "ConnectionTimeoutError (the head's own loop was late)")
    waiter = asyncio.create_task(gw._acquire(set()))
    await asyncio.sleep(0.1)
    assert not waiter.done() and gw.counts["waited_for_marked"] >= 1
    gw.pool.clear("r0")  # the /health watch finds it answering
    gw._notify()
    assert (await asyncio.wait_for(waiter, 1)).replica_id == "r0"
    # A replica it already tried, or no READY one at all, is not waited for.
    gw.pool.mark_unhealthy("r0", "reset")
    assert await asyncio.wait_for(gw._acquire({"r0"}), 1) is None
    gw.update_replicas([ReplicaStatus("r0", None, "http://10.0.0.1:8000", ReplicaState("RESTARTING"))])
    assert await asyncio.wait_for(gw._acquire(set()), 1) is None
