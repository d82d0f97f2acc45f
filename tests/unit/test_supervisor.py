"""The engine supervisor's generation probe: a busy engine is never restarted, a
stalled one is. The engine and its counters are fakes handed in; no process starts."""

import asyncio

import aiohttp
import pytest
from structlog.testing import capture_logs

from controller.engines import supervisor as supervisor_module
from controller.engines.engine import EngineFailed, EngineSpec
from controller.engines.engine_metrics import EngineCounters
from controller.engines.supervisor import EngineSupervisor

SPEC = EngineSpec(model="m", served_name="m", host="127.0.0.1", port=8000)


class Engine:
    """What the supervisor sees of one engine: its probes fail while `probe_error` is
    set; its counters advance while it is `busy`; they cannot be read while `mute`."""

    def __init__(self) -> None:
        self.probe_error: str | None = "generation probe failed: TimeoutError: "
        self.busy = False
        self.mute = False
        self.tokens = 100.0
        self.reads: list[tuple[str, float]] = []
        self.lifetimes = 0

    async def read_counters(self, http: aiohttp.ClientSession, url: str, timeout: float) -> EngineCounters:
        self.reads.append((url, timeout))
        if self.mute:
            raise aiohttp.ClientConnectionError("connection refused")
        if self.busy:
            self.tokens += 7
        return EngineCounters(generation_tokens=self.tokens, prompt_tokens=50.0, running=4.0, waiting=2.0)


class FakeProcess:
    """EngineProcess's interface: started and ready at once, probed through `Engine`."""

    def __init__(self, engine: Engine, spec: EngineSpec, replica_id: str, echo: bool = True, first_seq: int = 0):
        self.engine, self.url, self.seq, self.pid = engine, spec.url, first_seq, 4242

    async def start(self) -> None:
        self.engine.lifetimes += 1

    async def wait_ready(self, timeout: float) -> None:
        pass

    def exit_reason(self) -> str | None:
        return None

    async def probe(self, timeout: float = 10.0, **kwargs) -> str | None:
        return self.engine.probe_error

    async def stop(self, grace: float = 10.0) -> set[int]:
        return set()


@pytest.fixture
def engine(monkeypatch) -> Engine:
    engine = Engine()
    monkeypatch.setattr(supervisor_module, "EngineProcess", lambda *a, **kw: FakeProcess(engine, *a, **kw))
    monkeypatch.setattr(supervisor_module, "WATCH_TICK_S", 0.001)
    return engine


def supervisor(engine: Engine, threshold: int = 2) -> EngineSupervisor:
    sup = EngineSupervisor("replica-a", lambda: SPEC, probe_interval=0.001, probe_threshold=threshold,
                           read_counters=engine.read_counters)
    sup.engine = FakeProcess(engine, SPEC, "replica-a")
    return sup


async def test_a_failed_probe_while_tokens_flow_is_not_counted(engine):
    engine.busy = True
    sup = supervisor(engine)
    with capture_logs() as logs:
        failures = [(await sup._probe(f))[0] for f in (0, 1, 0)]
    # The first failure has no earlier reading to compare with: it counts.
    assert failures == [1, 0, 0]
    events = [e for e in logs if e["event"] == "generation_probe_failed"]
    assert [(e["busy"], e["failures"]) for e in events] == [(False, 1), (True, 0), (True, 0)]
    assert engine.reads == [("http://127.0.0.1:8000", 2.0)] * 3


async def test_a_stalled_engine_counts_every_failure(engine):
    sup = supervisor(engine)
    assert (await sup._probe(0))[0] == 1
    assert (await sup._probe(1)) == (2, engine.probe_error)  # counters did not move


async def test_unreadable_counters_count_the_failure(engine):
    engine.busy, engine.mute = True, True
    sup = supervisor(engine)
    with capture_logs() as logs:
        assert (await sup._probe(0))[0] == 1
        assert (await sup._probe(1))[0] == 2
    assert any(e["event"] == "engine_counters_unreadable" for e in logs)


async def test_a_good_probe_resets_and_reads_nothing(engine):
    engine.probe_error = None
    sup = supervisor(engine)
    assert await sup._probe(1) == (0, None)
    assert engine.reads == []


async def test_a_busy_engine_is_never_restarted(engine):
    engine.busy = True
    sup = supervisor(engine)
    watch = asyncio.create_task(sup._watch())
    while len(engine.reads) < 20:
        await asyncio.sleep(0.005)
        assert not watch.done(), watch.result()
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)


async def test_a_stalled_engine_ends_its_lifetime_and_the_next_one_starts_afresh(engine):
    sup = supervisor(engine)
    with pytest.raises(EngineFailed, match="generation probe failed 2 times in a row"):
        await asyncio.wait_for(sup._run_once(), 5)
    assert engine.lifetimes == 1 and sup._counters is not None
    # A new engine: its counters are not compared with the old one's (a restarted
    # engine counts from zero; here it reads higher, which must not pass for progress).
    engine.tokens += 1000
    sup.probe_threshold = 1
    reads = len(engine.reads)
    with pytest.raises(EngineFailed, match="failed 1 times"):
        await asyncio.wait_for(sup._run_once(), 5)
    assert engine.lifetimes == 2
    assert len(engine.reads) == reads + 1  # its first failed probe counted at once
