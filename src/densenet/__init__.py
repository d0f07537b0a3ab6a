"""DenseNet (Huang et al., CVPR 2017): every variant of the paper, in PyTorch."""

from densenet.deploy.explain import Explanation, explain
from densenet.deploy.export import ExportError, export_model
from densenet.deploy.optimize import optimize_for_inference
from densenet.deploy.quantize import quantize_int8
from densenet.errors import ConfigError, DenseNetError, WeightsError
from densenet.models.densenet import DenseNet, DenseNetConfig
from densenet.models.features import FeatureExtractor, FeatureInfo
from densenet.models.presets import PRESETS, ModelSpec, Preprocessing
from densenet.weights.io import Checkpoint, read_checkpoint, save_weights
from densenet.weights.pretrained import PUBLISHED, PublishedWeights
from densenet.weights.registry import (
    LoadedModel,
    create_model,
    get_spec,
    list_models,
    load_for_inference,
    load_model,
)

__all__ = [
    "PRESETS",
    "PUBLISHED",
    "Checkpoint",
    "ConfigError",
    "DenseNet",
    "DenseNetConfig",
    "DenseNetError",
    "Explanation",
    "ExportError",
    "FeatureExtractor",
    "FeatureInfo",
    "LoadedModel",
    "ModelSpec",
    "Preprocessing",
    "PublishedWeights",
    "WeightsError",
    "create_model",
    "explain",
    "export_model",
    "get_spec",
    "list_models",
    "load_for_inference",
    "load_model",
    "optimize_for_inference",
    "quantize_int8",
    "read_checkpoint",
    "save_weights",
]
__version__ = "0.1.0"
