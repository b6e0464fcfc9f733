"""An OpenAI-compatible chat server: `/v1/chat/completions` (streamed or not), `/v1/models`, `/health`, and
a chat page at `/` (inference/web/: plain HTML, CSS and JS that call this API; nothing fetched from elsewhere)
with web_demo's tools, which run here (`/v1/tools`, `/v1/tools/call`; inference/tools.py).

It takes the request fields of MiniMind's scripts/serve_openai_api.py: `temperature` (0: greedy), `top_p`,
`max_tokens`, `stream`, `tools` (the template lists them; `<tool_call>` blocks in the reply become
`tool_calls`) and, for v3, `open_thinking` or `chat_template_kwargs` (the reasoning comes back as
`reasoning_content`). Any `model` name is accepted. Bad requests get OpenAI's error body with a 4xx status.

With an API key, the API needs `Authorization: Bearer <key>` and the page a cookie: opening `/?api_key=<key>`
sets it (HttpOnly, same-site only, and not the key itself) and sends the browser on to `/`.

Requests are decoded with continuous batching by default (`continuous.SlotEngine`): each takes a slot of one
fixed-size KV cache, joins the running decode at the next step, reads its prompt in chunks between the
others' steps, and frees its slot as soon as it ends. A request is admitted only if its prompt and max_tokens
fit a slot (`context` positions, from the cache's memory budget); otherwise it gets a 400 naming the limit.
With `batching="static"` (`BatchEngine`), requests that arrive together are decoded together instead: its
thread takes the waiting requests (after a batch of several, it first waits at most a short window for a
full batch), left-pads their prompts into one batch and decodes it until every row has stopped; requests that
arrive meanwhile wait for the next batch. Batch sizes are padded to a power of two and prompt and cache
lengths are bucketed (`generation.Decoder`), so it compiles a few programs per size.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import importlib.resources
import json
import math
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from minimind_jax.data.records import BadRecord, check_unicode
from minimind_jax.data.tokenizer import Tokenizer
from minimind_jax.errors import UserError
from minimind_jax.inference.continuous import PREFILL_CHUNK, SlotEngine, cache_bytes_per_position
from minimind_jax.inference.generation import Decoder, Sampling
from minimind_jax.inference.text import ReplyStream, StopSequences, StreamPrinter, split_reply
from minimind_jax.inference.tools import DEMO_TOOLS, run_demo_tool
from minimind_jax.model.config import num_params
from minimind_jax.model.transformer import MiniMind
from minimind_jax.runtime import release_freed_memory

# MiniMind's server defaults (serve_openai_api.py), and its model's generate() top_k
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.92
DEFAULT_MAX_TOKENS = 8192
TOP_K = 50
ROLES = ("system", "user", "assistant", "tool")
FIRST_NEW_TOKEN_SLOTS = 256  # the cache starts with room for this many new tokens and doubles as needed
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
PAGE_FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}
PAGE_PATHS = {"/", *(f"/static/{name}" for name in PAGE_FILES)}
PAGE_COOKIE = "minimind_jax_session"
# The page runs only its own files and talks only to this server; nothing else loads, nothing frames it
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
KEY_FORM = """<!doctype html><meta charset="utf-8"><title>minimind-jax</title>
<form method="get" action="/"><p>This server needs its API key.</p>
<input name="api_key" type="password" autofocus> <button>Open</button></form>"""


class RequestError(Exception):
    """A request the server refuses: answered with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(error: RequestError) -> JSONResponse:
    body = {"message": error.message, "type": "invalid_request_error", "param": error.param, "code": error.code}
    if error.status >= 500:
        body["type"] = "server_error"
    return JSONResponse({"error": body}, status_code=error.status)


# ---------------------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass
class ChatRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    thinking: bool  # the prompt opened a <think> block
    stop: list[str]  # the reply ends before the first of these it would contain


def _number(body: dict, name: str, default, low: float, high: float | None = None, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not math.isfinite(value):  # NaN compares false with every bound
        raise RequestError(f"'{name}' must be a finite number, got {value!r}", name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"'{name}' must be {bounds}, got {value!r}", name)
    return value


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", "messages")
    checked = []
    for index, message in enumerate(messages):
        param = f"messages.[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{param} must be an object with 'role' and 'content'", param)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
        if isinstance(content, list):  # OpenAI's content parts: only text parts have a meaning here
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise RequestError(f"{param}.content: only text parts are supported", f"{param}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        if not (isinstance(content, str) or (content is None and role == "assistant")):
            raise RequestError(f"{param}.content must be a string", f"{param}.content")
        checked.append({**message, "content": content or ""})
    return checked


def _open_thinking(body: dict) -> bool:
    """MiniMind's ways to ask for thinking: `open_thinking`, or chat_template_kwargs' open_thinking or
    enable_thinking."""
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    switches = {"open_thinking": body.get("open_thinking"),
                "chat_template_kwargs.open_thinking": template_kwargs.get("open_thinking"),
                "chat_template_kwargs.enable_thinking": template_kwargs.get("enable_thinking")}  # fmt: skip
    for param, value in switches.items():
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"'{param}' must be true or false, got {value!r}", param)
    return any(switches.values())


def _tools(body: dict) -> list | None:
    tools = body.get("tools") or None
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(
                f"tools.[{index}] must be an object with 'function': {{'name': ...}}", f"tools.[{index}]"
            )
    return tools


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not (
        isinstance(stops, list) and len(stops) <= MAX_STOP_SEQUENCES and all(isinstance(x, str) and x for x in stops)
    ):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them",
                           "stop")  # fmt: skip
    return stops


def _check_unicode(body) -> None:
    try:
        check_unicode(body)
    except BadRecord:
        raise RequestError("the request holds text that is not valid Unicode (a lone surrogate)") from None


def parse_request(body, tokenizer: Tokenizer, model: MiniMind, context: int | None = None) -> ChatRequest:
    """The checked request, its prompt rendered with the chat template; RequestError when it is refused.
    context: the most positions (prompt and max_tokens) a request may take (default: the model's)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_unicode(body)
    messages = _messages(body)
    tools = _tools(body)
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is supported", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    stream_options = body.get("stream_options") or {}
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE, 0.0)
    top_p = _number(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0)
    if top_p <= 0:
        raise RequestError(f"'top_p' must be > 0, got {top_p}", "top_p")
    token_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, token_field, None, 1, integer=True)

    thinking = _open_thinking(body) and model.config.is_v3
    template_kwargs = {"open_thinking": True} if thinking else {}
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **template_kwargs)
    except UserError as error:
        raise RequestError(str(error), "messages") from None
    prompt_ids = tokenizer.encode(text)
    positions = min(model.config.max_position_embeddings, context or model.config.max_position_embeddings)
    holder = "this model has" if positions == model.config.max_position_embeddings else "this server gives a request"
    if len(prompt_ids) >= positions:
        raise RequestError(
            f"the prompt is {len(prompt_ids)} tokens; {holder} {positions} positions and needs room for at least one "
            "new token",
            "messages",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, positions - len(prompt_ids))
    if len(prompt_ids) + max_tokens > positions:
        raise RequestError(
            f"the prompt ({len(prompt_ids)} tokens) and {token_field} ({max_tokens}) need "
            f"{len(prompt_ids) + max_tokens} positions; {holder} {positions}",
            token_field,
            "context_length_exceeded",
        )
    return ChatRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        stream=stream,
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        thinking=thinking,
        stop=_stop(body),
    )


# ---------------------------------------------------------------------------------------------------------
# Batched decoding


@dataclasses.dataclass(frozen=True)
class Finish:
    """The last event of a job: why it ended ("stop": eos, "length": max_tokens, "error")."""

    reason: str
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Job:
    """One request's decoding. `deliver` is called from the engine's thread with each new token id, then a
    Finish."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    deliver: Callable[[int | Finish], None]
    cancelled: bool = False  # the client went away: the row stops


def batch_bucket(rows: int, max_batch_size: int) -> int:
    """Rows padded up to a power of two (at most max_batch_size): one compiled program per bucket."""
    return min(1 << (rows - 1).bit_length(), max_batch_size)


class BatchEngine:
    """Decodes the submitted jobs in batches, on a thread of its own (see the module docstring)."""

    def __init__(self, model: MiniMind, eos_id: int, max_batch_size: int = 16, batch_window_s: float = 0.02):
        self.model, self.eos_id = model, eos_id
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.positions = model.config.max_position_embeddings
        self._waiting: collections.deque[Job] = collections.deque()
        self._wakeup = threading.Condition()
        self.batches = 0  # decoded so far
        self._last_batch_size = 1
        threading.Thread(target=self._serve_forever, name="batch-engine", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            self._waiting.append(job)
            self._wakeup.notify()

    def progress(self) -> dict:
        """What /health reports."""
        return {"batches": self.batches}

    def _fits(self, jobs: list[Job]) -> bool:
        """Every row ends within the model's positions: left padding puts all prompts at the widest's end."""
        width = max(len(job.prompt_ids) for job in jobs)
        return all(width + job.max_tokens <= self.positions for job in jobs)

    def _next_batch(self) -> list[Job]:
        with self._wakeup:
            self._wakeup.wait_for(lambda: self._waiting)
            expected = self.max_batch_size if self._last_batch_size > 1 else 1
            deadline = time.monotonic() + self.batch_window_s
            while len(self._waiting) < expected and (left := deadline - time.monotonic()) > 0:
                self._wakeup.wait(left)
            batch, later = [], []
            while self._waiting and len(batch) < self.max_batch_size:
                job = self._waiting.popleft()
                if job.cancelled:
                    continue
                (batch if self._fits([*batch, job]) else later).append(job)
            self._waiting.extendleft(reversed(later))
            self._last_batch_size = max(len(batch), 1)
            return batch

    def _serve_forever(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._decode(batch)
            except Exception as error:  # the server keeps serving; these requests get a 500
                traceback.print_exc(file=sys.stderr)
                for job in batch:
                    job.deliver(Finish("error", f"{type(error).__name__}: {error}"))
            with self._wakeup:
                idle = not self._waiting
            if idle:  # the burst is over: its working memory goes back to the OS
                release_freed_memory()

    def _decode(self, batch: list[Job]) -> None:
        rows = batch_bucket(len(batch), self.max_batch_size)
        padded = batch + [batch[-1]] * (rows - len(batch))  # filler rows repeat a request; their tokens are dropped
        width = max(len(job.prompt_ids) for job in batch)
        ids_BT = np.zeros((rows, width), np.int32)
        mask_BT = np.zeros((rows, width), np.int32)
        for row, job in enumerate(padded):
            ids_BT[row, width - len(job.prompt_ids) :] = job.prompt_ids
            mask_BT[row, width - len(job.prompt_ids) :] = 1
        temperatures = [job.temperature for job in padded]
        sampling = Sampling.per_row(temperatures, [TOP_K] * rows, [job.top_p for job in padded], [1.0] * rows)
        decoder = Decoder(
            self.model, do_sample=any(t > 0 for t in temperatures), eos_token_id=self.eos_id, sampling=sampling
        )
        longest = max(job.max_tokens for job in batch)
        self.batches += 1
        state = decoder.start(
            ids_BT, mask_BT, seed=self.batches, expected_new_tokens=min(longest, FIRST_NEW_TOKEN_SLOTS)
        )
        running = dict(enumerate(batch))
        for step in range(longest):
            if step:
                state = decoder.step(state)
            tokens_B = np.asarray(state.tokens_B)
            for row, job in list(running.items()):
                token = int(tokens_B[row])
                if job.cancelled or token == self.eos_id:
                    job.deliver(Finish("stop"))
                elif step + 1 == job.max_tokens:
                    job.deliver(token)
                    job.deliver(Finish("length"))
                else:
                    job.deliver(token)
                    continue
                del running[row]
            if not running:
                return


# ---------------------------------------------------------------------------------------------------------
# The HTTP app


def slot_context(model: MiniMind, slots: int, kv_cache_mb: float) -> int:
    """The positions each of `slots` slots gets from a KV cache of kv_cache_mb MiB: a multiple of the prefill
    chunk, at most the model's positions."""
    per_slot = int(kv_cache_mb * 2**20) // (slots * cache_bytes_per_position(model))
    context = min(per_slot, model.config.max_position_embeddings) // PREFILL_CHUNK * PREFILL_CHUNK
    if context < PREFILL_CHUNK:
        raise UserError(f"--kv_cache_mb {kv_cache_mb} gives {slots} slots {per_slot} positions each; a slot needs "
                        f"at least {PREFILL_CHUNK}: give more memory or a smaller --max_batch_size")  # fmt: skip
    return context


def create_app(
    model: MiniMind,
    tokenizer: Tokenizer,
    model_id: str,
    max_batch_size: int = 16,
    batch_window_s: float = 0.02,
    batching: str = "continuous",
    kv_cache_mb: float = 1024,
    api_key: str | None = None,
    max_request_bytes: int = 8 * 2**20,
    cors_origins: list[str] | None = None,
    engine=None,
) -> FastAPI:
    """The FastAPI app over one model; its engine thread starts here. batching: "continuous" (max_batch_size
    slots sharing kv_cache_mb of KV cache) or "static" (batch_window_s applies). api_key: the API and the page
    need it (see the module docstring). max_request_bytes: larger bodies get a 413. cors_origins: the origins
    whose pages may call the API (none by default). engine: decodes the jobs instead of one built here (it
    takes `submit(job)` and reports `progress()`)."""
    context = None
    if engine is None and batching == "continuous":
        context = slot_context(model, max_batch_size, kv_cache_mb)
        engine = SlotEngine(model, tokenizer.eos_id, slots=max_batch_size, context=context, finish=Finish)
    elif engine is None:
        engine = BatchEngine(model, tokenizer.eos_id, max_batch_size, batch_window_s)
    created = int(time.time())
    app = FastAPI(title="minimind-jax", description="OpenAI-compatible chat completions")
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    # The page's cookie proves the key without holding it
    session = hashlib.sha256(f"minimind-jax page session:{api_key}".encode()).hexdigest() if api_key else None

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        path = request.url.path
        # A CORS preflight carries no credentials; the request it announces does
        if api_key is None or request.method == "OPTIONS" or not (path.startswith("/v1") or path in PAGE_PATHS):
            return await call_next(request)
        given_key = request.query_params.get("api_key")
        if path == "/" and given_key is not None and hmac.compare_digest(given_key.encode(), api_key.encode()):
            opened = RedirectResponse("/", status_code=303)  # the key leaves the address bar
            opened.set_cookie(PAGE_COOKIE, session, httponly=True, samesite="strict")
            return opened
        bearer = request.headers.get("authorization", "").encode()
        cookie = request.cookies.get(PAGE_COOKIE, "").encode()
        if hmac.compare_digest(bearer, f"Bearer {api_key}".encode()) or hmac.compare_digest(cookie, session.encode()):
            return await call_next(request)
        if path.startswith("/v1"):
            return error_response(RequestError("a valid API key is needed: Authorization: Bearer <key>",
                                               code="invalid_api_key", status=401))  # fmt: skip
        return HTMLResponse(KEY_FORM, status_code=401, headers=PAGE_HEADERS)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        return error_response(RequestError(str(error.detail), status=error.status_code))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "batching": batching, "context": context, **engine.progress()}

    @app.get("/")
    async def page():
        return HTMLResponse(_page_file("index.html"), headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def page_file(name: str):
        if name not in PAGE_FILES:
            return error_response(RequestError(f"no such file: {name}", status=404))
        return Response(_page_file(name), media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @app.get("/v1/models")
    async def models():
        config = model.config
        entry = {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "minimind-jax",
            "max_model_len": context or config.max_position_embeddings,
            "arch": config.arch,
            "parameters": num_params(config),
            "thinking": config.is_v3,  # open_thinking means something to v3's template only
        }
        return {"object": "list", "data": [entry]}

    @app.get("/v1/tools")
    async def tools():
        return {"object": "list", "data": DEMO_TOOLS}

    @app.post("/v1/tools/call")
    async def call_tool(request: Request):
        """Runs one tool call of the page's: {"name", "arguments"} -> {"content": the tool turn's content}."""
        try:
            body = await _json_body(request, max_request_bytes)
            if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                raise RequestError("the body must be an object with a 'name' and 'arguments'", "name")
            _check_unicode(body)
        except RequestError as error:
            return error_response(error)
        content = await asyncio.to_thread(run_demo_tool, body["name"], body.get("arguments", {}))
        return {"name": body["name"], "content": content}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            chat = parse_request(await _json_body(request, max_request_bytes), tokenizer, model, context)
        except RequestError as error:
            return error_response(error)

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(
            chat.prompt_ids,
            chat.max_tokens,
            chat.temperature,
            chat.top_p,
            deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        )
        engine.submit(job)
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(
                _stream(job, events, chat, tokenizer, reply_id, now, model_id), media_type="text/event-stream"
            )

        reply = ReplyText(tokenizer, chat.stop)
        while not isinstance(event := await events.get(), Finish):
            reply.add(event)
            if reply.stops.stopped:
                job.cancelled, event = True, Finish("stop")  # the engine frees the row at its next step
                break
        if event.reason == "error":
            return error_response(RequestError(f"generation failed: {event.error}", status=500))
        content, reasoning, tool_calls = split_reply(reply.finish())
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": now,
            "model": model_id,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(event, tool_calls)}
            ],
            "usage": _usage(chat, reply.num_tokens),
        }

    return app


def _page_file(name: str) -> bytes:
    return importlib.resources.files("minimind_jax.inference").joinpath("web", name).read_bytes()


class ReplyText:
    """A reply's text as its tokens arrive, cut before the request's first stop sequence: `add(token)` returns
    the new text that is sure to stay (decoded as StreamPrinter decodes, held back where a stop string may
    begin); `finish()` returns the whole text."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.pieces: list[str] = []
        self.printer, self.stops = StreamPrinter(tokenizer, self.pieces.append), StopSequences(stops)
        self.text, self.num_tokens = "", 0

    def add(self, token: int) -> str:
        self.num_tokens += 1
        self.printer.add(token)
        return self._take()

    def finish(self) -> str:
        if not self.stops.stopped:
            self.printer.finish()
            self._take()
            self.text += self.stops.finish()
        return self.text

    def _take(self) -> str:
        new = "".join(self.stops.add(piece) for piece in self.pieces)
        self.pieces.clear()
        self.text += new
        return new


async def _json_body(request: Request, limit: int):
    """The request's body parsed as JSON, read no further than `limit` bytes."""
    try:
        return json.loads(await _body_within(request, limit))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None


async def _body_within(request: Request, limit: int) -> bytes:
    """The request's body, read no further than `limit` bytes (a 413 past it, however it is sent)."""
    too_large = RequestError(f"the request body is over this server's limit of {limit} bytes", status=413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _finish_reason(event: Finish, tool_calls: list) -> str:
    return "tool_calls" if tool_calls else event.reason


def _usage(chat: ChatRequest, completion_tokens: int) -> dict:
    prompt_tokens = len(chat.prompt_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _stream(job: Job, events: asyncio.Queue, chat: ChatRequest, tokenizer, reply_id, created, model_id):
    """Server-sent events as OpenAI sends them: a role chunk, content (and reasoning) deltas, a chunk with
    the finish reason (after the tool calls, if any), the usage when asked, then `data: [DONE]`."""

    def event(delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = (
            [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )
        chunk = {
            "id": reply_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    text, reply = ReplyText(tokenizer, chat.stop), ReplyStream(chat.thinking)
    try:
        yield event({"role": "assistant", "content": ""})
        while not isinstance(token := await events.get(), Finish):
            if delta := reply.add(text.add(token)):
                yield event(delta)
            if text.stops.stopped:
                job.cancelled, token = True, Finish("stop")
                break
        if token.reason == "error":
            error = {
                "message": f"generation failed: {token.error}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        before = len(text.text)
        if delta := reply.add(text.finish()[before:]):
            yield event(delta)
        _, _, tool_calls = split_reply(text.text)
        if tool_calls:
            yield event({"tool_calls": [{"index": i, **call} for i, call in enumerate(tool_calls)]})
        yield event({}, _finish_reason(token, tool_calls))
        if chat.include_usage:
            yield event(None, usage=_usage(chat, text.num_tokens))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # after the end this changes nothing; a client that left stops its row
