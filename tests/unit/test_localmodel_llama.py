"""The numpy Llama against transformers' forward pass of the same GGUF
(tests/data/smollm2_reference.json), and batched steps against single ones."""

from __future__ import annotations

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from batchd.localmodel.gguf_loader import dequantize_q4_1, dequantize_q8_0
from batchd.localmodel.llama import KVCache, SeqChunk
from batchd.localmodel.packages import SMOLLM2
from tests.unit.localmodel_support import reference, smollm2, weights_dir

REF = reference("smollm2_reference.json")


def test_dequantization_matches_gguf_reference() -> None:
    reader = GGUFReader(str(weights_dir(SMOLLM2) / SMOLLM2.files[0]))
    tensors = {t.name: t for t in reader.tensors}
    for name, ours in (("blk.0.attn_q.weight", dequantize_q4_1), ("token_embd.weight", None)):
        t = tensors[name]
        raw = t.data[:64]  # the first 64 rows
        fn = ours or dequantize_q8_0
        ref = dequantize(raw, t.tensor_type)
        np.testing.assert_array_equal(fn(raw, 64, int(t.shape[0])), ref)


def test_one_forward_step_matches_transformers() -> None:
    llm = smollm2()
    cache = KVCache(llm.model.cfg, slots=2, max_positions=256)
    ids = REF["chat_ids"]
    logits = llm.model.forward(cache, [SeqChunk(0, ids, 0)])[0]
    top = np.argsort(-logits)[:5]
    assert top.tolist() == REF["last_top5_ids"]
    np.testing.assert_allclose(logits[top], REF["last_top5_logits"], atol=2e-3)
    np.testing.assert_allclose(logits[:16], REF["last_logits_first16"], atol=2e-3)
    first = llm.model.forward(cache, [SeqChunk(1, ids[:1], 0)])[0]
    np.testing.assert_allclose(first[:8], REF["pos0_logits_first8"], atol=2e-3)


def test_greedy_decoding_matches_transformers_generate() -> None:
    llm = smollm2()
    cache = KVCache(llm.model.cfg, slots=1, max_positions=256)
    ids = REF["chat_ids"]
    out: list[int] = []
    chunk = SeqChunk(0, ids, 0)
    for _ in range(len(REF["greedy_ids"])):
        token = int(np.argmax(llm.model.forward(cache, [chunk])[0]))
        out.append(token)
        chunk = SeqChunk(0, [token], chunk.start + len(chunk.tokens))
    assert out == REF["greedy_ids"]
    assert llm.tokenizer.decode(out) == "The capital of France is Paris."


def test_a_mixed_batch_step_equals_separate_steps() -> None:
    """Prefill of one sequence and decode of others in one step (continuous batching) give
    the logits each would get alone; slots need not be consecutive."""
    llm = smollm2()
    model = llm.model
    prompts = [llm.tokenizer.encode(t) for t in ("The sky is", "One two three four", "Hello there")]
    alone = KVCache(model.cfg, slots=1, max_positions=64)
    expected = []
    for p in prompts:
        alone.reset()
        model.forward(alone, [SeqChunk(0, p[:-1], 0)])
        expected.append(model.forward(alone, [SeqChunk(0, p[-1:], len(p) - 1)])[0])
    batch = KVCache(model.cfg, slots=5, max_positions=64)
    model.forward(batch, [SeqChunk(4, prompts[0][:-1], 0), SeqChunk(1, prompts[1][:-1], 0)])
    step = model.forward(
        batch,
        [
            SeqChunk(4, prompts[0][-1:], len(prompts[0]) - 1),
            SeqChunk(2, prompts[2], 0),
            SeqChunk(1, prompts[1][-1:], len(prompts[1]) - 1),
        ],
    )
    for got, want in zip(step, [expected[0], expected[2], expected[1]], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-3)
