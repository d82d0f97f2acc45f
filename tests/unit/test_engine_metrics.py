"""An engine's token counters, read from vLLM's Prometheus text."""

import aiohttp
import pytest
from aiohttp import web

from controller.engines.engine_metrics import EngineCounters, parse_counters, read_counters

# As vLLM 0.32's API server writes it (abridged): HELP/TYPE comments, each counter's
# `_created` sample, neighbours whose names begin alike, and two engine cores.
VLLM_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 11093.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_running{engine="1",model_name="tiny"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting, by reason.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 3.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 42.0
vllm:prompt_tokens_total{engine="1",model_name="tiny"} 8.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="tiny"} 1.7612345678e+09
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_compute"} 40.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 15.0
vllm:generation_tokens_total{engine="1",model_name="tiny"} 5.0
vllm:generation_tokens_created{engine="0",model_name="tiny"} 1.7612345678e+09
"""


def test_parse_sums_every_engine_and_ignores_neighbours():
    assert parse_counters(VLLM_METRICS) == EngineCounters(
        generation_tokens=20.0, prompt_tokens=50.0, running=3.0, waiting=3.0)


def test_parse_reads_unlabelled_samples_timestamps_and_odd_label_values():
    text = ('vllm:generation_tokens_total 7.0 1700000000000\n'
            'vllm:prompt_tokens_total{model_name="a } b"} 3\n'
            'vllm:num_requests_running 1\n'
            'vllm:num_requests_waiting{engine="0"} 0.0\n')
    assert parse_counters(text) == EngineCounters(7.0, 3.0, 1.0, 0.0)


@pytest.mark.parametrize("missing", ["vllm:generation_tokens_total", "vllm:prompt_tokens_total",
                                     "vllm:num_requests_running", "vllm:num_requests_waiting"])
def test_a_missing_metric_gives_none(missing):
    text = "\n".join(line for line in VLLM_METRICS.splitlines() if not line.startswith(missing + "{"))
    assert parse_counters(text) is None


def test_not_a_vllm_page_or_a_broken_value_gives_none():
    assert parse_counters("") is None
    assert parse_counters("<html>not found</html>") is None  # stats logging off: no vllm: metrics
    assert parse_counters(VLLM_METRICS.replace("} 15.0", "} lots")) is None


def test_advanced_since_means_tokens_generated_or_prefilled():
    before = EngineCounters(generation_tokens=10, prompt_tokens=5, running=1, waiting=0)
    assert not before.advanced_since(before)
    assert EngineCounters(11, 5, 1, 0).advanced_since(before)
    assert EngineCounters(10, 6, 1, 0).advanced_since(before)
    assert not EngineCounters(10, 5, 4, 9).advanced_since(before)  # queues alone are no progress
    assert not EngineCounters(0, 0, 0, 0).advanced_since(before)  # a restarted engine counts from zero


async def _serve(status: int, text: str) -> tuple[web.AppRunner, str, list]:
    seen = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=status, text=text)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", seen


async def test_read_counters_gets_and_parses_the_engines_metrics():
    runner, url, seen = await _serve(200, VLLM_METRICS)
    try:
        async with aiohttp.ClientSession() as http:
            counters = await read_counters(http, url + "/", 2.0, headers={"Authorization": "Bearer k"})
    finally:
        await runner.cleanup()
    assert counters.generation_tokens == 20.0
    assert seen[0]["Authorization"] == "Bearer k"


@pytest.mark.parametrize("status,text", [(500, "boom"), (200, "# no vllm metrics here\n")])
async def test_read_counters_raises_on_an_error_or_a_page_without_counters(status, text):
    runner, url, _ = await _serve(status, text)
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(ValueError):
                await read_counters(http, url, 2.0)
    finally:
        await runner.cleanup()
