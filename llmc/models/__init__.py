from llmc.models.adapter import Adapter, Subset, adapter_class, get_module, set_module
from llmc.models.load import load_hf_config, load_model, meta_model, pick_device, resolve_source

__all__ = ["Adapter", "Subset", "adapter_class", "get_module", "set_module", "load_hf_config", "load_model",
           "meta_model", "pick_device", "resolve_source"]
