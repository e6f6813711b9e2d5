"""SmolLM2's tokenizer, rebuilt from the GGUF metadata with the ``tokenizers`` library.

The GGUF says ``tokenizer.ggml.model = gpt2`` (byte-level BPE) and ``pre = smollm``: the
StarCoder-style pre-tokenizer that SmolLM2's ``tokenizer.json`` declares, i.e. every digit on
its own, then GPT-2's byte-level split, no prefix space. Tokens of type 3 (control) are
special tokens: ``<|im_start|>`` and ``<|im_end|>`` in a prompt are single ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

_CONTROL = 3


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


class BpeTokenizer:
    """Encode text to ids and decode ids to text, special tokens included."""

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {model!r} is not byte-level BPE (gpt2)")
        tokens: Sequence[str] = metadata["tokenizer.ggml.tokens"]
        types: Sequence[int] = metadata["tokenizer.ggml.token_type"]
        merges_raw: Sequence[str] = metadata["tokenizer.ggml.merges"]
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)  # type: ignore[arg-type]
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        special = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self._tok = tok
        self.vocab_size = len(tokens)
        self.special_ids = frozenset(vocab[t] for t in special)
        self.eos_id = int(metadata.get("tokenizer.ggml.eos_token_id", 0))
        self.bos_id = int(metadata.get("tokenizer.ggml.bos_token_id", 0))
        self._ids = vocab
        self._tokens = tokens
        self._byte_of_char: dict[str, int] | None = None

    def token_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings in it become their single ids."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character)."""
        text = self._tokens[token]
        if token in self.special_ids:
            return text.encode("utf-8")
        if self._byte_of_char is None:
            self._byte_of_char = _byte_of_char()
        table = self._byte_of_char
        return bytes(table[c] for c in text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens left out."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))
