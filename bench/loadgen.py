"""An open-loop load generator (asyncio), free of coordinated omission.

The arrival schedule is computed before the run (constant or Poisson, seeded);
each request fires at its planned time whether or not earlier ones finished;
latency is measured from the planned time, so a server that stalls shows up as
latency, not as fewer requests. The send lag (actual minus planned start) is
recorded, and a run whose generator fell behind is flagged. The benchmarks run
it on uvloop: the generator shares the machine's cores with the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

# A generator more than this late on its own schedule is not measuring the server.
MAX_SEND_LAG_S = 0.010


def schedule(rate: float, duration: float, seed: int = 0, kind: str = "poisson") -> list[float]:
    """Planned send offsets (seconds from the start) for `rate` requests/s over `duration`."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    if kind == "constant":
        return [i / rate for i in range(int(math.floor(rate * duration)))]
    if kind != "poisson":
        raise ValueError(f"unknown schedule kind {kind!r}")
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": max(values) if values else None, "n": len(values)}


@dataclass
class Sample:
    target: str
    planned: float          # offset from the run's start
    send_lag: float         # actual send minus planned, seconds
    status: int             # HTTP status, or -1: connection error, -2: timeout
    latency: float | None = None   # end of response minus planned send
    ttft: float | None = None      # first token chunk minus planned send (streaming)
    itl: list[float] = field(default_factory=list)  # gaps between token chunks (streaming)
    tokens: int = 0
    error: str | None = None
    replica: str | None = None     # the gateway's X-Replica-Id: the replica that began the answer
    done: bool = False             # the stream ended with its `data: [DONE]`

    @property
    def ok(self) -> bool:
        return self.status == 200


async def send_completion(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                          headers: dict[str, str], planned_at: float, timeout: float, sample: Sample) -> None:
    """POST one streaming or plain completion; fill `sample` (times from `planned_at`)."""
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
                sample.status = resp.status
                sample.replica = resp.headers.get("X-Replica-Id")
                if not body.get("stream"):
                    data = await resp.read()
                    sample.latency = time.perf_counter() - planned_at
                    if resp.status == 200:
                        sample.tokens = json.loads(data).get("usage", {}).get("completion_tokens", 0)
                    return
                last, usage_tokens = None, None
                async for raw in resp.content:
                    line = raw.strip()
                    if line == b"data: [DONE]":
                        sample.done = True
                        continue
                    if not line.startswith(b"data:"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[5:])
                    if "error" in event:
                        sample.status, sample.error = 599, event["error"].get("message")
                        break
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens")
                    # Every chunk with a choice is a decoding step, its text empty or not (a
                    # token ending inside a UTF-8 character comes with empty text): timed as
                    # vLLM's own benchmark client times it.
                    if event.get("choices"):
                        sample.tokens += 1
                        if last is None:
                            sample.ttft = now - planned_at
                        else:
                            sample.itl.append(now - last)
                        last = now
                sample.latency = time.perf_counter() - planned_at
                # Chunks are not tokens (a token ending inside a UTF-8 character rides
                # with the next one): the usage chunk, when asked for, has the count.
                if usage_tokens is not None:
                    sample.tokens = usage_tokens
    except TimeoutError:
        sample.status, sample.error = -2, f"no answer within {timeout:g}s"
        sample.latency = time.perf_counter() - planned_at
    except aiohttp.ClientError as exc:
        sample.status, sample.error = -1, f"{type(exc).__name__}: {exc}"
        sample.latency = time.perf_counter() - planned_at


async def run(offsets: list[float], send: Callable[[int, float, Sample], Awaitable[None]],
              target_of: Callable[[int], str], *, start: float | None = None,
              stop: asyncio.Event | None = None) -> tuple[list[Sample], float]:
    """Fire request i at offsets[i] (open loop); returns the samples and the run's wall time.

    `start` is the perf_counter time of offset 0 (default: now). Once `stop` is
    set no more requests are fired; those already sent are awaited, never dropped.
    """
    start = time.perf_counter() + 0.05 if start is None else start
    samples: list[Sample] = []
    tasks = []
    for i, offset in enumerate(offsets):
        planned = start + offset
        delay = planned - time.perf_counter()
        if stop is not None:
            try:
                await asyncio.wait_for(stop.wait(), max(delay, 0))
                break
            except TimeoutError:
                pass
        elif delay > 0:
            await asyncio.sleep(delay)
        sample = Sample(target=target_of(i), planned=offset, send_lag=time.perf_counter() - planned, status=0)
        samples.append(sample)
        tasks.append(asyncio.ensure_future(send(i, planned, sample)))
    await asyncio.gather(*tasks)
    return samples, time.perf_counter() - start


def completion_body(max_tokens: int, prompt: str = "the cluster", model: str = "tiny",
                    stream: bool = True) -> dict[str, Any]:
    """A completion of exactly `max_tokens` tokens (ignore_eos), streamed with a usage chunk."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def report(samples: list[Sample], wall: float, offered_rate: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    lags = [s.send_lag for s in samples]
    failures: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            failures[str(s.status)] = failures.get(str(s.status), 0) + 1
    return {
        "requests": len(samples), "ok": len(ok), "failures": failures,
        "offered_rate": offered_rate, "achieved_rate": len(ok) / wall if wall > 0 else None,
        "latency_s": summary([s.latency for s in ok if s.latency is not None]),
        "ttft_s": summary([s.ttft for s in ok if s.ttft is not None]),
        "itl_s": summary([g for s in ok for g in s.itl]),
        "tpot_s": summary([(s.latency - s.ttft) / (s.tokens - 1) for s in ok
                           if s.ttft is not None and s.tokens > 1]),
        "send_lag_s": summary(lags),
        "generator_behind": bool(lags) and max(lags) > MAX_SEND_LAG_S,
    }


def samples_json(samples: list[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]
