"""The ISANet model zoo: MMSegmentation's 16 published variants by name, and `Segmenter` for photos."""
from .factory import create_model
from .metadata import ModelMeta, project_version
from .model import ISANet
from .registry import VariantConfig, get_config, list_models
from .segmenter import Segmenter

__version__ = project_version()
__all__ = ["ISANet", "ModelMeta", "Segmenter", "VariantConfig", "create_model", "get_config", "list_models"]
