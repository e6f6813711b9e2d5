"""The embedded models, run on the CPU with numpy.

One module per concept::

    packages       where the weights packages live; the install command when they do not
    gguf_loader    GGUF metadata and tensors, dequantized to float32 once at load
    tokenizer      the byte-level BPE tokenizer rebuilt from the GGUF vocabulary and merges
    chat_template  OpenAI messages -> SmolLM2's ChatML prompt
    llama          the Llama transformer (RMSNorm, RoPE, GQA, SwiGLU) over a batched KV cache
    sampling       greedy, temperature / top-p with a seed
    requests       OpenAI request bodies -> validated generation / embedding requests
    worker         the dedicated model thread: lazy load, job queue, close
    scheduler      continuous batching of generations on that thread, prefix cache
    minilm         the MiniLM (BERT) sentence embedder and its batching thread

Nothing here is built at import time: :class:`batchd.backends.local.LocalBackend` owns the
models and loads them on its first request.
"""
