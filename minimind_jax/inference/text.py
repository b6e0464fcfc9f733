"""Generated tokens as text: decoded while they stream, and a reply split as MiniMind's server splits it.

A v3 model may think first (`<think>...</think>`) and call tools (`<tool_call>{json}</tool_call>`); `split_reply`
separates the reasoning, the answer and the tool calls (scripts/serve_openai_api.py's parse_response), and
`ReplyStream` gives the growth of the reasoning and of the answer while the text grows, so that the pieces of
a stream add up to exactly what `split_reply` gives for the whole reply.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable

from minimind_jax.data.tokenizer import Tokenizer

THINK_END = "</think>"
_THINK_BLOCK = re.compile(r"<think>(.*?)</think>\s*", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class StreamPrinter:
    """Prints a reply as tokens arrive, decoding only the newest tokens each time.

    New tokens are decoded after the piece printed before them, since a token's text can depend on what
    precedes it (SentencePiece's word-initial space). A character split over several byte tokens is held
    back until it is whole, for at most MAX_HELD_TOKENS tokens: bytes that no more tokens can complete are
    printed as U+FFFD, so the output never stalls on them.
    """

    MAX_HELD_TOKENS = 3  # a UTF-8 character is at most 4 bytes, and every token adds at least one

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.context_start = 0  # ids[context_start:printed_end]: the piece printed last, decoded again as context
        self.printed_end = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        end = len(self.ids)
        for cut in range(end, max(end - self.MAX_HELD_TOKENS, self.printed_end), -1):
            if not self._decode(cut).endswith("\ufffd"):  # ids[:cut] end on a whole character
                self._print_to(cut)
                return
        if end - self.MAX_HELD_TOKENS > self.printed_end:
            self._print_to(end - self.MAX_HELD_TOKENS)

    def finish(self) -> str:
        """Prints what is still held back (an unfinished character at the very end); returns the whole text."""
        self._print_to(len(self.ids))
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _decode(self, end: int) -> str:
        return self.tokenizer.decode(self.ids[self.context_start : end], skip_special_tokens=True)

    def _print_to(self, end: int) -> None:
        context, text = self._decode(self.printed_end), self._decode(end)
        if len(text) > len(context):
            self.write(text[len(context) :])
            self.context_start, self.printed_end = self.printed_end, end


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning or None, the rest): a `<think>...</think>` block, or, when the prompt opened the block,
    everything before the first `</think>`."""
    block = _THINK_BLOCK.search(text)
    if block:
        return block.group(1).strip(), _THINK_BLOCK.sub("", text)
    if THINK_END in text:
        reasoning, rest = text.split(THINK_END, 1)
        return reasoning.strip(), rest
    return None, text


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(text without its tool calls, the calls in OpenAI's form). A `<tool_call>` body that is not a JSON
    object stays in the text."""
    calls = []

    def take(match: re.Match) -> str:
        try:
            call = json.loads(match.group(1).strip())
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(call, dict):
            return match.group(0)
        arguments = call.get("arguments", {})
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": str(call.get("name", "")),
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
        return ""

    return _TOOL_CALL.sub(take, text), calls


def split_reply(text: str) -> tuple[str, str | None, list[dict]]:
    """(content, reasoning or None, tool calls) of a whole reply; content and reasoning are stripped."""
    reasoning, rest = split_thinking(text)
    content, calls = parse_tool_calls(rest)
    return content.strip(), reasoning, calls


class ReplyStream:
    """The reasoning and content deltas of a growing reply.

    Whitespace at either end is held back (the final pieces are stripped), and so is a tail that may be the
    start of `</think>` while the model thinks. With `thinking` (the prompt opened a `<think>` block)
    everything before `</think>` is reasoning. Tool calls stay in the streamed content, as MiniMind's server
    streams them; `split_reply` of the whole text gives the calls at the end.
    """

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.text = ""
        self.sent = {"reasoning_content": "", "content": ""}

    def add(self, piece: str) -> dict[str, str]:
        """The new text of each part, for a delta (parts with nothing new are left out)."""
        self.text += piece
        if self.thinking and THINK_END not in self.text:
            reasoning, content = _without_partial_tag(self.text), ""
        else:
            reasoning, content = split_thinking(self.text) if self.thinking else (None, self.text)
        parts = {"reasoning_content": (reasoning or "").strip(), "content": content.strip()}
        delta = {}
        for name, whole in parts.items():
            if len(whole) > len(self.sent[name]) and whole.startswith(self.sent[name]):
                delta[name] = whole[len(self.sent[name]) :]
                self.sent[name] = whole
        return delta


def _without_partial_tag(text: str) -> str:
    """`text` less a tail that could be the beginning of `</think>`."""
    for size in range(min(len(THINK_END) - 1, len(text)), 0, -1):
        if THINK_END.startswith(text[-size:]):
            return text[:-size]
    return text


class StopSequences:
    """OpenAI's `stop`: the reply ends before the first of these strings it would contain. Text is passed on as
    it arrives, but for a tail that could still grow into a stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False
        self.hold = max((len(stop) - 1 for stop in stops), default=0)

    def add(self, piece: str) -> str:
        """The text of `piece` (and of what was held back) that is now sure to precede any stop string."""
        if self.stopped:
            return ""
        self.held += piece
        found = [index for index in (self.held.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped = True
            text, self.held = self.held[: min(found)], ""
            return text
        cut = max(len(self.held) - self.hold, 0)
        text, self.held = self.held[:cut], self.held[cut:]
        return text

    def finish(self) -> str:
        """What was held back, at the reply's end."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text
