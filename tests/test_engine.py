import pytest
import torch

from llmc.algorithms.base import Algorithm, Options
from llmc.engine.context import RunContext
from llmc.engine.pipeline import forward_per_block, quantize_blocks
from llmc.models.adapter import adapter_class, get_module
from tiny import FAMILIES, make_model


class Recording(Algorithm):
    """Changes nothing; records each block's float outputs as the engine hands them over."""

    name = "recording"
    needs_targets = True

    def __init__(self):
        super().__init__(None, None, Options())
        self.targets = []

    def apply(self, job, targets):
        self.targets.append(torch.cat(targets))
        return {}


def _setup(family):
    model = make_model(family)
    adapter = adapter_class(model.config.model_type, None)(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    return model, adapter, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_pass_reproduces_the_model(family):
    model, adapter, ids = _setup(family)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
    ctx = RunContext()
    hidden = torch.cat(forward_per_block(model, adapter, [ids[:2], ids[2:]], ctx))
    logits = adapter.logits(hidden)  # lm_head and any final soft-capping (Gemma 2)
    assert (logits - reference.logits).abs().max().item() < 1e-5

    algo = Recording()
    quantize_blocks(model, adapter, algo, [ids[:2], ids[2:]], set(), ctx, quant_out=False)
    # hidden_states[i + 1] is block i's output (the last one after the final norm for most families)
    for i, out in enumerate(algo.targets[:-1]):
        assert (out - reference.hidden_states[i + 1]).abs().max().item() < 1e-5
    with torch.no_grad():
        assert (model(ids).logits - reference.logits).abs().max().item() == 0  # the no-op changed nothing


def _tensors(module):
    return list(module.named_parameters()) + list(module.named_buffers())


class MetaOffload(RunContext):
    """The real RunContext with offload_device 'meta': its real offload moves a module's tensors to the meta
    device, where they hold no values and cannot take part in a forward, so which blocks are on the compute
    device is observable from their tensors' devices. The values are kept aside here and put back before
    the real onload (which cannot copy values out of meta)."""

    def __init__(self):
        super().__init__(offload_device=torch.device("meta"))
        self.kept = {}

    def offload(self, module, changed=False):
        if not any(t.is_meta for _, t in _tensors(module)):
            self.kept[id(module)] = {n: t.detach().clone() for n, t in _tensors(module)}
        return super().offload(module, changed)

    def onload(self, module):
        kept = self.kept.pop(id(module), None)
        if kept is not None and any(t.is_meta for _, t in _tensors(module)):
            module.to_empty(device=torch.device("cpu"))
            with torch.no_grad():
                for n, t in _tensors(module):
                    t.copy_(kept[n])
        return super().onload(module)


def _on_device(module) -> bool:
    return all(not t.is_meta for _, t in _tensors(module))


def test_only_one_block_is_on_the_device_at_a_time():
    """Blocks start offloaded (as a model loaded on CPU for a GPU run); at every block forward of the
    quantization pass and the blockwise evaluation, that block and no other is on the compute device."""
    model, adapter, ids = _setup("llama")
    with torch.no_grad():
        reference = model(ids).logits
    ctx = MetaOffload()
    blocks = adapter.block_list()
    for i in range(len(blocks)):
        blocks[i] = ctx.offload(blocks[i])
    forwards = []

    def check(module, args):
        where = [_on_device(b) for b in adapter.block_list()]
        assert where == [b is module for b in adapter.block_list()], f"blocks on the device: {where}"
        forwards.append(where.index(True))

    handles = [b.register_forward_pre_hook(check) for b in blocks]
    quantize_blocks(model, adapter, Recording(), [ids], set(), ctx, quant_out=True)
    assert not any(_on_device(b) for b in adapter.block_list())  # every block offloaded after its turn
    quantized, forwards[:] = list(forwards), []
    hidden = torch.cat(forward_per_block(model, adapter, [ids], ctx))
    for h in handles:
        h.remove()
    # each block's forwards (targets, next inputs, any checks) in block order, then one eval pass
    assert quantized == sorted(quantized) and set(quantized) == {0, 1, 2} and forwards == [0, 1, 2]
    for module in list(adapter.block_list()) + [get_module(model, n) for n in adapter.present(adapter.final)]:
        ctx.onload(module)
    with torch.no_grad():  # the values travelled intact
        assert (get_module(model, adapter.lm_head)(hidden) - reference).abs().max().item() < 1e-5


def test_captured_kwargs_drop_the_cache():
    from llmc.engine.capture import capture_block_inputs

    model, adapter, ids = _setup("llama")
    inputs = capture_block_inputs(model, adapter, [ids], RunContext())
    kwargs = inputs.kwargs[0][0]
    assert "past_key_values" not in kwargs and "use_cache" not in kwargs
    assert "position_embeddings" in kwargs  # transformers 5 passes rotary embeddings to every block
