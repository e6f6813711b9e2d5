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

    def token_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings in it become their single ids."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens left out."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))
