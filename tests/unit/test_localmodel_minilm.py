"""The numpy MiniLM against sentence-transformers' embeddings (tests/data/minilm_reference.json)."""

from __future__ import annotations

import numpy as np

from batchd.localmodel.minilm import MAX_TOKENS, cosine
from tests.unit.localmodel_support import minilm, reference

REF = reference("minilm_reference.json")


def test_token_ids_match_sentence_transformers() -> None:
    assert minilm().tokenize(REF["sentences"]) == REF["token_ids"]


def test_embeddings_match_sentence_transformers() -> None:
    model = minilm()
    vectors = model.embed(model.tokenize(REF["sentences"]))
    assert vectors.shape == (len(REF["sentences"]), 384)
    for ours, theirs in zip(vectors, REF["embeddings"], strict=True):
        assert cosine(ours, theirs) > 0.9999
    np.testing.assert_allclose(vectors, REF["embeddings"], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_batch_equals_one_at_a_time() -> None:
    model = minilm()
    ids = model.tokenize(REF["sentences"])
    batched = model.embed(ids)
    for row, one in zip(batched, ids, strict=True):
        np.testing.assert_allclose(row, model.embed([one])[0], atol=1e-5)


def test_long_inputs_are_truncated_like_sentence_transformers() -> None:
    model = minilm()
    (ids,) = model.tokenize(["word " * 1000])
    assert len(ids) == MAX_TOKENS
    assert model.wrap_ids(list(range(1000, 1300)))[-1] == model.sep_id
