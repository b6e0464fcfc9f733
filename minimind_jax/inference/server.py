"""An OpenAI-compatible chat server: `/v1/chat/completions` (streamed or not), `/v1/models`, `/health`.

It takes the request fields of MiniMind's scripts/serve_openai_api.py: `temperature` (0: greedy), `top_p`,
`max_tokens`, `stream`, `tools` (the template lists them; `<tool_call>` blocks in the reply become
`tool_calls`) and, for v3, `open_thinking` or `chat_template_kwargs` (the reasoning comes back as
`reasoning_content`). Any `model` name is accepted. Bad requests get OpenAI's error body with a 4xx status.

Requests that arrive together are decoded together (`BatchEngine`). Its thread takes the waiting requests
(after a batch of several, it first waits at most a short window for a full batch, since a batch's clients
tend to come back together; after a batch of one nobody waits), left-pads their prompts into one batch and
decodes it step by step with each row's own sampling settings; a row stops at its eos or its max_tokens, the
batch when every row has stopped. Requests that arrive meanwhile wait for the next batch. Batch sizes are
padded to a power of two and prompt and cache lengths are bucketed (`generation.Decoder`), so the server
compiles a few programs per size and never one per request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from minimind_jax.data.tokenizer import Tokenizer
from minimind_jax.errors import UserError
from minimind_jax.inference.generation import Decoder, Sampling, check_room
from minimind_jax.inference.text import ReplyStream, StreamPrinter, split_reply
from minimind_jax.model.transformer import MiniMind

# MiniMind's server defaults (serve_openai_api.py), and its model's generate() top_k
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.92
DEFAULT_MAX_TOKENS = 8192
TOP_K = 50
ROLES = ("system", "user", "assistant", "tool")
FIRST_NEW_TOKEN_SLOTS = 256  # the cache starts with room for this many new tokens and doubles as needed


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


def _number(body: dict, name: str, default, low: float, high: float | None = None, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
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
    return bool(
        body.get("open_thinking") or template_kwargs.get("open_thinking") or template_kwargs.get("enable_thinking")
    )


def parse_request(body, tokenizer: Tokenizer, model: MiniMind) -> ChatRequest:
    """The checked request, its prompt rendered with the chat template; RequestError when it is refused."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = _messages(body)
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    if body.get("n", 1) != 1:
        raise RequestError("only n = 1 is supported", "n")
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
    positions = model.config.max_position_embeddings
    if len(prompt_ids) >= positions:
        raise RequestError(
            f"the prompt is {len(prompt_ids)} tokens; this model has {positions} positions and needs room for at "
            "least one new token",
            "messages",
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, positions - len(prompt_ids))
    try:
        check_room(model.config, len(prompt_ids), max_tokens)
    except UserError as error:
        raise RequestError(str(error), token_field, "context_length_exceeded") from None
    return ChatRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        stream=stream,
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        thinking=thinking,
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
        self.batches = 0  # decoded so far (/health reports it)
        self._last_batch_size = 1
        threading.Thread(target=self._serve_forever, name="batch-engine", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            self._waiting.append(job)
            self._wakeup.notify()

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


def create_app(
    model: MiniMind, tokenizer: Tokenizer, model_id: str, max_batch_size: int = 16, batch_window_s: float = 0.02
) -> FastAPI:
    """The FastAPI app over one model; its engine thread starts here."""
    engine = BatchEngine(model, tokenizer.eos_id, max_batch_size, batch_window_s)
    created = int(time.time())
    app = FastAPI(title="minimind-jax", description="OpenAI-compatible chat completions")

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        return error_response(RequestError(str(error.detail), status=error.status_code))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "batches": engine.batches}

    @app.get("/v1/models")
    async def models():
        entry = {"id": model_id, "object": "model", "created": created, "owned_by": "minimind-jax"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(f"the request body is not valid JSON: {error}") from None
            chat = parse_request(body, tokenizer, model)
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

        ids = []
        while not isinstance(event := await events.get(), Finish):
            ids.append(event)
        if event.reason == "error":
            return error_response(RequestError(f"generation failed: {event.error}", status=500))
        content, reasoning, tool_calls = split_reply(tokenizer.decode(ids, skip_special_tokens=True))
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
            "usage": _usage(chat, len(ids)),
        }

    return app


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

    pieces: list[str] = []
    printer, reply = StreamPrinter(tokenizer, pieces.append), ReplyStream(chat.thinking)
    num_tokens = 0
    try:
        yield event({"role": "assistant", "content": ""})
        while not isinstance(token := await events.get(), Finish):
            num_tokens += 1
            printer.add(token)
            for piece in pieces:
                if delta := reply.add(piece):
                    yield event(delta)
            pieces.clear()
        if token.reason == "error":
            error = {
                "message": f"generation failed: {token.error}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        text = printer.finish()
        for piece in pieces:
            if delta := reply.add(piece):
                yield event(delta)
        _, _, tool_calls = split_reply(text)
        if tool_calls:
            yield event({"tool_calls": [{"index": i, **call} for i, call in enumerate(tool_calls)]})
        yield event({}, _finish_reason(token, tool_calls))
        if chat.include_usage:
            yield event(None, usage=_usage(chat, num_tokens))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # after the end this changes nothing; a client that left stops its row
