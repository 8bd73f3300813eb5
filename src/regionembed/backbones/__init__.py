"""Backbone adapters (open_clip, timm, Hugging Face transformers), the attention recorder and tiny model configs."""

from .attention import AttentionRecord, AttentionRecorder, MHAPoolRecorder, UnsupportedModelError
from .base import Backbone, BlockParts, PreprocessSpec
from .hf import HFBackbone
from .open_clip import TINY_MODELS, OpenCLIPBackbone
from .resnet import OpenCLIPResNetBackbone
from .timm import TimmBackbone
from .weights import PretrainedWeightsUnavailable

__all__ = [
    "TINY_MODELS",
    "AttentionRecord",
    "AttentionRecorder",
    "Backbone",
    "BlockParts",
    "HFBackbone",
    "MHAPoolRecorder",
    "OpenCLIPBackbone",
    "OpenCLIPResNetBackbone",
    "PreprocessSpec",
    "PretrainedWeightsUnavailable",
    "TimmBackbone",
    "UnsupportedModelError",
]
