"""The HTTP side of `meteora-jax serve`: an OpenAI-compatible Starlette app over an `Engine`.

Starlette (the ASGI toolkit under FastAPI, served by uvicorn) because the API is five routes
whose bodies we check field by field ourselves (`protocol`), so a schema layer would add a
dependency and a second set of error messages. Each request becomes an engine `Request` whose
callbacks run in the engine's thread: `TextStream` turns tokens into text (stop strings,
incomplete UTF-8 held back) and hands events to the request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meteora_jax.data.prompts import encode_prompt
from meteora_jax.errors import MeteoRAError
from meteora_jax.serving import protocol
from meteora_jax.serving.engine import GATES, Engine, QueueFull, Request, RowSettings
from meteora_jax.serving.protocol import Query, RequestError

ROUTING_SHOWN = 2  # adapters listed per token with return_routing


class TextStream:
    """A request's answer as it grows, fed token by token from the engine thread."""

    def __init__(self, tokenizer, query: Query, eos_ids, adapter_names, loop, events: asyncio.Queue):
        self.tokenizer = tokenizer
        self.stops = query.stop
        self.eos_ids = set(eos_ids)
        self.names = adapter_names
        self.want_routing = query.return_routing
        self.loop = loop
        self.events = events
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.tokens = 0
        self.stopped = False

    def _push(self, kind: str, value: str, routing, tokens: int = 1) -> None:
        """Hands (kind, text or finish reason, routing entries, tokens it covers) to the request."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value, routing, tokens))

    def _routing(self, token: int, mix: np.ndarray) -> dict:
        order = np.argsort(-mix, kind="stable")[:ROUTING_SHOWN]
        return {
            "token": self.tokenizer.decode([token]),
            "adapters": [
                {"name": self.names[i], "weight": round(float(mix[i]), 4)} for i in order if mix[i] > 0
            ],
        }

    def emit(self, token: int, mix: np.ndarray) -> bool:
        self.tokens += 1
        routing = [self._routing(token, mix)] if self.want_routing else None
        if token in self.eos_ids:
            self._push("delta", self.text[self.sent :], routing)
            self.sent = len(self.text)
            return True
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            if routing:
                self._push("delta", "", routing)
            return True
        self.text = text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text = text[:at]
                self.stopped = True
        if self.stopped:
            self._push("delta", self.text[self.sent :], routing)
            self.sent = len(self.text)
            return False
        safe = len(text) - max((_overlap(text, s) for s in self.stops), default=0)
        self._push("delta", text[self.sent : safe], routing)
        self.sent = max(self.sent, safe)
        return True

    def finish(self, reason: str) -> None:
        if reason in ("length", "eos") and self.sent < len(self.text):
            self._push("delta", self.text[self.sent :], None, 0)  # text held back for a stop string
            self.sent = len(self.text)
        self._push("end", "stop" if self.stopped else reason, None, 0)


async def _cancel_on_disconnect(request: HTTPRequest, job: Request) -> None:
    """Cancels `job` when the client of a non-streamed request hangs up (its body is read, so
    the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop` (held back until it is decided)."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "meteora_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("meteora_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generated = Counter("meteora_generation_tokens", "tokens generated", registry=r)
        self.first_token = Histogram(
            "meteora_time_to_first_token_seconds", "from request arrival to its first token", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        Gauge("meteora_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_depth
        )
        Gauge("meteora_slots_in_use", "decode slots holding a request", registry=r).set_function(
            lambda: len(engine.active)
        )
        Gauge("meteora_slots", "decode slots", registry=r).set(engine.slots)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last WINDOW seconds
        Gauge(
            "meteora_generation_tokens_per_second",
            f"tokens generated over the last {self.WINDOW:g} s",
            registry=r,
        ).set_function(self.tokens_per_second)

    WINDOW = 10.0

    def count_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generated.inc(n)
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - self.WINDOW:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        return sum(n for t, n in self.recent if t >= now - self.WINDOW) / self.WINDOW


class Server:
    """The routes over one model, its tokenizer and a started `Engine`."""

    def __init__(self, model, tokenizer, engine: Engine, *, name: str, eos_ids):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.name = name
        self.eos_ids = tuple(eos_ids)
        self.adapters = model.adapter_names
        self.metrics = Metrics(engine)
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    # ------------------------------------------------------------------------------ routes

    async def models(self, request: HTTPRequest) -> Response:
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "meteora-jax"}
        card["adapters"] = list(self.adapters)
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: HTTPRequest) -> Response:
        alive = self.engine.running
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    async def prometheus(self, request: HTTPRequest) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._answer(request, protocol.parse_completion, "completions")

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._answer(request, protocol.parse_chat, "chat.completions")

    async def _not_found(self, request: HTTPRequest, exc) -> Response:
        return self._error(RequestError(f"no route {request.url.path}", status=404), "unknown")

    async def _not_allowed(self, request: HTTPRequest, exc) -> Response:
        return self._error(
            RequestError(f"{request.method} is not allowed on {request.url.path}", status=405), "unknown"
        )

    # ------------------------------------------------------------------------------ answering

    def _error(self, error: RequestError, endpoint: str, headers=None) -> Response:
        self.metrics.requests.labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    def _row(self, query: Query) -> RowSettings:
        moe = self.model.moe
        routing_fields = [
            n for n in ("adapter", "routing_top_k", "routing_temperature") if getattr(query, n) is not None
        ] + (["return_routing"] if query.return_routing else [])
        if moe is None and routing_fields:
            raise RequestError(f"{routing_fields[0]}: this model has no adapters", routing_fields[0])
        temperature, top_k = self.engine.routing_defaults
        adapter = GATES
        if query.adapter is not None:
            if query.adapter not in self.adapters:
                raise RequestError(
                    f"adapter {query.adapter!r} is not one of this model's: {', '.join(self.adapters)}",
                    "adapter",
                )
            adapter = self.adapters.index(query.adapter)
        if query.routing_top_k is not None and query.routing_top_k > top_k:
            raise RequestError(
                f"routing_top_k must lie in [1, {top_k}] (the server's top-k), got {query.routing_top_k}",
                "routing_top_k",
            )
        return RowSettings(
            temperature=query.temperature,
            top_p=query.top_p,
            seed=secrets.randbits(32) if query.seed is None else query.seed,
            adapter=adapter,
            routing_temperature=temperature
            if query.routing_temperature is None
            else query.routing_temperature,
            routing_top_k=top_k if query.routing_top_k is None else query.routing_top_k,
        )

    def _tokens(self, query: Query) -> tuple[list[int], int]:
        try:
            ids = encode_prompt(self.tokenizer, query.text)
        except MeteoRAError as e:
            raise RequestError(str(e), "messages" if query.chat else "prompt") from e
        limit = self.engine.max_length
        field = "messages" if query.chat else "prompt"
        if len(ids) >= limit:
            raise RequestError(
                f"{field}: {len(ids)} tokens, the server's --max-length is {limit} (prompt and answer)", field
            )
        room = limit - len(ids)
        if query.max_tokens is None:
            return ids, room
        if query.max_tokens > room:
            raise RequestError(
                f"max_tokens={query.max_tokens} after a prompt of {len(ids)} tokens exceeds the server's "
                f"--max-length {limit}: at most {room}",
                "max_tokens",
            )
        return ids, query.max_tokens

    async def _answer(self, request: HTTPRequest, parse, endpoint: str) -> Response:
        arrived = time.monotonic()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from e
            query = parse(body)
            model = body.get("model")
            if model is not None and model != self.name:
                message = f"model {model!r} is not served here: {self.name!r} is"
                raise RequestError(message, "model", status=404, code="model_not_found")
            ids, max_tokens = self._tokens(query)
            row = self._row(query)
        except RequestError as e:
            return self._error(e, endpoint)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stream = TextStream(self.tokenizer, query, self.eos_ids, self.adapters, loop, events)
        job = Request(ids, max_tokens, row, self.eos_ids, stream.emit, stream.finish)
        try:
            self.engine.submit(job)
        except QueueFull:
            error = RequestError("the server's queue is full, retry later", status=429, code="queue_full")
            return self._error(error, endpoint, headers={"Retry-After": "1"})
        self.metrics.prompt_tokens.inc(len(ids))
        self.metrics.requests.labels(endpoint, "200").inc()
        rid = protocol.new_id(query.chat)
        usage = lambda: protocol.usage(len(ids), stream.tokens)  # noqa: E731
        first = [True]

        async def next_event():
            try:
                event = await events.get()
            except asyncio.CancelledError:
                job.cancelled.set()  # the client went away: the engine frees the slot
                raise
            if first[0] and event[3]:
                first[0] = False
                self.metrics.first_token.observe(time.monotonic() - arrived)
            if event[3]:
                self.metrics.count_tokens(event[3])
            return event[:3]

        if query.stream:
            return StreamingResponse(
                self._sse(query, rid, next_event, usage, job), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )  # fmt: skip
        text, routing = [], [] if query.return_routing else None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            while True:
                kind, value, entries = await next_event()
                if kind == "end":
                    break
                text.append(value)
                if routing is not None and entries:
                    routing.extend(entries)
        finally:
            watcher.cancel()
        if value == "cancelled":
            error = RequestError("the server stopped before the answer was complete", status=503)
            return self._error(error, endpoint)
        finish = protocol.FINISH_REASONS.get(value, value)
        return JSONResponse(protocol.response(query, rid, self.name, "".join(text), finish, usage(), routing))

    async def _sse(self, query: Query, rid: str, next_event, usage, job: Request):
        def event(payload) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        try:
            first = True
            while True:
                kind, value, entries = await next_event()
                if kind == "end":
                    break
                if value or entries or first:
                    yield event(protocol.chunk(query, rid, self.name, value, None, entries, first=first))
                    first = False
            if value == "cancelled":
                yield event(
                    RequestError("the server stopped before the answer was complete", status=503).body()
                )
                return
            yield event(
                protocol.chunk(query, rid, self.name, "", protocol.FINISH_REASONS.get(value, value), None)
            )
            if query.include_usage:
                last = protocol.chunk(query, rid, self.name, "", None, None)
                yield event({**last, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op after the end; frees the slot of a client gone mid-stream
