"""Tokenizers for MiniMind: one interface, two backends, and the chat template that goes with each.

- A MiniMind tokenizer directory (`tokenizer.json` + `tokenizer_config.json`, either era) is read with HF
  `tokenizers`; its Jinja chat template is rendered exactly as `transformers.apply_chat_template` renders it.
- A SentencePiece `.model` (trained here by `train_sentencepiece`) is a BPE with byte fallback whose ids 0/1/2
  are MiniMind's `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`. Its ChatML template is in `{prefix}_config.json`.

Both backends encode without adding special tokens, and both recognise the special-token strings inside text.
"""

from __future__ import annotations

import abc
import datetime
import io
import json
import logging
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import sentencepiece
import tokenizers

from minimind_jax.errors import UserError, first_line

logger = logging.getLogger(__name__)

# Every MiniMind vocabulary starts with these three: pad (0), bos (1), eos (2).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The SFT loss-mask markers (MiniMind's SFTDataset looks for these token sequences).
ASSISTANT_MARKERS = ("<|im_start|>assistant", "<|im_start|>assistant\n", "<|im_end|>", "<|im_end|>\n")

# Token ids of "<|im_start|>assistant" in each era's 6400-token vocabulary (MINIMIND_SPEC.md): the two
# vocabularies differ, so these ids tell the eras apart.
_ARCH_FINGERPRINTS = {
    (1, 1078, 538, 501): "minimind2",
    (1, 1388, 570, 811): "minimind3",
}

# ChatML, as MiniMind 2510 writes it: an optional default system prompt, tools in the system turn,
# tool results as a user turn of <tool_response> blocks, and `<|im_start|>assistant\n` as generation prompt.
CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments' }}
    {{- ' within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- elif default_system_prompt %}
    {{- '<|im_start|>system\\n' + default_system_prompt + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role in ('user', 'system') %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' + content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {%- set call = tool_call.function or tool_call %}
            {%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + arguments + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('unknown role ' + message.role | string) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""


# ---------------------------------------------------------------------------------------------------------
# Chat templates


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers' templates use to mark assistant text.

    Rendered as its body inside a call block, so scoping is the same as under transformers.
    """

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: plain json.dumps (jinja's own escapes <, >, & and ' for HTML).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)


def _chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A Jinja environment configured as transformers configures the one behind `apply_chat_template`."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A Jinja chat template plus the constant variables it sees (bos_token, eos_token, ...).

    `origin` names the file the template came from, for error messages.
    """

    def __init__(self, source: str, constants: dict[str, Any], origin: str):
        self.source = source
        self.constants = dict(constants)
        self.origin = origin
        try:
            self._template = _chat_environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise UserError(
                f"{origin}: chat_template does not parse: {error.message} (template line {error.lineno})"
            ) from None

    def __reduce__(self):
        # Compiled templates do not pickle; data-loader workers rebuild them from the source.
        return ChatTemplate, (self.source, self.constants, self.origin)

    def render(self, messages: Sequence[dict], *, tools=None, add_generation_prompt=False, **template_kwargs) -> str:
        context = {"documents": None, **self.constants, **template_kwargs}
        try:
            return self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **context
            )
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise UserError(f"{self.origin}: chat template failed to render: {reason}") from None


# ---------------------------------------------------------------------------------------------------------
# The interface


class Tokenizer(abc.ABC):
    """What minimind-jax needs from a tokenizer.

    Attributes: `vocab_size`, `pad_id`, `bos_id`, `eos_id` (0/1/2 for MiniMind vocabularies), `arch`
    ("minimind2"/"minimind3" for a recognised MiniMind vocabulary, else None), `path` (where it was loaded
    from), `files` (every file it was read from, e.g. for cache keys) and `chat_template` (None when the
    tokenizer ships none).
    """

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    arch: str | None
    path: pathlib.Path
    files: tuple[pathlib.Path, ...]
    chat_template: ChatTemplate | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; adds no special tokens, but special-token strings in `text` become their ids."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; ids outside the vocabulary are dropped, as HF tokenizers drops them."""

    def apply_chat_template(
        self, messages: Sequence[dict], *, tools=None, add_generation_prompt: bool = False, **template_kwargs
    ) -> str:
        """The chat rendered to text (transformers' `apply_chat_template(..., tokenize=False)`).

        `template_kwargs` reach the template as variables, e.g. `enable_thinking` or `open_thinking` for v3.
        """
        if self.chat_template is None:
            raise UserError(f"{self.path}: this tokenizer has no chat_template")
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def _special_id(self, token: str, origin: str) -> int:
        ids = self.encode(token)
        if len(ids) != 1:
            raise UserError(f"{origin}: special token {token!r} is not a single token of this vocabulary")
        return ids[0]


def assistant_markers(tokenizer: Tokenizer) -> dict[str, list[int]]:
    """Token ids of the SFT loss-mask markers: `<|im_start|>assistant` (+`\\n`) and `<|im_end|>` (+`\\n`)."""
    return {marker: tokenizer.encode(marker) for marker in ASSISTANT_MARKERS}


# ---------------------------------------------------------------------------------------------------------
# MiniMind tokenizer directories (HF tokenizers)


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as an AddedToken dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None


class HFTokenizer(Tokenizer):
    """A MiniMind tokenizer directory: byte-level BPE from `tokenizer.json`, template from `tokenizer_config.json`."""

    def __init__(self, directory: pathlib.Path):
        self.path = directory
        tokenizer_file = directory / "tokenizer.json"
        config_file = directory / "tokenizer_config.json"
        self.files = (tokenizer_file, config_file)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception for unreadable files.
            raise UserError(f"{tokenizer_file}: not a valid tokenizer.json ({first_line(error)})") from None
        config = _read_json(config_file)
        if not isinstance(config, dict):
            raise UserError(f"{config_file}: expected a JSON object")
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

        # transformers passes the tokenizer's special tokens to the template as variables.
        constants = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if _token_content(config.get(key)):
                constants[key] = _token_content(config[key])
        extra = [_token_content(token) for token in config.get("additional_special_tokens") or []]
        if extra:
            constants["additional_special_tokens"] = extra
        for key, fallback in (("pad_token", 0), ("bos_token", 1), ("eos_token", 2)):
            token = constants.get(key, SPECIAL_TOKENS[fallback])
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise UserError(f"{config_file}: {key} {token!r} is not in {tokenizer_file.name}")
            setattr(self, key.replace("_token", "_id"), token_id)

        source = config.get("chat_template")
        if isinstance(source, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
            source = named.get("default")
        if source is not None and not isinstance(source, str):
            raise UserError(f"{config_file}: chat_template must be a string")
        self.chat_template = ChatTemplate(source, constants, str(config_file)) if source else None
        marker_ids = tuple(self.encode(ASSISTANT_MARKERS[0]))
        self.arch = _ARCH_FINGERPRINTS.get(marker_ids) if self.vocab_size == 6400 else None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------------------------
# SentencePiece

# SentencePiece writes a space as U+2581 and turns every U+2581 back into a space when decoding. A literal
# U+2581 in the text is therefore encoded as its three UTF-8 bytes, which decode to U+2581 itself.
_SPACE_SYMBOL = "\u2581"


def sentencepiece_config_path(model_file) -> pathlib.Path:
    """`{stem}_config.json` beside a SentencePiece model: its chat template, special tokens and provenance."""
    model_file = pathlib.Path(model_file)
    return model_file.with_name(model_file.stem + "_config.json")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose three MiniMind special tokens are user-defined pieces (matched in text).

    The chat template and its variables come from `{stem}_config.json` beside the model, written by
    `train_sentencepiece`; without that file the ChatML template is used with no default system prompt.
    """

    def __init__(self, model_file: pathlib.Path):
        self.path = model_file
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.load(str(model_file))
        except (OSError, RuntimeError) as error:
            raise UserError(f"{model_file}: not a SentencePiece model ({' '.join(str(error).split())})") from None
        self.vocab_size = self._processor.get_piece_size()
        self.arch = None

        sidecar = sentencepiece_config_path(model_file)
        config = _read_json(sidecar) if sidecar.exists() else {}
        self.files = (model_file, sidecar) if sidecar.exists() else (model_file,)
        if not isinstance(config, dict):
            raise UserError(f"{sidecar}: expected a JSON object")
        byte_ids = [self._processor.piece_to_id(f"<0x{byte:02X}>") for byte in _SPACE_SYMBOL.encode()]
        if not all(self._processor.is_byte(i) for i in byte_ids):
            raise UserError(f"{model_file}: SentencePiece model was trained without byte fallback")
        self._space_symbol_ids = byte_ids

        origin = str(sidecar) if sidecar.exists() else str(model_file)
        special = {
            key: config.get(key, SPECIAL_TOKENS[index])
            for index, key in enumerate(("pad_token", "bos_token", "eos_token"))
        }
        self.pad_id, self.bos_id, self.eos_id = (self._special_id(token, origin) for token in special.values())
        self._special_ids = frozenset((self.pad_id, self.bos_id, self.eos_id))

        unk_token = self._processor.id_to_piece(self._processor.unk_id())
        constants = {**special, "unk_token": unk_token}
        if config.get("default_system_prompt"):
            constants["default_system_prompt"] = config["default_system_prompt"]
        source = config.get("chat_template", CHATML_TEMPLATE)
        if not isinstance(source, str):
            raise UserError(f"{origin}: chat_template must be a string")
        self.chat_template = ChatTemplate(source, constants, origin)

    def encode(self, text: str) -> list[int]:
        pieces = text.split(_SPACE_SYMBOL)
        ids = self._processor.encode(pieces[0])
        for piece in pieces[1:]:
            ids += self._space_symbol_ids
            ids += self._processor.encode(piece)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if any(_SPACE_SYMBOL in text for text in texts):
            return [self.encode(text) for text in texts]
        return self._processor.encode(list(texts))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if skip_special_tokens:
            kept = [i for i in kept if i not in self._special_ids]
        return self._processor.decode(kept)


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path) -> Tokenizer:
    """A MiniMind tokenizer directory, a SentencePiece `.model` file, or a directory holding one `.model`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such tokenizer file or directory")
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return HFTokenizer(path)
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0])
        found = ", ".join(model.name for model in models) or "none"
        raise UserError(f"{path}: expected tokenizer.json or exactly one SentencePiece .model (found {found})")
    if path.name == "tokenizer.json":
        return HFTokenizer(path.parent)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise UserError(f"{path}: not a tokenizer (give a directory with tokenizer.json, or a .model file)")


def check_fits(tokenizer: Tokenizer, arch: str, vocab_size: int | None = None) -> None:
    """The tokenizer's ids are the model's: within its vocabulary (when `vocab_size` is given) and not the
    other era's MiniMind tokenizer (the same size, other special-token ids)."""
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise UserError(f"{tokenizer.path}: vocab {tokenizer.vocab_size} exceeds the model's {vocab_size}")
    if tokenizer.arch is not None and tokenizer.arch != arch:
        raise UserError(
            f"{tokenizer.path} is the {tokenizer.arch} tokenizer but the model is {arch}; their token ids differ"
        )


# ---------------------------------------------------------------------------------------------------------
# Training a SentencePiece tokenizer

# SentencePiece drops training sentences longer than its max_sentence_length (in bytes), so texts are cut
# into chunks that always fit (4 bytes per character at most).
_CHUNK_CHARS = 2048
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS


def _record_texts(record) -> list[str] | None:
    """The text of a MiniMind pretrain (`text`) or SFT (`conversations` or `messages`) record; None when it is
    neither."""
    from minimind_jax.data.records import conversations_key  # data imports this module

    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return [record["text"]]
    turns = record.get(conversations_key(record))
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        return None
    texts = []
    for turn in turns:
        texts += [turn[key] for key in ("content", "reasoning_content") if isinstance(turn.get(key), str)]
    return texts


def iter_jsonl_texts(paths: Iterable, skipped: list[str] | None = None) -> Iterator[str]:
    """Texts of the records of MiniMind jsonl files, one string per text or conversation turn.

    Blank lines are ignored. Lines that are not a pretrain or SFT record (malformed ones too, as the data
    pipeline reads them) are skipped, and each one is appended to `skipped` as "file:line: reason".
    """
    from minimind_jax.data.records import BadRecord, decode_line, iter_lines  # data imports this module

    for path in paths:
        for line_number, line in iter_lines(path):
            try:
                texts = _record_texts(decode_line(line))
                reason = "neither a {'text': ...} nor a {'conversations' (or 'messages'): [...]} record"
            except BadRecord as error:
                texts, reason = None, error.reason
            if texts is None:
                if skipped is not None:
                    skipped.append(f"{path}:{line_number}: {reason}")
                continue
            yield from texts


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    # Texts are not split at newlines: inside a sentence "\n" is an ordinary character that BPE can learn.
    for text in texts:
        for start in range(0, len(text), _CHUNK_CHARS):
            yield text[start : start + _CHUNK_CHARS]


def train_sentencepiece(
    input_jsonl_paths: Sequence,
    model_prefix,
    vocab_size: int = 6400,
    *,
    character_coverage: float = 0.9995,
    default_system_prompt: str | None = None,
    max_sentences: int = 2_000_000,
) -> pathlib.Path:
    """Train a byte-fallback BPE SentencePiece tokenizer on MiniMind jsonl files; returns `{prefix}.model`.

    Ids 0/1/2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (user-defined pieces, so they are matched
    inside text) and id 3 is `<unk>`. Text is kept exactly (no normalisation, spaces preserved), so decoding
    gives back the input. Training reads the files in order and uses at most `max_sentences` texts (a warning
    says when that cut the data); it is deterministic. The vocabulary may come out smaller than `vocab_size`
    on a small corpus. Writes `{prefix}.model` (the same bytes for the same input) and `{prefix}_config.json`
    (ChatML template, special tokens, `default_system_prompt` and what the model was trained on).
    """
    paths = [pathlib.Path(p) for p in input_jsonl_paths]
    if not paths:
        raise UserError("train_sentencepiece: no input files given")
    prefix = pathlib.Path(model_prefix)
    skipped: list[str] = []
    sentences = []
    for sentence in _training_sentences(iter_jsonl_texts(paths, skipped)):
        if len(sentences) == max_sentences:
            logger.warning("tokenizer training uses the first %d texts of the input only", max_sentences)
            break
        sentences.append(sentence)
    for line in skipped[:5]:
        logger.warning("skipped %s", line)
    if len(skipped) > 5:
        logger.warning("skipped %d more bad lines", len(skipped) - 5)
    if not any(sentence.strip() for sentence in sentences):
        raise UserError(f"{paths[0]}: no text found in the input files")

    model_bytes = io.BytesIO()  # written here rather than by model_prefix, which would store the path in it
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_bytes,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # small corpora give a smaller vocabulary instead of an error
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            user_defined_symbols=list(SPECIAL_TOKENS),
            unk_id=len(SPECIAL_TOKENS),
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise UserError(f"SentencePiece training on {paths[0]} failed: {' '.join(str(error).split())}") from None

    config = {
        "chat_template": CHATML_TEMPLATE,
        "pad_token": SPECIAL_TOKENS[0],
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[2],
        "default_system_prompt": default_system_prompt,
        "trained_on": {
            "files": [str(p) for p in paths],
            "sentences": len(sentences),
            "skipped_lines": len(skipped),
            "requested_vocab_size": vocab_size,
        },
    }
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model_file = prefix.with_name(prefix.name + ".model")
    model_file.write_bytes(model_bytes.getvalue())
    sentencepiece_config_path(model_file).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return model_file
