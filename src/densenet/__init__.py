"""DenseNet (Huang et al., CVPR 2017): every variant of the paper, in PyTorch."""

from densenet.errors import ConfigError, DenseNetError, WeightsError
from densenet.export import ExportError, export_model
from densenet.features import FeatureExtractor, FeatureInfo
from densenet.inference import optimize_for_inference
from densenet.model import DenseNet, DenseNetConfig
from densenet.presets import PRESETS, ModelSpec, Preprocessing
from densenet.pretrained import PUBLISHED, PublishedWeights
from densenet.quantize import quantize_int8
from densenet.registry import create_model, get_spec, list_models, load_model
from densenet.weights import Checkpoint, read_checkpoint, save_weights

__all__ = [
    "PRESETS",
    "PUBLISHED",
    "Checkpoint",
    "ConfigError",
    "DenseNet",
    "DenseNetConfig",
    "DenseNetError",
    "ExportError",
    "FeatureExtractor",
    "FeatureInfo",
    "ModelSpec",
    "Preprocessing",
    "PublishedWeights",
    "WeightsError",
    "create_model",
    "export_model",
    "get_spec",
    "list_models",
    "load_model",
    "optimize_for_inference",
    "quantize_int8",
    "read_checkpoint",
    "save_weights",
]
__version__ = "0.1.0"
