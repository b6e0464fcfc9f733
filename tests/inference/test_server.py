"""`main.py serve` as a real server process, driven by the official `openai` client: the replies are greedy
`generate`'s, concurrent requests each get their own, bad requests get OpenAI's 4xx errors. Plus the reply
parsing (thinking, tool calls) on its own."""

import json
import os
import socket
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from flax import nnx

import main
from minimind_jax import weights
from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.errors import UserError
from minimind_jax.inference.generation import generate
from minimind_jax.inference.server import RequestError, parse_request, slot_context
from minimind_jax.inference.text import ReplyStream, split_reply
from minimind_jax.model.config import ModelConfig, num_params
from minimind_jax.model.transformer import MiniMind
from tests.conftest import REPO_ROOT, require_shared

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_TOKENS = 12
SLOT_POSITIONS = 4096  # what the served model's 16 slots get from its --kv_cache_mb, below its 32,768 positions
BYTES_PER_POSITION = 2 * 2 * 2 * 8 * 4  # keys and values, 2 layers, 2 kv heads of 8, fp32
QUESTIONS = [
    "hello there",
    "how are you today",
    "what is your name",
    "tell me about cats",
    "where do birds go in winter",
    "is the sky blue",
    "name a colour",
    "what time is it",
    "do you like music",
    "what is two plus two",
    "say something nice",
    "why is the sea salty",
    "who are you",
    "what do you eat",
    "can you sing",
    "good night",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(chat_data, tmp_path_factory):
    """A tiny random 2510 model as a MiniMind .pth, served by `main.py serve` in its own process."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = load_tokenizer(chat_data["tokenizer"])
    config = ModelConfig(arch="minimind2", hidden_size=64, num_hidden_layers=2, vocab_size=tokenizer.vocab_size)
    pth = weights.save_pth(MiniMind(config, rngs=nnx.Rngs(5)), root / "full_sft_64.pth")
    port = free_port()
    log = open(root / "server.log", "w+")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [
        sys.executable,
        "main.py",
        "serve",
        "--load_from",
        str(pth),
        "--tokenizer_path",
        str(chat_data["tokenizer"]),
        "--kv_cache_mb",
        str(SLOT_POSITIONS * 16 * BYTES_PER_POSITION / 2**20),
    ]
    server = subprocess.Popen(
        [*command, "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited with {server.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not answer /health within two minutes")
        yield {
            "base_url": base_url,
            "client": openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=300),
            "model": weights.load(pth),
            "tokenizer": tokenizer,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def user(text):
    return [{"role": "user", "content": text}]


def greedy_content(served, messages, max_tokens=MAX_TOKENS):
    """What the server must answer: the project's `generate`, greedy, on the chat template's prompt."""
    tokenizer = served["tokenizer"]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    new = list(
        generate(served["model"], np.asarray([prompt]), max_tokens, eos_token_id=tokenizer.eos_id)[0, len(prompt) :]
    )
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_greedy_replies_streamed_or_not_are_generates(served):
    client, messages = served["client"], [{"role": "system", "content": "be brief"}, *user("hello there")]
    expected = greedy_content(served, messages)
    assert expected  # a reply with text in it, so the comparisons below mean something

    reply = client.chat.completions.create(model="any-name", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= MAX_TOKENS

    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_the_server_listens_on_loopback_alone(served):
    """Without --host it binds 127.0.0.1: another loopback address of this machine (Linux routes all of
    127/8 to it), which a server on every interface would answer, is refused."""
    port = int(served["base_url"].rsplit(":", 1)[1])
    assert httpx.get(f"{served['base_url']}/health").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.2:{port}/health", timeout=5)


def test_models_and_health(served):
    listed = served["client"].models.list().data
    assert [m.id for m in listed] == ["full_sft_64"]
    assert httpx.get(f"{served['base_url']}/health").json()["status"] == "ok"


def test_concurrent_clients_each_get_their_own_reply(served):
    expected = [greedy_content(served, user(q)) for q in QUESTIONS]
    assert len(set(expected)) > len(QUESTIONS) // 2  # the prompts lead to different replies
    steps_before = httpx.get(f"{served['base_url']}/health").json()["decode_steps"]

    def ask(question):
        reply = served["client"].chat.completions.create(
            model="minimind", messages=user(question), max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].message.content, reply.usage.completion_tokens

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(ask, QUESTIONS))
    assert [content for content, _ in got] == expected
    steps = httpx.get(f"{served['base_url']}/health").json()["decode_steps"] - steps_before
    assert steps < sum(tokens for _, tokens in got) // 2  # requests were decoded together


def test_sampled_and_greedy_requests_share_a_batch(served):
    """A sampled request decoded beside greedy ones leaves their greedy replies unchanged."""
    settings = [(q, 0.0 if i % 2 else 1.0) for i, q in enumerate(QUESTIONS[:6])]

    def ask(question_and_temperature):
        question, temperature = question_and_temperature
        reply = served["client"].chat.completions.create(
            model="m", messages=user(question), max_tokens=MAX_TOKENS, temperature=temperature, top_p=0.9
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(settings)) as pool:
        got = list(pool.map(ask, settings))
    for (question, temperature), content in zip(settings, got):
        if temperature == 0:
            assert content == greedy_content(served, user(question))


@pytest.mark.parametrize(
    "body, param, code",
    [
        (b'{"model": "m", "messages": [', None, None),
        ({"model": "m", "messages": "hello"}, "messages", None),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.[0].role", None),
        ({"model": "m", "messages": user("hi"), "max_tokens": -5}, "max_tokens", None),
        ({"model": "m", "messages": user("hi"), "temperature": "hot"}, "temperature", None),
        ({"model": "m", "messages": user("word " * 40000)}, "messages", "context_length_exceeded"),
        ({"model": "m", "messages": user("hi"), "max_tokens": 40000}, "max_tokens", "context_length_exceeded"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{served['base_url']}/v1/chat/completions", content=content, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert "\n" not in error["message"]

    with pytest.raises(openai.BadRequestError):
        served["client"].chat.completions.create(model="m", messages=[{"role": "wizard", "content": "hi"}])
    reply = served["client"].chat.completions.create(model="m", messages=user("hi"), max_tokens=2, temperature=0)
    assert reply.choices[0].message.content == greedy_content(served, user("hi"), max_tokens=2)


def test_requests_arriving_at_random_moments_get_generates_replies(served):
    """Continuous batching: 16 greedy requests sent at random moments join the decode in flight, each in its
    own slot with its own position; every reply is still greedy `generate`'s."""
    offsets = np.cumsum(np.random.default_rng(7).exponential(0.15, len(QUESTIONS)))

    def ask(index):
        time.sleep(offsets[index])
        reply = served["client"].chat.completions.create(
            model="m", messages=user(QUESTIONS[index]), max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(ask, range(len(QUESTIONS))))
    assert got == [greedy_content(served, user(question)) for question in QUESTIONS]


def test_a_short_request_joins_while_a_long_one_decodes(served):
    """A short request sent while a long prompt is read and decoded ends first: it does not wait for the
    long one's batch, and the long prompt is read in chunks between the others' steps. The short reply is
    greedy `generate`'s (long prompts read in chunks: test_continuous.py)."""
    ends, replies = {}, {}

    def ask(name, messages, max_tokens, delay):
        time.sleep(delay)
        started = time.perf_counter()
        reply = served["client"].chat.completions.create(
            model="m", messages=messages, max_tokens=max_tokens, temperature=0
        )
        ends[name] = time.perf_counter() - started + delay
        replies[name] = reply.choices[0].message.content

    long_prompt = user(" ".join(QUESTIONS) * 40)  # about 2,000 tokens: several prefill chunks
    with ThreadPoolExecutor(2) as pool:
        asked = [pool.submit(ask, "long", long_prompt, 200, 0.0), pool.submit(ask, "short", user("hi"), 3, 0.3)]
    for future in asked:
        future.result()
    assert ends["short"] < ends["long"], ends
    assert replies["short"] == greedy_content(served, user("hi"), 3)


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', "top_p"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "temperature"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "open_thinking": "yes"}', "open_thinking"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [1, 2]}', "tools.[0]"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": "abc"}', "seed"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}', "stop"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800"}]}', None),
    ],
)
def test_a_bad_request_among_requests_in_flight_fails_alone(served, raw, param):
    """Non-finite numbers, wrong types and a lone surrogate are refused with OpenAI's 400, while three good
    requests sent with the bad one get their greedy replies."""
    error = refused_among_good_requests(served, raw)
    assert error["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        # the 20k-token prompt: within the model's 32,768 positions, beyond a slot's
        ({"model": "m", "messages": user("word " * 20000)}, "messages"),
        ({"model": "m", "messages": user("hi"), "max_tokens": SLOT_POSITIONS}, "max_tokens"),
    ],
)
def test_a_request_beyond_a_slot_is_refused_while_others_decode(served, body, param):
    """Admission: a prompt or max_tokens that does not fit a slot of the KV budget gets a 400 naming the limit,
    and the requests decoding beside it get their greedy replies."""
    error = refused_among_good_requests(served, json.dumps(body).encode())
    assert error["param"] == param and error["code"] == "context_length_exceeded"
    assert f"this server gives a request {SLOT_POSITIONS}" in error["message"], error["message"]


def refused_among_good_requests(served, raw: bytes) -> dict:
    """Sends `raw` beside three good greedy requests: checks that it alone got OpenAI's 400 and that the others
    got greedy `generate`'s replies; returns the 400's error object."""
    questions = QUESTIONS[:3]

    def good(question):
        reply = served["client"].chat.completions.create(
            model="m", messages=user(question), max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].message.content

    def bad(_):
        return httpx.post(f"{served['base_url']}/v1/chat/completions", content=raw, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        replies = [pool.submit(good, question) for question in questions]
        response = pool.submit(bad, None).result()
        got = [reply.result() for reply in replies]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    assert got == [greedy_content(served, user(question)) for question in questions]
    return error


def test_stop_sequences_end_the_reply_before_them(served):
    """OpenAI's `stop`: the reply is the greedy one cut before the first stop string, streamed or not."""
    question = QUESTIONS[3]
    whole = greedy_content(served, user(question), max_tokens=MAX_TOKENS)
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert stop.strip(), whole
    expected = whole[: whole.index(stop)].strip()
    reply = served["client"].chat.completions.create(
        model="m", messages=user(question), max_tokens=MAX_TOKENS, temperature=0, stop=[stop, "never said"]
    )
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = served["client"].chat.completions.create(
        model="m", messages=user(question), max_tokens=MAX_TOKENS, temperature=0, stop=stop, stream=True
    )
    pieces, reasons = [], []
    for chunk in chunks:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected and reasons[-1] == "stop"


@pytest.mark.parametrize("host, why", [("127.0.0.1", "Address already in use"), ("999.1.1.1", "")])
def test_a_port_in_use_or_a_bad_host_is_one_error_line(served, chat_data, host, why):
    port = served["base_url"].rsplit(":", 1)[1]
    command = [sys.executable, "main.py", "serve", "--load_from", "no/such/weights.pth", "--host", host, "--port", port]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "serving" not in done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: cannot listen on {host}:{port}: ")
    assert why in done.stderr


def test_serve_without_fastapi_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else find_spec(name, *a)
    )
    for command in ("main.py", "minimind-jax"):  # the checkout's entry point, the installed command
        monkeypatch.setattr(sys, "argv", [f"/somewhere/{command}", "serve"])
        assert main.main(["serve", "--load_from", "no/such/weights.pth"]) == 1
        expected = f"error: {command} serve needs fastapi: pip install minimind-jax[serve]"
        assert capsys.readouterr().err.strip() == expected


# ---------------------------------------------------------------------------------------------------------
# Reply parsing


THOUGHT_AND_CALL = (
    "the user wants the weather\n</think>\n\nLet me look. "
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
)


def test_reasoning_and_tool_calls_are_split_out():
    content, reasoning, calls = split_reply(THOUGHT_AND_CALL)
    assert (content, reasoning) == ("Let me look.", "the user wants the weather")
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert split_reply("<think>hm</think> ok <tool_call>not json</tool_call>") == (
        "ok <tool_call>not json</tool_call>",
        "hm",
        [],
    )
    assert split_reply("  plain  ") == ("plain", None, [])


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_streamed_pieces_add_up_to_the_split_reply(cut):
    stream = ReplyStream(thinking=True)
    deltas = [stream.add(THOUGHT_AND_CALL[i : i + cut]) for i in range(0, len(THOUGHT_AND_CALL), cut)]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert reasoning == "the user wants the weather"
    assert "</" not in reasoning
    assert content == THOUGHT_AND_CALL.split("</think>")[1].strip()  # tool calls stream as text, as MiniMind's


@pytest.mark.parametrize(
    "fields",
    [
        {"open_thinking": True},
        {"chat_template_kwargs": {"enable_thinking": True}},
        {"chat_template_kwargs": {"open_thinking": True}},
    ],
)
def test_v3_thinking_requests_open_the_think_block(fields):
    tokenizer = load_tokenizer(require_shared("minimind", "v3"))
    v3 = types.SimpleNamespace(config=ModelConfig(arch="minimind3", hidden_size=64, num_hidden_layers=2))
    plain = parse_request({"messages": user("hi")}, tokenizer, v3)
    thinking = parse_request({"messages": user("hi"), **fields}, tokenizer, v3)
    assert not plain.thinking and thinking.thinking
    assert tokenizer.decode(plain.prompt_ids).endswith("<think>\n\n</think>\n\n")
    assert tokenizer.decode(thinking.prompt_ids).endswith("<|im_start|>assistant\n<think>\n")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = parse_request({"messages": user("hi"), "tools": tools}, tokenizer, v3)
    assert "get_weather" in tokenizer.decode(with_tools.prompt_ids)
    with pytest.raises(RequestError, match="tools"):
        parse_request({"messages": user("hi"), "tools": "get_weather"}, tokenizer, v3)


def test_a_request_is_admitted_only_if_it_fits_a_slot(chat_data):
    """--kv_cache_mb shares the cache among the slots; a request whose prompt and max_tokens need more
    positions than a slot has gets a 400 that names the limit (the 20k-token prompt that ran a batch out of
    memory is refused this way), and without max_tokens it gets what is left of the slot."""
    tokenizer = load_tokenizer(chat_data["tokenizer"])
    model = MiniMind(ModelConfig(arch="minimind2", hidden_size=64, num_hidden_layers=2), rngs=nnx.Rngs(0))
    assert slot_context(model, 16, 16 * 1024 * BYTES_PER_POSITION / 2**20) == 1024
    with pytest.raises(UserError, match="a slot needs at least 256"):
        slot_context(model, 16, 16 * 100 * BYTES_PER_POSITION / 2**20)
    prompt = len(parse_request({"messages": user("hi")}, tokenizer, model).prompt_ids)
    assert parse_request({"messages": user("hi")}, tokenizer, model, 1024).max_tokens == 1024 - prompt
    with pytest.raises(RequestError, match=f"need {prompt + 1024} positions; this server gives a request 1024"):
        parse_request({"messages": user("hi"), "max_tokens": 1024}, tokenizer, model, 1024)
    with pytest.raises(RequestError, match="this server gives a request 1024 positions"):
        parse_request({"messages": user("word " * 2000)}, tokenizer, model, 1024)


def test_api_key_body_limit_and_cors(chat_data):
    """--api_key: /v1 needs the bearer key (401 in OpenAI's form without it; /health stays open); bodies past
    --max_request_mb get a 413 however they are sent; CORS answers only the origins given, none by default."""
    from fastapi.testclient import TestClient

    from minimind_jax.inference.server import create_app

    tokenizer = load_tokenizer(chat_data["tokenizer"])
    config = ModelConfig(arch="minimind2", hidden_size=64, num_hidden_layers=2, vocab_size=tokenizer.vocab_size)
    model = MiniMind(config, rngs=nnx.Rngs(5))
    app = create_app(model, tokenizer, "m", max_batch_size=2, kv_cache_mb=1, api_key="secret",
                     max_request_bytes=2000, cors_origins=["http://allowed.example"])  # fmt: skip
    client = TestClient(app)
    body = {"model": "m", "messages": user("hi"), "max_tokens": 2, "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        refused = client.post("/v1/chat/completions", json=body, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401 and client.get("/health").status_code == 200
    key = {"Authorization": "Bearer secret"}
    assert client.post("/v1/chat/completions", json=body, headers=key).status_code == 200
    big = {**body, "messages": user("word " * 1000)}
    assert client.post("/v1/chat/completions", json=big, headers=key).status_code == 413
    chunked = client.post("/v1/chat/completions", content=iter([json.dumps(big).encode()]), headers=key)
    assert chunked.status_code == 413 and "limit of 2000 bytes" in chunked.json()["error"]["message"]
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://allowed.example"})
    other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://other.example"})
    assert allowed.headers.get("access-control-allow-origin") == "http://allowed.example"
    assert "access-control-allow-origin" not in other.headers
    plain = TestClient(create_app(model, tokenizer, "m", max_batch_size=2, kv_cache_mb=1))
    response = plain.post("/v1/chat/completions", json=body, headers={"Origin": "http://allowed.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_the_page_and_its_tools_are_served_with_a_strict_policy(chat_data):
    """`/` and its two files come from the package with a Content-Security-Policy that lets only them run;
    /v1/tools lists web_demo's 8 tools and /v1/tools/call runs one in the server."""
    from fastapi.testclient import TestClient

    from minimind_jax.inference.server import create_app

    tokenizer = load_tokenizer(chat_data["tokenizer"])
    config = ModelConfig(arch="minimind3", hidden_size=64, num_hidden_layers=2, vocab_size=tokenizer.vocab_size)
    client = TestClient(create_app(MiniMind(config, rngs=nnx.Rngs(5)), tokenizer, "m", max_batch_size=2,
                                   kv_cache_mb=1))  # fmt: skip
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/chat.js" defer>' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert client.get("/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../server.py").status_code == 404 and client.get("/static/x.js").status_code == 404
    names = [tool["function"]["name"] for tool in client.get("/v1/tools").json()["data"]]
    assert names == ["calculate_math", "get_current_time", "random_number", "text_length", "unit_converter",
                     "get_current_weather", "get_exchange_rate", "translate_text"]  # fmt: skip
    called = client.post("/v1/tools/call", json={"name": "calculate_math", "arguments": '{"expression": "2**10"}'})
    assert called.json() == {"name": "calculate_math", "content": '{"result": "1024"}'}
    assert client.post("/v1/tools/call", json=[1]).status_code == 400
    surrogate = b'{"name": "text_length", "arguments": {"text": "\\ud800"}}'
    assert client.post("/v1/tools/call", content=surrogate).status_code == 400
    entry = client.get("/v1/models").json()["data"][0]
    assert entry["arch"] == "minimind3" and entry["thinking"] and entry["parameters"] == num_params(config)


def test_web_opens_the_page_with_the_key(chat_data, tmp_path):
    """`main.py web` is `serve` that opens the page (with --api_key, the address that lets the browser in)."""
    tokenizer = load_tokenizer(chat_data["tokenizer"])
    config = ModelConfig(arch="minimind2", hidden_size=64, num_hidden_layers=2, vocab_size=tokenizer.vocab_size)
    pth = weights.save_pth(MiniMind(config, rngs=nnx.Rngs(5)), tmp_path / "full_sft_64.pth")
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.py"
    browser.write_text(f"import sys, pathlib; pathlib.Path({str(opened)!r}).write_text(sys.argv[1])\n")
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "BROWSER": f"{sys.executable} {browser} %s"}
    command = [sys.executable, "main.py", "web", "--load_from", pth, "--tokenizer_path", chat_data["tokenizer"],
               "--port", str(port), "--api_key", "k&1"]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if opened.exists() or server.poll() is not None:
                break
            time.sleep(0.2)
        assert opened.read_text() == f"http://127.0.0.1:{port}/?api_key=k%261"
        page = httpx.get(opened.read_text(), follow_redirects=True)
        assert page.status_code == 200 and str(page.url) == f"http://127.0.0.1:{port}/"
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=30)
