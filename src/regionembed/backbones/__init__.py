"""Backbone adapters (open_clip incl. its timm towers, timm, Hugging Face transformers), the capability classes, the
attention recorder and tiny model configs."""

from .attention import AttentionRecord, AttentionRecorder, MHAPoolRecorder, UnsupportedModelError
from .base import (
    AttentionPoolHead,
    Backbone,
    BlockParts,
    FeatureMapBackbone,
    PreprocessSpec,
    TokenGridBackbone,
    require,
    uses_attention_pool,
)
from .hf import HFBackbone
from .open_clip import TINY_MODELS, OpenCLIPAttentionPoolBackbone, OpenCLIPBackbone, OpenCLIPViTBackbone
from .open_clip_timm import OpenCLIPTimmBackbone
from .resnet import OpenCLIPResNetBackbone
from .timm import TimmBackbone
from .weights import PretrainedWeightsUnavailable

__all__ = [
    "TINY_MODELS",
    "AttentionPoolHead",
    "AttentionRecord",
    "AttentionRecorder",
    "Backbone",
    "BlockParts",
    "FeatureMapBackbone",
    "HFBackbone",
    "MHAPoolRecorder",
    "OpenCLIPAttentionPoolBackbone",
    "OpenCLIPBackbone",
    "OpenCLIPResNetBackbone",
    "OpenCLIPTimmBackbone",
    "OpenCLIPViTBackbone",
    "PreprocessSpec",
    "PretrainedWeightsUnavailable",
    "TimmBackbone",
    "TokenGridBackbone",
    "UnsupportedModelError",
    "require",
    "uses_attention_pool",
]
