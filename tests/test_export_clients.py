"""llmc's compressed-tensors exports (save_vllm / save_sgl) loaded by transformers as its users load them,
`AutoModelForCausalLM.from_pretrained(folder)` with no options, in the transformers and compressed-tensors
installed here: the loaded model must compute the fake-quant model's logits. GPTQ and AutoAWQ exports need
GPTQModel, which lives in a venv of its own: test_export_clients_gptqmodel.py."""
import math

import pytest
import torch

from llmc.export import compressed
from llmc.quant.fake_linear import quant_linears
from test_export_packed import CT_CASES, W, layers, quantized, read
from tiny import make_tokenizer

IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("case", list(CT_CASES))
def test_transformers_loads_compressed_tensors(tmp_path, case):
    wargs, aargs, _ = CT_CASES[case]
    model = quantized(wargs, aargs)
    compressed.save(model, make_tokenizer(), tmp_path / "ct")
    loaded = load(tmp_path / "ct")
    with torch.no_grad():
        expected, got = model(IDS).logits, loaded(IDS).logits
    # float32 throughout: the checkpoint dequantizes to the fake-quant weights bit for bit, so only the
    # summation order of the two forwards differs
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    if aargs is not None:  # the activation quantizers came along: without them the logits move
        with torch.no_grad():
            for _, q in quant_linears(model):
                q.act_quant = None
            assert not torch.allclose(model(IDS).logits, got, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_transformers_loads_asymmetric_packed_with_biases(tmp_path, family):
    model = quantized(W(4, False), family=family)
    compressed.save(model, make_tokenizer(), tmp_path / "ct")
    with torch.no_grad():
        got, expected = load(tmp_path / "ct")(IDS).logits, model(IDS).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("case", list(CT_CASES))
def test_zero_points_in_vllm_layout_and_the_dense_load_flag(tmp_path, case):
    """Asymmetric pack-quantized zero points are int32 words packed along the outputs, [ceil(out*b/32),
    groups], the shape vLLM's CompressedTensorsWNA16 allocates (qzeros, packed_dim 0) and compressed-tensors'
    compressor writes; those checkpoints, and only those, ask transformers for its dequantizing load."""
    wargs, aargs, fmt = CT_CASES[case]
    model = quantized(wargs, aargs)
    compressed.save(model, make_tokenizer(), tmp_path / "ct")
    tensors, config = read(tmp_path / "ct")
    packed_zeros = fmt == "pack-quantized" and not wargs.symmetric
    assert config["quantization_config"].get("dequantize", False) is packed_zeros
    for name, q in layers(model).items():
        zp = tensors.get(f"{name}.weight_zero_point")
        if packed_zeros:
            groups = q.in_features // wargs.group_size if wargs.granularity == "per_group" else 1
            assert zp.dtype == torch.int32 and zp.shape == (math.ceil(q.out_features * wargs.bit / 32), groups)
        elif fmt == "pack-quantized" or wargs.symmetric:
            assert zp is None
