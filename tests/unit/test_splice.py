"""The splice on recorded real vLLM streams: a replica failing at any byte of an
answer (and again inside the continuation) leaves the client the answer an
unbroken stream gives.

The streams are a real engine's (tests/unit/data/record_streams.py made them:
every first leg and every continuation a Splice can ask for). The engine's
bytes arrive in random read sizes, as from a socket.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.serving.splice import CHAT_ROUTE, COMPLETIONS_ROUTE, DONE, EventReader, Splice, why_not_continuable
from tests.unit.data.record_streams import key

DATA = Path(__file__).parent / "data" / "vllm_streams.json.gz"


@cache
def recorded() -> dict[str, Any]:
    return json.loads(gzip.decompress(DATA.read_bytes()))


def variants() -> list[dict[str, Any]]:
    return recorded()["variants"]


def engine_bytes(route: str, body: dict[str, Any]) -> bytes:
    stream = recorded()["streams"].get(key(route, body))
    assert stream is not None, (
        f"the splice asked for a request the recorder did not predict (re-record, or the splice changed): "
        f"{route} {json.dumps(body, sort_keys=True)}")
    return stream.encode("utf-8")


@dataclass
class Served:
    splice: Splice
    client: bytes  # what a streaming client got


def serve(variant: dict[str, Any], cuts: list[int | None], reads: list[int]) -> Served:
    """Feed a Splice as the gateway does. `cuts[i]`: the byte of leg i's stream
    at which its replica fails (None, or no entry: it does not)."""
    sp = Splice(variant["route"], variant["body"])
    route, body = sp.next_request()
    client, leg, read = b"", 0, 0
    while True:
        raw = engine_bytes(route, body)
        cut = cuts[leg] if leg < len(cuts) else None
        data = raw if cut is None else raw[:cut]
        reader, at = EventReader(), 0
        while at < len(data):
            size = reads[read % len(reads)]
            read += 1
            for event in reader.feed(data[at:at + size]):
                client += sp.on_event(event)
            at += size
        if cut is None:
            assert sp.done and not reader.pending()
            return Served(sp, client)
        assert not sp.done  # a cut before the stream's end: [DONE] never arrived
        leg += 1
        if sp.finished():
            if sp.client_streams:
                client += sp.closing()
            return Served(sp, client)
        route, body = sp.next_request()


# -- what a streaming client sees ----------------------------------------------------------

@dataclass
class Seen:
    events: list[dict[str, Any]]
    text: str
    finish: list[tuple[str, Any]]  # (finish_reason, stop_reason) of each choice that ends
    ids: list[int]
    prompt_ids: list[list[int]]
    logprobs: dict[str, list[Any]]
    usage: list[dict[str, Any]]  # the usage-only events' usage
    # continuous_usage_stats: (prompt, completion tokens, text length so far) of each event with text and usage
    progress: list[tuple[int, int, int]]


def seen(sp: Splice, client: bytes) -> Seen:
    assert client.endswith(DONE), client[-200:]
    assert client.count(DONE) == 1
    parts = client.split(b"\n\n")
    assert parts[-1] == b"" and parts[-2] == b"data: [DONE]"
    events = []
    for part in parts[:-2]:
        assert part.startswith(b"data: ") and b"\n" not in part, part
        events.append(json.loads(part[6:]))
    assert events
    text, finish, ids, prompt_ids, usage, progress = "", [], [], [], [], []
    logprobs: dict[str, list[Any]] = {"content": []} if sp.chat else \
        {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    first = events[0]
    for event in events:
        assert {k: event[k] for k in ("id", "created", "model")} == {k: first[k] for k in ("id", "created", "model")}
        assert event["object"] == ("chat.completion.chunk" if sp.chat else "text_completion")
        if sp.chat and event.get("prompt_token_ids") is not None:
            prompt_ids.append(event["prompt_token_ids"])
        for choice in event["choices"]:
            assert choice["index"] == 0
            text += (choice["delta"].get("content") or "") if sp.chat else choice["text"]
            if choice["finish_reason"] is not None:
                finish.append((choice["finish_reason"], choice.get("stop_reason")))
            if choice.get("token_ids") is not None:
                ids.extend(choice["token_ids"])
            if not sp.chat and choice.get("prompt_token_ids") is not None:
                prompt_ids.append(choice["prompt_token_ids"])
            if choice.get("logprobs") is not None:
                for k in logprobs:
                    logprobs[k].extend(choice["logprobs"][k])
        if not event["choices"]:
            assert event.get("usage") is not None, event
            usage.append(event["usage"])
        elif event.get("usage") is not None:
            progress.append((event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"], len(text)))
    if not sp.client_ids:
        assert not ids and not prompt_ids  # null in every event: vLLM's shape without return_token_ids
        for event in events:
            assert event.get("prompt_token_ids") is None
            for choice in event["choices"]:
                assert choice.get("token_ids") is None and choice.get("prompt_token_ids") is None
    if sp.chat:
        assert sum(1 for e in events for c in e["choices"] if "role" in c["delta"]) == 1
        assert "role" in events[0]["choices"][0]["delta"]
    return Seen(events, text, finish, ids, prompt_ids, logprobs, usage, progress)


def counts(usage: dict[str, Any]) -> tuple[int, int, int]:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


def check_stream(sp: Splice, client: bytes, whole: Seen) -> None:
    got = seen(sp, client)
    assert got.text == whole.text
    assert got.finish == whole.finish and len(got.finish) == 1
    assert got.ids == whole.ids
    assert got.prompt_ids == whole.prompt_ids
    assert got.logprobs == whole.logprobs
    # each event's running usage is the unbroken answer's at the same point of its text
    assert set(got.progress) <= set(whole.progress) and got.progress[-1:] == whole.progress[-1:]
    assert bool(whole.progress) == bool((sp.body.get("stream_options") or {}).get("continuous_usage_stats"))
    if sp.client_usage:
        assert len(got.usage) == 1 and counts(got.usage[0]) == counts(whole.usage[0])
        assert got.events[-1]["usage"] is not None and not got.events[-1]["choices"]  # the usage event is last
    else:
        assert not got.usage and all(e.get("usage") is None for e in got.events)


def check_answer(sp: Splice, whole: dict[str, Any]) -> None:
    got = sp.answer()
    assert {k: got[k] for k in ("id", "object", "created", "model")} == \
        {k: whole[k] for k in ("id", "object", "created", "model")}
    (choice,), (want,) = got["choices"], whole["choices"]
    field = "message" if sp.chat else "text"
    assert choice[field] == want[field]
    for k in ("finish_reason", "stop_reason", "logprobs", "token_ids", "prompt_token_ids"):
        assert choice.get(k) == want.get(k), k
    assert got.get("prompt_token_ids") == whole.get("prompt_token_ids")
    assert counts(got["usage"]) == counts(whole["usage"])


@cache
def unbroken(index: int) -> tuple[Splice, bytes]:
    served = serve(variants()[index], [], [1 << 30])
    return served.splice, served.client


@cache
def unbroken_seen(index: int) -> Seen:
    return seen(*unbroken(index))


def first_leg(variant: dict[str, Any]) -> bytes:
    return engine_bytes(*Splice(variant["route"], variant["body"]).next_request())


# -- the recordings themselves ---------------------------------------------------------------

def test_recordings_cover_what_the_splice_must_handle():
    names = {v["name"] for v in variants()}
    assert len(names) == len(variants()) >= 10
    empty_text = {CHAT_ROUTE: 0, COMPLETIONS_ROUTE: 0}
    for i, v in enumerate(variants()):
        assert why_not_continuable(v["route"], v["body"]) is None, v["name"]
        sp, client = unbroken(i)
        assert sp.leg == 0 and sp.finished() and sp.done
        assert sp.prompt_ids and sp.generated
        if sp.client_usage:
            assert (len(sp.prompt_ids), len(sp.generated)) == (sp.usage["prompt_tokens"], sp.usage["completion_tokens"])
        else:
            assert sp.usage is None
        for e in EventReader().feed(first_leg(v))[:-2]:
            for c in json.loads(e)["choices"]:
                text = c["delta"].get("content") if sp.chat else c["text"]
                empty_text[v["route"]] += len(c.get("token_ids") or []) == 1 and not text
    # tokens that end inside a UTF-8 character (no text: the clean-cut logic's case), chat and completions
    assert all(empty_text.values()), empty_text
    assert {unbroken(i)[0].finish_reason for i in range(len(variants()))} == {"length", "stop"}


@pytest.mark.parametrize("index", range(len(variants())), ids=[v["name"] for v in variants()])
def test_unbroken_answer_is_the_engines(index):
    """Without a failure the client gets the engine's stream, token ids nulled
    unless it asked for them (and its JSON answer when it did not stream)."""
    v = variants()[index]
    sp, client = unbroken(index)
    raw = first_leg(v)
    if not sp.client_streams:
        assert client == b""
        engine = [json.loads(e) for e in EventReader().feed(raw) if e != b"[DONE]"]
        answer = sp.answer()
        content = "".join((c["delta"].get("content") or "") if sp.chat else c["text"]
                          for e in engine for c in e["choices"])
        assert (answer["choices"][0]["message"]["content"] if sp.chat else answer["choices"][0]["text"]) == content
        assert answer["usage"] == engine[-1]["usage"]
        assert answer["id"] == engine[0]["id"]
        return
    if sp.client_ids:
        assert client == raw
        return
    assert client.count(b"\n\n") == raw.count(b"\n\n")
    for got, want in zip(EventReader().feed(client), EventReader().feed(raw), strict=True):
        if want == b"[DONE]":
            assert got == want
            continue
        assert json.loads(got) == nulled(json.loads(want))


def nulled(event: dict[str, Any]) -> dict[str, Any]:
    """An event as vLLM writes it without return_token_ids: the ids null."""
    ids = ("token_ids", "prompt_token_ids")
    return {**{k: None if k in ids else v for k, v in event.items()},
            "choices": [{k: None if k in ids else v for k, v in c.items()} for c in event["choices"]]}


# -- failures -------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_failure_anywhere_leaves_the_unbroken_answer(data):
    index = data.draw(st.integers(0, len(variants()) - 1), label="variant")
    v = variants()[index]
    raw = first_leg(v)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    reads = data.draw(st.lists(st.integers(1, 600), min_size=1, max_size=8), label="reads")
    served = serve(v, [cut], reads)
    check(index, served)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_second_failure_in_the_continuation(data):
    index = data.draw(st.integers(0, len(variants()) - 1), label="variant")
    v = variants()[index]
    raw = first_leg(v)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    reads = data.draw(st.lists(st.integers(1, 600), min_size=1, max_size=8), label="reads")
    # the second leg's length: known once the first cut is served
    probe = Splice(v["route"], v["body"])
    probe.next_request()
    for e in EventReader().feed(raw[:cut]):
        probe.on_event(e)
    if probe.finished():
        served = serve(v, [cut], reads)
    else:
        second = engine_bytes(*probe.next_request())
        cut2 = data.draw(st.integers(0, len(second) - 1), label="cut2")
        served = serve(v, [cut, cut2], reads)
    check(index, served)


def check(index: int, served: Served) -> None:
    sp = served.splice
    whole_sp = unbroken(index)[0]
    if sp.client_streams:
        check_stream(sp, served.client, unbroken_seen(index))
    else:
        assert served.client == b""
        check_answer(sp, whole_sp.answer())
    assert sp.generated == whole_sp.generated
    assert sp.prompt_ids == whole_sp.prompt_ids


@pytest.mark.parametrize("index", range(len(variants())), ids=[v["name"] for v in variants()])
def test_every_event_boundary_cut(index):
    """Deterministic sweep: a failure right after each event of the first leg."""
    v = variants()[index]
    raw = first_leg(v)
    ends = [i + 2 for i in range(len(raw)) if raw.startswith(b"\n\n", i)]
    for end in [0, *ends[:-1]]:
        check(index, serve(v, [end], [1 << 30]))


# -- why_not_continuable ---------------------------------------------------------------------

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
COMP = {"model": "tiny", "prompt": "hi", "max_tokens": 8}


@pytest.mark.parametrize("route,body", [
    (CHAT_ROUTE, CHAT),
    (CHAT_ROUTE, {**CHAT, "stream": True, "logprobs": True, "n": 1, "tool_choice": "none"}),
    (CHAT_ROUTE, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}),
    (CHAT_ROUTE, {**CHAT, "response_format": {"type": "text"}, "stop": [], "guided_json": None}),
    (COMPLETIONS_ROUTE, COMP),
    (COMPLETIONS_ROUTE, {**COMP, "prompt": [1, 2, 3], "echo": False, "logprobs": 2}),
])
def test_plain_requests_are_continuable(route, body):
    assert why_not_continuable(route, body) is None


@pytest.mark.parametrize("route,body", [
    ("/v1/embeddings", {"model": "tiny", "input": "hi"}),
    (CHAT_ROUTE, {**CHAT, "n": 2}),
    (COMPLETIONS_ROUTE, {**COMP, "n": 3}),
    (COMPLETIONS_ROUTE, {**COMP, "best_of": 2}),
    (CHAT_ROUTE, {**CHAT, "use_beam_search": True}),
    (CHAT_ROUTE, {**CHAT, "guided_json": {"type": "object"}}),
    (COMPLETIONS_ROUTE, {**COMP, "guided_regex": "a+"}),
    (CHAT_ROUTE, {**CHAT, "structured_outputs": {"json": {"type": "object"}}}),
    (CHAT_ROUTE, {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
    (CHAT_ROUTE, {**CHAT, "response_format": {"type": "json_object"}}),
    (CHAT_ROUTE, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    (CHAT_ROUTE, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}),
    (COMPLETIONS_ROUTE, {**COMP, "echo": True}),
    (COMPLETIONS_ROUTE, {**COMP, "suffix": "end"}),
    (COMPLETIONS_ROUTE, {**COMP, "prompt_logprobs": 1}),
    (CHAT_ROUTE, {**CHAT, "stop": ["\n"]}),
    (COMPLETIONS_ROUTE, {**COMP, "stop": "end"}),
    (COMPLETIONS_ROUTE, {**COMP, "prompt": ["a", "b"]}),
    (COMPLETIONS_ROUTE, {**COMP, "prompt": [[1, 2], [3]]}),
    (CHAT_ROUTE, {**CHAT, "logprobs": True, "top_logprobs": 2}),
])
def test_what_cannot_be_continued_says_why(route, body):
    reason = why_not_continuable(route, body)
    assert isinstance(reason, str) and reason


# -- EventReader -------------------------------------------------------------------------------

STREAM = (b'data: {"a":1}\n\n: keep-alive\n\ndata:{"b":"x\xc3\xa9"}\n\n'
          b'data: {"c":"two\\n\\nlines"}\n\ndata: [DONE]\n\n')
PAYLOADS = [b'{"a":1}', b'{"b":"x\xc3\xa9"}', b'{"c":"two\\n\\nlines"}', b"[DONE]"]


def test_event_reader_whole_stream():
    reader = EventReader()
    assert reader.feed(STREAM) == PAYLOADS
    assert not reader.pending()


@pytest.mark.parametrize("at", range(1, len(STREAM)))
def test_event_reader_any_split(at):
    reader = EventReader()
    out = reader.feed(STREAM[:at])
    assert out == PAYLOADS[:len(out)]
    assert reader.pending() == (not STREAM[:at].endswith(b"\n\n"))
    assert out + reader.feed(STREAM[at:]) == PAYLOADS
    assert not reader.pending()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_event_reader_random_reads(sizes):
    reader, out, at, i = EventReader(), [], 0, 0
    while at < len(STREAM):
        size = sizes[i % len(sizes)]
        out += reader.feed(STREAM[at:at + size])
        at, i = at + size, i + 1
    assert out == PAYLOADS


def test_event_reader_partial_event_is_pending():
    reader = EventReader()
    assert reader.feed(b'data: {"a"') == []
    assert reader.pending()
    assert reader.feed(b":1}\n") == []
    assert reader.feed(b"\n") == [b'{"a":1}']
    assert not reader.pending()
