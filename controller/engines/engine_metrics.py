"""An engine's own word on its progress: the token counters and queue gauges of
vLLM's Prometheus `/metrics`.

A busy engine is alive: its generation or prompt token counter grows even when
a probe or a stream waits behind a long queue. vLLM keeps these counters only
with stats logging on (the engine is started without `--disable-log-stats`).
Only the four lines needed are parsed; every label set (one per engine core)
is summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import aiohttp

# Prometheus sample name -> EngineCounters field. A counter's `_created` sample
# and vLLM's other metrics (`..._by_source_total`, `..._by_reason`) are other names.
_SAMPLES = {
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}


@dataclass(frozen=True)
class EngineCounters:
    generation_tokens: float
    prompt_tokens: float
    running: float
    waiting: float

    def advanced_since(self, other: EngineCounters) -> bool:
        """Tokens were generated or prompts prefilled between `other` and this reading."""
        return self.generation_tokens > other.generation_tokens or self.prompt_tokens > other.prompt_tokens


def parse_counters(text: str) -> EngineCounters | None:
    """The counters in a Prometheus text page, or None when one of them is missing
    or unreadable (stats logging off, not a vLLM page)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("vllm:"):
            continue  # comments (# HELP, # TYPE), blank lines, other metrics
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1:]  # a label value may hold "}"
        else:
            name, _, rest = line.partition(" ")
        field = _SAMPLES.get(name.strip())
        if field is None:
            continue
        try:
            value = float(rest.split()[0])  # "value [timestamp]"
        except (IndexError, ValueError):
            return None
        sums[field] = sums.get(field, 0.0) + value
    if len(sums) < len(_SAMPLES):
        return None
    return EngineCounters(**sums)


async def read_counters(session: aiohttp.ClientSession, base_url: str, timeout: float,
                        headers: Mapping[str, str] | None = None) -> EngineCounters:
    """GET `base_url`/metrics and parse it. Raises aiohttp.ClientError or
    asyncio.TimeoutError when it cannot be fetched, ValueError when the engine
    answered other than 200 or without the counters."""
    async with session.get(base_url.rstrip("/") + "/metrics", headers=headers,
                           timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise ValueError(f"{base_url}/metrics answered {resp.status}")
        counters = parse_counters(await resp.text())
    if counters is None:
        raise ValueError(f"{base_url}/metrics has no vLLM token counters (stats logging off?)")
    return counters
