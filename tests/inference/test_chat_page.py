"""The chat page of `main.py serve` in a real browser (headless Chromium driven by Playwright).

Two servers run on real sockets: one decodes with the model (a tiny random one), for the greedy reply, stop
and the model's facts; one whose engine plays scripted replies through the server's real parsing and
streaming, for what a random model would not say: thinking, a tool call, HTML, a reply that changes when
regenerated. With MINIMIND_JAX_SCREENSHOTS=DIR, the tool round trip's screenshot is also written to
DIR/chat_page.png (the README's).
"""

import json
import os
import pathlib
import shutil
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from flax import nnx

from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.inference.generation import generate
from minimind_jax.inference.server import Finish, create_app
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
if BROWSER is None:
    pytest.skip("no Chromium to drive (Debian: apt-get install chromium)", allow_module_level=True)

SYSTEM_PROMPT = "你是MiniMind，一个乐于助人、知识渊博的AI助手。请用完整且友好的方式回答用户问题。"  # the page's
API_KEY = "page-test-key"


class ScriptedEngine:
    """Answers each job with the text `reply(prompt_text, call_number)` returns, token by token, `delay_s`
    apart, on a thread of its own; it stops early when the job is cancelled (its client left)."""

    def __init__(self, tokenizer, reply, delay_s=0.005):
        self.tokenizer, self.reply, self.delay_s = tokenizer, reply, delay_s
        self.prompts: list[str] = []
        self.cancelled = 0

    def submit(self, job) -> None:
        self.prompts.append(self.tokenizer.decode(job.prompt_ids))
        text = self.reply(self.prompts[-1], len(self.prompts))
        threading.Thread(target=self._play, args=(job, self.tokenizer.encode(text)), daemon=True).start()

    def _play(self, job, tokens) -> None:
        for token in tokens[: job.max_tokens]:
            if job.cancelled:
                self.cancelled += 1
                break
            job.deliver(token)
            time.sleep(self.delay_s)
        job.deliver(Finish("stop"))

    def progress(self) -> dict:
        return {"requests": len(self.prompts)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """An app served by uvicorn on a free port, in a thread."""

    def __init__(self, app):
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("the server did not start")

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def tokenizer(chat_data):
    return load_tokenizer(chat_data["tokenizer"])


@pytest.fixture(scope="module")
def model_server(tokenizer):
    """A tiny random v3 model decoded by the server's own engine."""
    config = ModelConfig(arch="minimind3", hidden_size=64, num_hidden_layers=2, vocab_size=tokenizer.vocab_size)
    model = MiniMind(config, rngs=nnx.Rngs(3))
    served = Served(create_app(model, tokenizer, "tiny-v3", max_batch_size=4, kv_cache_mb=64))
    yield {"served": served, "model": model}
    served.close()


def scripted_server(tokenizer, reply, **options):
    config = ModelConfig(arch="minimind3", hidden_size=64, num_hidden_layers=2, vocab_size=tokenizer.vocab_size)
    engine = ScriptedEngine(tokenizer, reply, options.pop("delay_s", 0.005))
    app = create_app(MiniMind(config, rngs=nnx.Rngs(0)), tokenizer, "scripted", engine=engine, **options)
    return Served(app), engine


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=BROWSER, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    # Without the page's Content-Security-Policy (Playwright's waits evaluate strings, which it forbids): the
    # HTML test then shows that the page itself never runs the model's text, CSP or not
    context = browser.new_context(
        viewport={"width": 1200, "height": 800}, permissions=["clipboard-read", "clipboard-write"], bypass_csp=True
    )
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()


def open_page(page, url):
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def set_slider(page, name, value):
    page.eval_on_selector(
        f"#{name}", "(input, value) => { input.value = value; input.dispatchEvent(new Event('input')); }", str(value)
    )


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_idle(page, timeout_ms=60_000):
    """Until the reply in flight (and its tool rounds) has ended."""
    page.wait_for_selector("body[data-busy=false] .turn.assistant .actions .copy", timeout=timeout_ms)


def copied_answer(page) -> str:
    page.click(".turn.assistant:last-child .actions .copy")
    return page.evaluate("navigator.clipboard.readText()")


def greedy_reply(model, tokenizer, messages, max_tokens):
    """The server's greedy reply as generate() gives it: (content, number of new tokens)."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    new = list(generate(model, np.asarray([prompt]), max_tokens, eos_token_id=tokenizer.eos_id)[0, len(prompt) :])
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def test_streamed_reply_is_the_greedy_reply_and_the_model_is_named(page, model_server, tokenizer):
    served = model_server["served"]
    open_page(page, served.url)
    assert page.inner_text("#model-name") == "tiny-v3"
    size = page.inner_text("#model-size")
    assert "minimind3" in size and "M parameters" in size
    set_slider(page, "temperature", 0)
    set_slider(page, "max_tokens", 48)
    send(page, "tell me about cats")
    wait_idle(page)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "tell me about cats"}]
    expected, _ = greedy_reply(model_server["model"], tokenizer, messages, 48)
    assert expected
    assert copied_answer(page) == expected
    api = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 48},
                     timeout=60).json()  # fmt: skip
    assert api["choices"][0]["message"]["content"] == expected
    assert page.errors == []


def test_stop_ends_generation(page, model_server, tokenizer):
    served = model_server["served"]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "why is the sea salty"}]
    _, length = greedy_reply(model_server["model"], tokenizer, messages, 400)
    assert length == 400, "the greedy reply must outlast the click on stop"
    open_page(page, served.url)
    set_slider(page, "temperature", 0)  # max_tokens stays at its default: the whole context
    send(page, "why is the sea salty")
    page.wait_for_function("document.querySelector('.turn.assistant .answer')?.textContent.length > 0")
    page.click("#stop")
    wait_idle(page)
    assert page.is_visible(".turn.assistant .stopped")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    for _ in range(100):  # the server frees the row at its next step
        if httpx.get(f"{served.url}/health").json()["busy_slots"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(f"{served.url}/health").json()["busy_slots"] == 0
    shown = page.inner_text(".turn.assistant .answer")
    time.sleep(0.5)
    assert page.inner_text(".turn.assistant .answer") == shown


THOUGHT = "Adding two and three is simple arithmetic, so I can answer at once."


def test_thinking_is_open_while_it_streams_then_folds(page, tokenizer):
    served, _ = scripted_server(tokenizer, lambda prompt, n: f"{THOUGHT}\n</think>\n\nIt is **5**.", delay_s=0.03)
    try:
        open_page(page, served.url)
        assert page.is_visible("#thinking-switch")
        page.check("#thinking")
        send(page, "what is 2 + 3")
        page.wait_for_function("document.querySelector('details.thinking .reasoning')?.textContent.length > 10")
        assert page.eval_on_selector("details.thinking", "details => details.open")
        assert page.inner_text(".turn.assistant .answer") == ""
        wait_idle(page)
        assert not page.eval_on_selector("details.thinking", "details => details.open")
        assert page.text_content("details.thinking .reasoning") == THOUGHT
        assert page.inner_text(".turn.assistant .answer strong") == "5"
        assert not page.is_visible("details.thinking .reasoning")  # folded
        page.click("details.thinking summary")
        assert page.is_visible("details.thinking .reasoning")
        assert page.errors == []
    finally:
        served.close()


def calculator_script(prompt, call_number):
    if "<tool_response>" not in prompt:
        return ("The user wants a product; the calculator gives it exactly.\n</think>\n\n<tool_call>\n"
                '{"name": "calculate_math", "arguments": {"expression": "12*7"}}\n</tool_call>')  # fmt: skip
    result = json.loads(prompt.split("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0])["result"]
    return (f"The tool says {result}.\n</think>\n\n**12 × 7 = {result}**\n\n| a | b | a × b |\n|---|---|---|\n"
            f"| 12 | 7 | {result} |")  # fmt: skip


def test_a_tool_call_round_trip_shows_its_result(page, tokenizer, tmp_path):
    served, engine = scripted_server(tokenizer, calculator_script)
    try:
        open_page(page, served.url)
        page.check("#thinking")
        page.check("#tools input[value=calculate_math]")
        send(page, "What is 12 × 7?")
        wait_idle(page)
        assert len(engine.prompts) == 2
        # The server ran the tool, and the result reached the model as MiniMind's template places it
        assert '<tool_response>\n{"result": "84"}\n</tool_response>' in engine.prompts[1]
        assert '"name": "calculate_math"' in engine.prompts[0]  # the tool was offered
        card = page.inner_text(".tool-call")
        assert "calculate_math" in card and '{"result": "84"}' in card
        assert page.inner_text(".turn.assistant .answer strong") == "12 × 7 = 84"
        assert page.inner_text(".turn.assistant table td:last-child") == "84"
        assert "<tool_call>" not in page.inner_text(".turn.assistant .body")
        assert page.errors == []
        page.screenshot(path=tmp_path / "chat_page.png")
        if directory := os.environ.get("MINIMIND_JAX_SCREENSHOTS"):
            shutil.copy(tmp_path / "chat_page.png", pathlib.Path(directory) / "chat_page.png")
    finally:
        served.close()


HOSTILE = ('<script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> '
           '[click](javascript:window.pwned=3) **bold**\n\n```html\n<b>code</b>\n```')  # fmt: skip


def test_a_reply_holding_html_is_shown_as_text(page, tokenizer):
    served, _ = scripted_server(tokenizer, lambda prompt, n: HOSTILE)
    try:
        open_page(page, served.url)
        send(page, '<img src=y onerror="window.pwned = 4">')
        wait_idle(page)
        answer = ".turn.assistant .answer"
        assert page.evaluate("window.pwned") is None
        assert page.query_selector_all(f"{answer} script, {answer} img, {answer} a, .turn.user img") == []
        shown = page.inner_text(answer)
        assert "<script>window.pwned = 1</script>" in shown and 'onerror="window.pwned = 2"' in shown
        assert page.inner_text(f"{answer} strong") == "bold"
        assert page.inner_text(f"{answer} pre code") == "<b>code</b>"
        assert page.inner_text(".turn.user") == '<img src=y onerror="window.pwned = 4">'
    finally:
        served.close()


def test_regenerate_replaces_the_last_answer(page, tokenizer):
    served, engine = scripted_server(tokenizer, lambda prompt, n: f"Answer number {n}.")
    try:
        open_page(page, served.url)
        send(page, "hello")
        wait_idle(page)
        assert page.inner_text(".turn.assistant .answer") == "Answer number 1."
        page.click(".turn.assistant .actions .regenerate")
        page.wait_for_selector("text=Answer number 2.")
        wait_idle(page)
        assert page.locator(".turn.assistant").count() == 1
        assert page.inner_text(".turn.assistant .answer") == "Answer number 2."
        assert engine.prompts[0] == engine.prompts[1]  # the same question, asked again
        page.click("#new-chat")
        assert page.locator(".turn").count() == 0
    finally:
        served.close()


def test_the_language_switch(page, tokenizer):
    served, _ = scripted_server(tokenizer, lambda prompt, n: "ok")
    try:
        open_page(page, served.url)
        page.click(".languages button[data-lang=zh]")
        assert (
            page.inner_text("#send") == "发送" and page.get_attribute("#input", "placeholder") == "给 MiniMind 发送消息"
        )
        page.click(".languages button[data-lang=en]")
        assert page.inner_text("#send") == "Send"
    finally:
        served.close()


def test_the_page_needs_the_api_key(browser, tokenizer):
    served, _ = scripted_server(tokenizer, lambda prompt, n: "Hello with a key.", api_key=API_KEY)
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    try:
        page = context.new_page()
        assert page.goto(served.url).status == 401
        assert page.query_selector("#composer") is None
        assert page.goto(f"{served.url}/static/chat.js").status == 401
        assert page.goto(f"{served.url}/?api_key=wrong").status == 401
        assert httpx.get(f"{served.url}/v1/models").status_code == 401
        page.goto(f"{served.url}/?api_key={API_KEY}")
        assert page.url == f"{served.url}/"  # the key left the address bar
        page.wait_for_selector("body[data-ready=true]")
        send(page, "hi")
        wait_idle(page)
        assert page.inner_text(".turn.assistant .answer") == "Hello with a key."
        cookie = {c["name"]: c for c in context.cookies()}["minimind_jax_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and API_KEY not in cookie["value"]
        bearer = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.get(f"{served.url}/v1/models", headers=bearer).status_code == 200
    finally:
        context.close()
        served.close()
