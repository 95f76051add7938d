"""Tiny random-weight models and an in-process tokenizer: no download, seconds to build."""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 384

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point weights to a small grid of integers.",
    "A decoder block holds attention and a feed forward network.",
    "Perplexity is the exponential of the mean negative log likelihood.",
    "Calibration text flows through the model one block at a time.",
    "Robert Boulter is an English film, television and theatre actor.",
] * 20


@functools.lru_cache(maxsize=1)
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=64, enable_bias=True)
    if family == "qwen3":
        return Qwen3Config(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common)
    if family == "gemma2":  # windows shorter than the test sequences, so sliding layers differ from full ones
        return Gemma2Config(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            pad_token_id=1, **common)
    if family == "gemma3_text":
        return Gemma3TextConfig(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                final_logit_softcapping=None, pad_token_id=1, **common)
    if family == "phi3":
        return Phi3Config(num_key_value_heads=2, pad_token_id=1, bos_token_id=0, eos_token_id=0, **common)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "opt", "qwen3", "gemma2", "gemma3_text", "phi3"]


def make_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Random init gives near-zero std; widen it so quantization error is visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_model(tmp_path, family: str = "llama", seed: int = 0) -> str:
    """Save a tiny model and the tokenizer as an HF folder; returns its path."""
    path = tmp_path / f"tiny-{family}"
    make_model(family, seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)
