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
    logits = get_module(model, adapter.lm_head)(hidden)
    assert (logits - reference.logits).abs().max().item() < 1e-5

    algo = Recording()
    quantize_blocks(model, adapter, algo, [ids[:2], ids[2:]], set(), ctx, quant_out=False)
    # hidden_states[i + 1] is block i's output (the last one after the final norm for most families)
    for i, out in enumerate(algo.targets[:-1]):
        assert (out - reference.hidden_states[i + 1]).abs().max().item() < 1e-5
    with torch.no_grad():
        assert (model(ids).logits - reference.logits).abs().max().item() == 0  # the no-op changed nothing


class TrackingContext(RunContext):
    """Counts blocks moved to the compute device; a block's forward asserts it is the only one there."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = set(map(id, blocks))
        self.resident = set()
        self.max_resident = 0

    def onload(self, module):
        if id(module) in self.blocks:
            self.resident.add(id(module))
            self.max_resident = max(self.max_resident, len(self.resident))
        return module

    def offload(self, module, changed=False):
        self.resident.discard(id(module))
        return module


def test_only_one_block_is_on_the_device_at_a_time():
    model, adapter, ids = _setup("llama")
    blocks = list(adapter.block_list())
    ctx = TrackingContext(blocks)
    forwards = []

    def check(module, args):
        assert ctx.resident == {id(module)}, "a block ran without being the one block on the device"
        forwards.append(module)

    handles = [b.register_forward_pre_hook(check) for b in blocks]
    quantize_blocks(model, adapter, Recording(), [ids], set(), ctx, quant_out=True)
    forward_per_block(model, adapter, [ids], ctx)
    for h in handles:
        h.remove()
    assert ctx.max_resident == 1 and ctx.resident == set()
    assert len(forwards) == 3 * len(blocks)  # targets + next inputs per block, then the eval pass


def test_captured_kwargs_drop_the_cache():
    from llmc.engine.capture import capture_block_inputs

    model, adapter, ids = _setup("llama")
    inputs = capture_block_inputs(model, adapter, [ids], RunContext())
    kwargs = inputs.kwargs[0][0]
    assert "past_key_values" not in kwargs and "use_cache" not in kwargs
    assert "position_embeddings" in kwargs  # transformers 5 passes rotary embeddings to every block
