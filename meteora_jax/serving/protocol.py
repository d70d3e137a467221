"""The OpenAI request bodies the server accepts, checked field by field, and its response bodies.

`parse_completion` / `parse_chat` turn a decoded JSON body into a `Query` or raise `RequestError`
naming the field at fault (HTTP 400 with OpenAI's error body). Fields OpenAI defines that change
nothing here (`user`, `frequency_penalty` 0, ...) are accepted and ignored; the ones whose
meaning the server cannot give (`n` > 1, `logprobs`, `echo`) are refused rather than silently
dropped. MeteoRA's own fields: `adapter` (force one adapter), `routing_top_k`,
`routing_temperature` and `return_routing` (each token's top adapters in the answer).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid

from meteora_jax.data.prompts import format_prompt
from meteora_jax.inputs import is_int, is_real

MAX_STOPS = 4  # as OpenAI
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Query:
    """One checked request: the prompt text (chat already formatted) and how to answer it."""

    chat: bool
    text: str
    max_tokens: int | None  # None: up to the server's --max-length
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    adapter: str | None
    routing_top_k: int | None
    routing_temperature: float | None
    return_routing: bool


def _number(body, name, default, low, high, *, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if not (is_real(value) and math.isfinite(value)):
        raise RequestError(f"{name} must be a number, got {value!r}", name)
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise RequestError(f"{name} must lie in {bracket}{low}, {high}], got {value!r}", name)
    return float(value)


def _integer(body, name, low, high=None):
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"{name} must be an integer {span}, got {value!r}", name)
    return int(value)


def _flag(body, name) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    return value


def _stops(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _common(body, *, chat: bool, text: str, default_max_tokens: int | None) -> Query:
    for name, allowed in (("n", 1), ("best_of", 1)):
        if body.get(name) not in (None, allowed):
            raise RequestError(f"{name} must be {allowed}: one answer per request", name)
    for name in ("logprobs", "top_logprobs", "echo"):
        if body.get(name) not in (None, False, 0):
            raise RequestError(f"{name} is not supported by this server", name)
    max_tokens = _integer(
        body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", 1
    )
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {options!r}", "stream_options")
    adapter = body.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError(f"adapter must be an adapter's name, got {adapter!r}", "adapter")
    return Query(
        chat=chat,
        text=text,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=_stops(body),
        seed=_integer(body, "seed", 0, 2**32 - 1),
        stream=_flag(body, "stream"),
        include_usage=_flag(options, "include_usage"),
        adapter=adapter,
        routing_top_k=_integer(body, "routing_top_k", 1),
        routing_temperature=(
            None
            if body.get("routing_temperature") is None
            else _number(body, "routing_temperature", 1.0, 0.0, math.inf, low_open=True)
        ),  # fmt: skip
        return_routing=_flag(body, "return_routing"),
    )


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_completion(body) -> Query:
    """POST /v1/completions: `prompt` is a string (or a list of one), used as it is."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(f"prompt must be a non-empty string, got {prompt!r}", "prompt")
    return _common(body, chat=False, text=prompt, default_max_tokens=16)  # OpenAI's default


def chat_text(messages) -> str:
    """The conversation in the training data's template: each user turn as `[INST] ... [/INST]\\n`
    followed by the assistant's reply and a newline; a system message opens the first user turn."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"{where} must be an object with a role in {ROLES}", f"{where}.role")
        content = m.get("content")
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string, got {content!r}", f"{where}.content")
        if m["role"] == "system":
            if turns:
                raise RequestError(f"{where}: a system message must come first", f"{where}.role")
            system.append(content)
        else:
            turns.append((m["role"], content))
    if not turns or turns[-1][0] != "user":
        raise RequestError("messages must end with a user message", "messages")
    text = []
    for j, (role, content) in enumerate(turns):
        if role == "user":
            first = j == 0 and system
            text.append(format_prompt("\n\n".join([*system, content]) if first else content))
        else:
            text.append(content + "\n")
    return "".join(text)


def parse_chat(body) -> Query:
    """POST /v1/chat/completions: `messages` in the training data's chat template."""
    body = _object(body)
    return _common(body, chat=True, text=chat_text(body.get("messages")), default_max_tokens=None)


# ------------------------------------------------------------------------------ responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def _choice(chat: bool, text: str, finish: str | None, *, delta: bool, first: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        message = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish}
    return {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish,
    }


def response(query: Query, rid: str, model: str, text: str, finish: str, usage: dict, routing) -> dict:
    """The whole answer of a non-streamed request."""
    choice = _choice(query.chat, text, finish, delta=False)
    if routing is not None:
        choice["routing"] = routing
    return {
        "id": rid,
        "object": "chat.completion" if query.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def chunk(query: Query, rid: str, model: str, text: str, finish: str | None, routing, *, first=False) -> dict:
    """One server-sent event of a streamed answer."""
    choice = _choice(query.chat, text, finish, delta=True, first=first)
    if routing is not None:
        choice["routing"] = routing
    return {
        "id": rid,
        "object": "chat.completion.chunk" if query.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
