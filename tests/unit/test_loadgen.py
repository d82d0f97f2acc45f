"""The load generator: its schedule, its percentile math, and that it is open loop
(a server that stalls shows up as latency, not as fewer requests)."""

import asyncio
import statistics

import numpy as np
import pytest
from aiohttp import web

from bench import loadgen


def test_constant_schedule():
    assert loadgen.schedule(4, 1, kind="constant") == [0, 0.25, 0.5, 0.75]


def test_poisson_schedule_is_seeded_and_has_the_rate_and_shape():
    a = loadgen.schedule(50, 200, seed=3)
    assert a == loadgen.schedule(50, 200, seed=3) and a != loadgen.schedule(50, 200, seed=4)
    assert 9500 < len(a) < 10500
    gaps = np.diff([0.0] + a)
    assert abs(gaps.mean() - 1 / 50) < 0.001
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05  # exponential gaps: coefficient of variation 1
    with pytest.raises(ValueError):
        loadgen.schedule(0, 10)


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0, 2.0], list(np.random.default_rng(1).exponential(1, 1001))])
def test_percentiles_match_numpy(values):
    for q in (0, 50, 95, 99, 100):
        assert loadgen.percentile(list(values), q) == pytest.approx(np.percentile(values, q))
    assert loadgen.percentile([], 50) is None


async def test_a_stalling_server_raises_p99_so_the_generator_is_open_loop():
    # The server answers at once, except that it stalls for 0.5 s once, every request
    # waiting behind the stalled one: an open-loop generator keeps sending on
    # schedule, so the requests planned during the stall carry it as latency; a
    # closed-loop one would just send fewer.
    state = {"n": 0}
    lock = asyncio.Lock()

    async def completions(request):
        async with lock:
            state["n"] += 1
            if state["n"] == 20:
                await asyncio.sleep(0.5)
        return web.json_response({"usage": {"completion_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async def send(i, planned, sample):
                await loadgen.send_completion(session, url, {"prompt": "x"}, {}, planned, 10, sample)

            offsets = loadgen.schedule(50, 2, kind="constant")
            samples, wall = await loadgen.run(offsets, send, lambda i: "server")
    finally:
        await runner.cleanup()
    report = loadgen.report(samples, wall, 50)
    assert report["requests"] == 100 and report["ok"] == 100
    assert report["latency_s"]["p50"] < 0.1
    assert report["latency_s"]["p99"] > 0.3  # the stall is in the figures
    assert statistics.median(s.send_lag for s in samples) < 0.01
