"""Backbone adapters (open_clip incl. timm towers, timm), the attention recorder and tiny model configs."""

from .attention import AttentionRecord, AttentionRecorder, UnsupportedModelError
from .base import Backbone, BlockParts, PreprocessSpec
from .open_clip import TINY_MODELS, OpenCLIPBackbone
from .open_clip_timm import OpenCLIPTimmBackbone
from .resnet import OpenCLIPResNetBackbone
from .timm import TimmBackbone
from .weights import PretrainedWeightsUnavailable

__all__ = [
    "TINY_MODELS",
    "AttentionRecord",
    "AttentionRecorder",
    "Backbone",
    "BlockParts",
    "OpenCLIPBackbone",
    "OpenCLIPResNetBackbone",
    "OpenCLIPTimmBackbone",
    "PreprocessSpec",
    "PretrainedWeightsUnavailable",
    "TimmBackbone",
    "UnsupportedModelError",
]
