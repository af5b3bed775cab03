"""The ISANet model zoo: MMSegmentation's 16 published variants by name."""
from .factory import create_model
from .model import ISANet
from .registry import VariantConfig, get_config, list_models

__all__ = ["ISANet", "VariantConfig", "create_model", "get_config", "list_models"]
