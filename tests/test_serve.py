"""`meteora-jax serve` through real clients: the official `openai` package and raw HTTP.

One tiny fused model (three random adapters) served in-process on a loopback port for most
tests; one test runs the command itself and stops it with SIGTERM mid-answer. Greedy answers
are compared with `generate`'s; the load test checks that 200 requests from 32 clients each get
their own answer and that traffic compiles nothing.
"""

import asyncio
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2
import jax.monitoring
import numpy as np
import openai
import pytest
import uvicorn
from conftest import subprocess_env

import meteora_jax as mj
from meteora_jax.data.prompts import encode_prompt, format_prompt, load_tokenizer, pad_token_of
from meteora_jax.demo.synthetic import write_tiny_setup
from meteora_jax.errors import ConfigError
from meteora_jax.generation import generate
from meteora_jax.serving.app import Server
from meteora_jax.serving.engine import Engine, Request, RowSettings
from meteora_jax.serving.options import MAX_LENGTH_CAP, ServeSettings
from meteora_jax.text import stop_ids

MAX_LENGTH = 64
NAME = "tiny"
PROMPTS = ["reverse: abc", "upper: hello", "double: cab", "reverse: ba", "upper: a", "double: bb"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_setup(str(tmp_path_factory.mktemp("serve")), layers=2, hidden=32, rank=2)


@pytest.fixture(scope="module")
def model(setup):
    with pytest.warns(UserWarning, match="untrained"):
        return mj.load_model(setup.base, adapters=setup.adapters, top_k=2)


@pytest.fixture(scope="module")
def tokenizer(setup):
    return load_tokenizer(setup.base)


def _serve(server: Server):
    """Runs `server.app` on a free loopback port in a thread; returns (base URL, stop)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(server.app, log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(runner.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.01)

    def stop():
        runner.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture(scope="module")
def served(model, tokenizer):
    engine = Engine(model, slots=4, max_length=MAX_LENGTH, max_queue=256, pad_id=pad_token_of(tokenizer))
    engine.warm_up()
    engine.start()
    server = Server(model, tokenizer, engine, name=NAME, eos_ids=stop_ids(model, tokenizer))
    url, stop = _serve(server)
    yield url, server
    stop()
    engine.stop(timeout=30)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def greedy_text(model, tokenizer, text: str, max_tokens: int) -> str:
    ids = encode_prompt(tokenizer, text)
    out = generate(
        model, np.asarray([ids]), max_new_tokens=max_tokens, eos_token_id=stop_ids(model, tokenizer)
    )
    n = int(out.num_new_tokens[0])
    return tokenizer.decode(np.asarray(out.new_tokens[0, :n]), skip_special_tokens=True)


def test_completions_and_chat_answer_as_generate_does_streamed_or_not(client, model, tokenizer):
    """Greedy answers equal `generate`'s; a stream's pieces join into the same text; the routing
    comes with every generated token when asked for."""
    want = greedy_text(model, tokenizer, PROMPTS[0], 12)
    got = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(encode_prompt(tokenizer, PROMPTS[0]))

    chat_want = greedy_text(model, tokenizer, format_prompt(PROMPTS[1]), 10)
    kwargs = dict(
        model=NAME, messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=10, temperature=0
    )
    chat = client.chat.completions.create(**kwargs, extra_body={"return_routing": True})
    assert chat.choices[0].message.content == chat_want
    routing = chat.choices[0].model_extra["routing"]
    assert len(routing) == chat.usage.completion_tokens
    assert all(0 < len(r["adapters"]) <= 2 for r in routing)
    assert {a["name"] for r in routing for a in r["adapters"]} <= set(model.adapter_names)

    pieces = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_want
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason


def test_a_forced_adapter_stop_strings_and_seeds(client, model, tokenizer):
    """`adapter` routes every token to it (weight 1); a stop string cuts the answer before it;
    a seed makes a sampled answer repeat."""
    forced = client.completions.create(
        model=NAME,
        prompt=PROMPTS[2],
        max_tokens=8,
        temperature=0,
        extra_body={"adapter": "upper", "return_routing": True},
    )
    routing = forced.choices[0].model_extra["routing"]
    assert all(r["adapters"] == [{"name": "upper", "weight": 1.0}] for r in routing)
    full = (
        client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=16, temperature=0).choices[0].text
    )
    cut = full[3:5]
    stopped = client.completions.create(
        model=NAME, prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].text == full[: full.index(cut)] and stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=12, temperature=1.2, seed=11)
        .choices[0].text
        for _ in range(2)
    ]  # fmt: skip
    assert sampled[0] == sampled[1]


def _post(url, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx2.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ("{not json", None, "not valid JSON"),
        ([1, 2], None, "must be a JSON object"),
        ({"prompt": 3}, "prompt", "prompt must be a non-empty string"),
        ({"prompt": "a", "temperature": "hot"}, "temperature", "temperature must be a number"),
        ({"prompt": "a", "temperature": 3}, "temperature", "temperature must lie in [0.0, 2.0]"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
        ({"prompt": "a", "max_tokens": 500}, "max_tokens", "exceeds the server's --max-length 64"),
        ({"prompt": "a b c " * 40}, "prompt", "the server's --max-length is 64"),
        ({"prompt": "a", "adapter": "nope"}, "adapter", "adapter 'nope' is not one of this model's"),
        ({"prompt": "a", "routing_top_k": 3}, "routing_top_k", "routing_top_k must lie in [1, 2]"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes at most 4"),
        ({"prompt": "a", "n": 2}, "n", "n must be 1"),
        ({"prompt": "a", "stream": "yes"}, "stream", "stream must be true or false"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(served, body, param, words):
    reply = _post(served[0], "/v1/completions", body, raw=isinstance(body, str))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_chat_messages_unknown_model_and_routes(served):
    url = served[0]
    bad = _post(
        url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[1].content"
    last = _post(url, "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "a"}]})
    assert last.status_code == 400 and "must end with a user message" in last.json()["error"]["message"]
    other = _post(url, "/v1/completions", {"model": "gpt-4", "prompt": "a"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    models = httpx2.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == NAME and models["data"][0]["adapters"] == ["reverse", "upper", "double"]
    assert httpx2.get(url + "/health").json() == {"status": "ok"}
    assert httpx2.get(url + "/v1/nothing").status_code == 404


def test_a_full_queue_is_a_429_with_retry_after(model, tokenizer):
    """An engine whose queue is full (not started, one place taken) refuses the next request."""
    engine = Engine(model, slots=1, max_length=MAX_LENGTH, max_queue=1)
    engine.submit(Request([1, 5], 2, RowSettings(), (), lambda t, m: True, lambda r: None))
    server = Server(model, tokenizer, engine, name=NAME, eos_ids=())
    url, stop = _serve(server)
    try:
        reply = _post(url, "/v1/completions", {"prompt": "a"})
        assert reply.status_code == 429 and reply.headers["Retry-After"] == "1"
        assert reply.json()["error"]["code"] == "queue_full"
        assert httpx2.get(url + "/health").status_code == 503  # the engine is not running
    finally:
        stop()


def test_a_client_gone_mid_stream_frees_its_slot(served):
    url, server = served
    body = {"prompt": PROMPTS[5], "max_tokens": 50, "temperature": 0, "stream": True, "stop": None}
    with httpx2.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        assert len(server.engine.active) == 1
    deadline = time.monotonic() + 10
    while server.engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.engine.active and server.engine.stats.requests_cancelled >= 1


def test_a_client_gone_before_its_answer_cancels_it(model, tokenizer):
    """Not streamed: a client that stops waiting cancels its request. (Its own engine, started
    only once the client has given up, so the request cannot have been answered already.)"""
    engine = Engine(model, slots=1, max_length=MAX_LENGTH, max_queue=4)
    engine.warm_up()
    server = Server(model, tokenizer, engine, name=NAME, eos_ids=())
    url, stop = _serve(server)
    try:
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(url + "/v1/completions", json={"prompt": PROMPTS[5], "max_tokens": 50}, timeout=0.3)
        time.sleep(0.2)  # the disconnect reaches the server
        engine.start()
        deadline = time.monotonic() + 10
        while engine.stats.requests_cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop()
        engine.stop(timeout=10)
    assert engine.stats.requests_cancelled == 1 and engine.stats.generated_tokens == 0


def test_32_clients_200_requests_nothing_lost_or_mixed_and_no_compile(client, served):
    """Each request is answered with exactly its own text (greedy ones as when alone; seeded
    sampled ones as with that seed alone), whatever runs beside it; metrics count them."""
    url, server = served
    jobs = [
        (PROMPTS[i % len(PROMPTS)], i % 3 == 0, 100 + i % 7) for i in range(200)
    ]  # (prompt, sampled, seed)

    def ask(job):
        prompt, sampled, seed = job
        kwargs = dict(temperature=0.9, seed=seed) if sampled else dict(temperature=0)
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=10, **kwargs).choices[0].text

    alone = {job: ask(job) for job in set(jobs)}
    counter = []
    listener = lambda event, duration, **kw: counter.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, jobs))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert answers == [alone[job] for job in jobs]
    assert counter == []
    metrics = httpx2.get(url + "/metrics").text
    requests = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('meteora_requests_total{endpoint="completions",status="200"}')
    )
    assert requests >= 200 + len(alone)
    assert "meteora_time_to_first_token_seconds_count" in metrics and "meteora_slots_in_use 0.0" in metrics


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--slots", "0"], "slots (--slots) must be >= 1, got 0"),
        (["--max-queue", "0"], "max_queue (--max-queue) must be >= 1, got 0"),
        (
            ["--max-length", "1"],
            "max_length (--max-length) must be >= 2 (a prompt token and an answer token), got 1",
        ),
        (["--port", "70000"], "port (--port) must be in [0, 65536), got 70000"),
        (["--grace", "-1"], "grace (--grace) must be >= 0, got -1.0"),
        (
            ["--max-length", "4096"],
            "max_length (--max-length) 4096 exceeds the model's max_position_embeddings=256",
        ),
        (["--host", ""], "host (--host) must be an address, got ''"),
        (["--mesh", "data=3"], "mesh: 8 devices do not split into data*fsdp*tensor=[3, -1, 1]"),
        (["--mesh", "nonsense"], "--mesh 'nonsense': expected NAME=SIZE items"),
    ],
)
def test_the_command_refuses_bad_settings_in_one_line(setup, capsys, flags, words):
    """Each bad setting: exit 2 and one line naming it, before anything listens."""
    from meteora_jax.cli import main

    assert main(["serve", "--base", setup.base, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_the_default_length_is_the_models_own_up_to_the_cap():
    """No --max-length: a model's own positions (the demo's 256 are served as they are), at most
    MAX_LENGTH_CAP (a 128k-position model would give every slot a 128k-slot cache); a given one is
    kept, or refused when the model has fewer positions."""
    assert ServeSettings().length_for(256) == 256
    assert ServeSettings().length_for(131072) == MAX_LENGTH_CAP == 2048
    assert ServeSettings(max_length=100).length_for(256) == 100
    with pytest.raises(ConfigError, match=r"max_length \(--max-length\) 300 exceeds the model's "):
        ServeSettings(max_length=300).length_for(256)


def test_the_command_serves_and_finishes_a_running_answer_on_sigterm(setup, tmp_path):
    """`meteora-jax serve` on a free port: an answer being streamed when SIGTERM arrives is
    finished; the process then exits 0."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    adapters = [arg for name, folder in setup.adapters.items() for arg in ("--adapter", f"{name}={folder}")]
    argv = [sys.executable, "-m", "meteora_jax.cli", "serve", "--base", setup.base, *adapters,
            "--port", str(port), "--slots", "2", "--max-length", "48", "--grace", "20"]  # fmt: skip
    env = {**subprocess_env(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx2.get(url + "/health").status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        body = {"prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx2.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read()
        proc.stdout.close()
    assert "compiling" in output
