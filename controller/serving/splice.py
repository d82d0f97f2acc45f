"""One client answer from one or more engine streams: the splice.

The gateway asks every engine for a stream with the token ids
(`return_token_ids`), whether or not the client asked for a stream or for the
ids. A `Splice` reads those events, keeps what a continuation needs (the
prompt's token ids and every generated token id) and turns each event into
what the client gets:

- a stream, byte for byte as vLLM would have sent it without the token ids
  (vLLM writes `"token_ids": null` then, so the ids are nulled, not removed);
- or, for a client that did not ask for a stream, one JSON answer built at
  the end.

When the replica fails, `continuation_body()` is the remainder as a
`/v1/completions` request: the prompt plus the tokens already generated, as
token ids, `max_tokens` (and `min_tokens`) lowered by what was produced, the
same sampling parameters. The continuation's events are spliced into the same
answer: the first answer's `id`, `created` and `model`, no second role chunk,
chat shape for a chat client, and usage that counts the prompt once and every
completion token once. At temperature 0 the text is the text of an unbroken
answer.

Pure: no I/O, no clock. The gateway owns the sockets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
DONE = b"data: [DONE]\n\n"
# A JSON string never holds an unescaped quote, so `,"token_ids":[` can only be a key.
_TOKEN_IDS = re.compile(rb'"(prompt_)?token_ids":\[[0-9, ]*\]')
# Sampling parameters a /v1/completions continuation takes over from a chat request.
_CHAT_SAMPLING = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "frequency_penalty",
                  "presence_penalty", "repetition_penalty", "length_penalty", "stop_token_ids", "ignore_eos",
                  "logit_bias", "allowed_token_ids", "bad_words", "skip_special_tokens",
                  "spaces_between_special_tokens", "user", "priority", "cache_salt", "return_tokens_as_token_ids",
                  "vllm_xargs")
# What a completions continuation must not take over from the first request.
# (truncate_prompt_tokens: it would cut the prompt plus the tokens made, not the prompt.)
_NOT_CARRIED = ("prompt", "max_tokens", "min_tokens", "stream", "stream_options", "return_token_ids", "n",
                "echo", "suffix", "truncate_prompt_tokens")
# A stream without an event end this long is not an engine's: the gateway stops reading it.
MAX_EVENT_BYTES = 8 * 2**20


_FIELD_TYPES = (("stream_options", dict), ("response_format", dict), ("messages", list), ("max_tokens", int),
                ("max_completion_tokens", int), ("min_tokens", int), ("n", int), ("stop", (str, list)))


def why_not_continuable(route: str, body: dict[str, Any]) -> str | None:
    """Why a request cannot be continued on another replica (None: it can).

    Such requests are still served; a failure mid-answer ends them with an error
    event that says this.
    """
    if route not in (CHAT_ROUTE, COMPLETIONS_ROUTE):
        return "not a generation route"
    if any(key in body and not isinstance(body[key], kind) for key, kind in _FIELD_TYPES):
        return "it has fields of unexpected types (the engine answers them)"
    if body.get("truncate_prompt_tokens") is not None:
        return "it truncates its prompt (a continuation's prompt holds the tokens made too)"
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1 or body.get("use_beam_search"):
        return "it asks for several choices (n, best_of or beam search)"
    if any(key.startswith("guided_") and body[key] not in (None, False, "") for key in body) \
            or body.get("structured_outputs") or (body.get("response_format") or {}).get("type", "text") != "text":
        return "it uses guided decoding or structured output"
    if body.get("tools") and body.get("tool_choice") != "none":
        return "it offers tools (a forced schema or a tool parser's state)"
    if body.get("echo") or body.get("prompt_logprobs") or body.get("suffix"):
        return "it asks for the prompt back (echo, suffix or prompt_logprobs)"
    if body.get("stop"):
        # vLLM holds text back while it might begin a stop string: the tokens run
        # ahead of the text, and a continuation from the tokens would lose that text.
        return "it has stop strings"
    if route == COMPLETIONS_ROUTE:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
            return "its prompt is not one prompt (a batch)"
    if route == CHAT_ROUTE and any(isinstance(m, dict) and isinstance(m.get("content"), list) and any(
            isinstance(p, dict) and p.get("type") not in (None, "text") for p in m["content"])
            for m in body.get("messages") or []):
        return "it has images or audio (their tokens cannot be replayed without them)"
    if route == CHAT_ROUTE and body.get("logprobs") and body.get("top_logprobs"):
        # A completion's top_logprobs is a map keyed by the token's text: two tokens
        # of the same text are one entry there and two in a chat answer.
        return "it asks for chat top_logprobs"
    return None


@dataclass
class Splice:
    """The state of one client request across the engine streams that answer it."""

    route: str
    body: dict[str, Any]
    # Set by the gateway when the request cannot be continued: why.
    not_continuable: str | None = None
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    # The stream now being read: 0 the first engine, 1.. continuations.
    leg: int = 0
    # The generated tokens when the current leg began (its own counts start at 0).
    leg_base: int = 0
    text_chars: int = 0
    chunks: int = 0  # choices the engines sent: progress, whatever they carry
    # The last clean cut: tokens, text and logprob-token characters up to the last
    # chunk of one token with text. A token that ends inside a UTF-8 character
    # comes with no text (vLLM holds its bytes back); a continuation from there
    # would start mid-character, so it starts from the clean cut and the client is
    # not sent again what it already has (the `skip_*` counts).
    clean: int = 0
    clean_chars: int = 0
    token_chars: int = 0
    clean_token_chars: int = 0
    skip_ids: int = 0
    skip_chars: int = 0
    offset_at: int = 0  # a continuation's next logprob text offset
    identity: dict[str, Any] | None = None  # id, created, model of the first event the client got
    finish_reason: str | None = None
    usage_sent: bool = False
    done: bool = False
    # Non-streamed answers: the parts of the JSON built at the end.
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    stop_reason: Any = None
    usage: dict[str, Any] | None = None
    fingerprint: str | None = None
    # An error event the engine sent (a 4xx of the request, passed on as is).
    engine_error: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.chat = self.route == CHAT_ROUTE
        self.client_streams = bool(self.body.get("stream"))
        self.client_ids = bool(self.body.get("return_token_ids"))
        # At temperature 0 the tokens past a clean cut come again the same: a
        # continuation may start there. A sampled answer must go on from every token
        # the client has (a partial UTF-8 character at the seam is the lesser harm).
        self.greedy = self.body.get("temperature") == 0
        options = self.body.get("stream_options") or {}
        self.client_usage = bool(options.get("include_usage")) if self.client_streams else True
        self.max_tokens = self.body.get("max_completion_tokens") if self.chat else None
        if self.max_tokens is None:
            self.max_tokens = self.body.get("max_tokens")

    # -- what goes to an engine ----------------------------------------------------------

    def engine_body(self) -> dict[str, Any]:
        """The first leg: the client's request as a stream with token ids. One that
        cannot be continued goes as the client sent it (several choices, say, are
        the engine's to put together)."""
        if self.not_continuable:
            return self.body
        body = dict(self.body, stream=True, return_token_ids=True)
        if not self.client_streams:
            body["stream_options"] = {"include_usage": True}
        return body

    def continuation_body(self) -> dict[str, Any]:
        """The rest of the answer, as a /v1/completions request (token ids in and out)."""
        if self.chat:
            body = {k: self.body[k] for k in _CHAT_SAMPLING if k in self.body}
            if self.body.get("logprobs"):
                body["logprobs"] = 0
        else:
            body = {k: v for k, v in self.body.items() if k not in _NOT_CARRIED}
        done = self.generated[:self.clean]
        body.update(prompt=[*(self.prompt_ids or []), *done], stream=True, return_token_ids=True)
        if self.max_tokens is not None:
            body["max_tokens"] = max(1, self.max_tokens - len(done))
        if self.body.get("min_tokens"):
            body["min_tokens"] = max(0, self.body["min_tokens"] - len(done))
        if self.client_usage:
            options = self.body.get("stream_options") or {}
            body["stream_options"] = {"include_usage": True,
                                      **({"continuous_usage_stats": True} if options.get("continuous_usage_stats")
                                         else {})}
        return body

    def can_continue(self) -> str | None:
        """Why this answer cannot be continued now (None: it can). One of which the
        client has nothing yet can always be sent again from the start."""
        if self.identity is None:
            return None
        if self.not_continuable:
            return self.not_continuable
        if self.identity is not None and self.prompt_ids is None:
            return "the engine never sent the prompt's token ids"
        return None

    def next_request(self) -> tuple[str, dict[str, Any]]:
        """The route and body for the next replica. Nothing reached the client yet:
        the request itself, from the start. Else the remainder, from the tokens."""
        if self.identity is None:
            return self.route, self.engine_body()
        self.leg += 1
        if self.client_streams:
            # The client keeps what it has; the continuation's first tokens (and text)
            # up to there are not sent again. Counted from the clean cut each time, so
            # a continuation that fails in turn is continued the same way.
            self.skip_ids, self.skip_chars = len(self.generated) - self.clean, self.text_chars - self.clean_chars
        else:  # nothing was sent: what is past the clean cut is dropped and made again
            del self.generated[self.clean:]
            self.text = ["".join(self.text)[:self.clean_chars]]
            self.logprobs = _first_logprobs(self.logprobs, self.clean, self.chat)
            self.text_chars, self.token_chars = self.clean_chars, self.clean_token_chars
        self.offset_at = self.clean_token_chars
        self.leg_base = self.clean
        return COMPLETIONS_ROUTE, self.continuation_body()

    def replayed(self) -> int:
        """Generated tokens the current continuation was given back as prompt."""
        return self.leg_base if self.leg else 0

    def finished(self) -> bool:
        """The client has its whole answer but maybe not the end of the stream (known
        only of an answer of one choice: one that can be continued)."""
        return self.finish_reason is not None and self.not_continuable is None

    # -- engine events in, client bytes out ----------------------------------------------

    def on_event(self, payload: bytes) -> bytes:
        """One `data:` payload of the current leg; returns the bytes for the client
        (empty: nothing to send now). Raises EngineError for an engine's own 5xx
        error event: the replica failed."""
        if payload == b"[DONE]":
            return self._end()
        event = json.loads(payload)
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            code = error.get("code")
            if isinstance(code, int) and code >= 500 or error.get("type") in ("InternalServerError", "EngineDeadError"):
                # Its message may quote the request: the type and code say enough.
                raise EngineError(f"{error.get('type') or 'error'} {code if code is not None else ''}".strip())
            self.engine_error = error
            self.done = True
            return b"data: " + payload + b"\n\n" if self.client_streams else b""
        if self.leg == 0:
            return self._first_leg(event, payload)
        return self._continued(event)

    def _first_leg(self, event: dict[str, Any], payload: bytes) -> bytes:
        if self.identity is None:
            self.identity = {k: event.get(k) for k in ("id", "created", "model")}
        choices = event.get("choices") or []
        prompt_ids = event.get("prompt_token_ids") if self.chat else (choices[0].get("prompt_token_ids")
                                                                      if choices else None)
        if prompt_ids is not None:
            self.prompt_ids = prompt_ids
        for choice in choices:
            self._take(choice, choice.get("delta", {}).get("content") if self.chat else choice.get("text"),
                       choice.get("logprobs"))
        if event.get("usage") is not None:
            self._take_usage(event)
        if not self.client_streams:
            return b""
        if event.get("usage") is not None and not choices:
            self.usage_sent = True
        return b"data: " + (payload if self.client_ids else _TOKEN_IDS.sub(rb'"\1token_ids":null', payload)) + b"\n\n"

    def _continued(self, event: dict[str, Any]) -> bytes:
        """A continuation's completions event, in the shape of the first answer."""
        out: dict[str, Any] = {**(self.identity or {}), "object": "chat.completion.chunk" if self.chat
                               else "text_completion"}
        choices = []
        for choice in event.get("choices") or []:
            text, ids = choice.get("text") or "", choice.get("token_ids") or []
            logprobs = choice.get("logprobs")
            if logprobs is not None and not self.chat:
                logprobs = self._offsets(logprobs)
            replayed = min(self.skip_ids, len(ids))
            if replayed or self.skip_chars:  # the client has these already
                cut = min(self.skip_chars, len(text))
                ids, text, self.skip_ids, self.skip_chars = ids[replayed:], text[cut:], self.skip_ids - replayed, \
                    self.skip_chars - cut
                if logprobs is not None:
                    logprobs = {k: v[replayed:] if isinstance(v, list) else v for k, v in logprobs.items()}
            if logprobs is not None and self.chat:
                logprobs = _chat_logprobs(logprobs)
            # Replayed ids are in `generated` already: only the new ones are taken.
            self._take({**choice, "token_ids": ids}, text, logprobs)
            if not ids and not text and choice.get("finish_reason") is None:
                continue  # all of it was a replay
            ids = ids if self.client_ids else None
            if self.chat:
                c: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": logprobs,
                                     "finish_reason": choice.get("finish_reason")}
                if choice.get("finish_reason") is not None:
                    c["stop_reason"] = choice.get("stop_reason")
                c["token_ids"] = ids
            else:
                c = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": choice.get("finish_reason"),
                     "stop_reason": choice.get("stop_reason"), "prompt_token_ids": None, "token_ids": ids}
            choices.append(c)
        out["choices"] = choices
        if event.get("usage") is not None:
            out["usage"] = self._take_usage(event)
        if "system_fingerprint" in event:
            out["system_fingerprint"] = event["system_fingerprint"]
            self.fingerprint = event["system_fingerprint"]
        if not self.client_streams:
            return b""
        if event.get("choices") and not choices:
            return b""  # all of it was a replay: the client has it (and its usage, if continuous)
        if event.get("usage") is not None and not choices:
            if not self.client_usage:
                return b""
            self.usage_sent = True
        return b"data: " + json.dumps(out, separators=(",", ":")).encode() + b"\n\n"

    def _take(self, choice: dict[str, Any], text: str | None, logprobs: Any) -> None:
        self.chunks += 1
        ids = choice.get("token_ids") or []
        self.generated.extend(ids)
        self.text_chars += len(text or "")
        if logprobs is not None and not self.chat:
            self.token_chars += sum(len(t) for t in logprobs.get("tokens") or [])
        if ids and (text or not self.greedy) and (len(ids) == 1 or not self.greedy):
            self.clean, self.clean_chars, self.clean_token_chars = len(self.generated), self.text_chars, \
                self.token_chars
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")
        if not self.client_streams:
            self.text.append(text or "")
            if logprobs is not None:
                self.logprobs.append(logprobs)

    def _offsets(self, logprobs: dict[str, Any]) -> dict[str, Any]:
        """A continuation's text offsets, counted as vLLM counts them in an unbroken
        answer: each token's offset is the length of the token texts before it."""
        offsets = []
        for token in logprobs.get("tokens") or []:
            offsets.append(self.offset_at)
            self.offset_at += len(token)
        return {**logprobs, "text_offset": offsets}

    def _take_usage(self, event: dict[str, Any]) -> dict[str, Any]:
        """Usage counting the client's prompt once and each of its tokens once."""
        usage = dict(event["usage"])
        if self.leg > 0:
            prompt = len(self.prompt_ids or [])
            completion = self.leg_base + (usage.get("completion_tokens") or 0)
            usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        self.usage = usage
        if "system_fingerprint" in event:
            self.fingerprint = event["system_fingerprint"]
        return usage

    def _counted_usage(self) -> dict[str, int]:
        """Usage from the tokens themselves, when no engine sent it for the answer."""
        prompt, completion = len(self.prompt_ids or []), len(self.generated)
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}

    def _end(self) -> bytes:
        self.done = True
        if not self.client_streams:
            return b""
        return DONE

    def closing(self) -> bytes:
        """What a stream still owes its client when its engine failed after the
        answer was complete: the usage event (when asked for) and `[DONE]`."""
        out = b""
        if self.client_usage and not self.usage_sent and self.prompt_ids is not None:
            self.usage = self._counted_usage()
            event = {**(self.identity or {}), "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "choices": [], "usage": self.usage}
            out = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        self.done = True
        return out + DONE

    # -- a non-streamed answer -------------------------------------------------------------

    def answer(self) -> dict[str, Any]:
        """The JSON answer of a client that did not ask for a stream."""
        ident = self.identity or {}
        if self.usage is None and self.prompt_ids is not None:
            self.usage = self._counted_usage()
        text = "".join(self.text)
        logprobs = _joined_logprobs(self.logprobs, self.chat) if self.logprobs else None
        ids = self.generated if self.client_ids else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": self.finish_reason, "stop_reason": self.stop_reason, "token_ids": ids}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason,
                      "stop_reason": self.stop_reason, "token_ids": ids,
                      "prompt_token_ids": self.prompt_ids if self.client_ids else None}
            obj = "text_completion"
        out = {"id": ident.get("id"), "object": obj, "created": ident.get("created"), "model": ident.get("model"),
               "choices": [choice], "usage": self.usage}
        if self.chat and self.client_ids:
            out["prompt_token_ids"] = self.prompt_ids
        if self.fingerprint is not None:
            out["system_fingerprint"] = self.fingerprint
        return out


class EngineError(Exception):
    """The engine reported its own failure inside the stream (a 5xx error event)."""


class EventReader:
    """Server-sent events from arbitrary reads: the `data:` payloads of the
    events complete so far; a partial event waits for the next read."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data
        if b"\n\n" not in buffer:
            if len(buffer) > MAX_EVENT_BYTES:
                raise ValueError(f"no event end in {len(buffer)} bytes")
            self._buffer = buffer
            return []
        *events, self._buffer = buffer.split(b"\n\n")
        return [e[6:] if e.startswith(b"data: ") else e[5:].lstrip() for e in events
                if e.startswith(b"data:")]

    def pending(self) -> bool:
        return bool(self._buffer.strip())


def _chat_logprobs(completion: dict[str, Any]) -> dict[str, Any]:
    """A completion's logprobs in a chat answer's shape."""
    tokens = completion.get("tokens") or []
    values = completion.get("token_logprobs") or []
    tops = completion.get("top_logprobs") or [None] * len(tokens)
    content = []
    for token, value, top in zip(tokens, values, tops):
        content.append({"token": token, "logprob": value, "bytes": list(token.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                                         for t, v in (top or {}).items()][:0]})
    return {"content": content}


def _first_logprobs(parts: list[dict[str, Any]], tokens: int, chat: bool) -> list[dict[str, Any]]:
    """The logprobs of the first `tokens` tokens, as one part."""
    if not parts:
        return parts
    joined = _joined_logprobs(parts, chat)
    return [{k: v[:tokens] for k, v in joined.items()}]


def _joined_logprobs(parts: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    if chat:
        return {"content": [c for p in parts for c in (p.get("content") or [])]}
    joined: dict[str, list[Any]] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for p in parts:
        for key in joined:
            joined[key].extend(p.get(key) or [])
    return joined
