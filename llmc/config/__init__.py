from llmc.config.loader import load_config, load_raw, validate
from llmc.config.schema import Config

__all__ = ["Config", "load_config", "load_raw", "validate"]
