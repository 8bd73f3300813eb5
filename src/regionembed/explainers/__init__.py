"""Explainers: ``(backbone, image [B, 3, H, W], targets [B, D]) -> maps [B, H, W]``."""

from .base import Explainer, min_max, relevance_to_map
from .grad_attention import GradAttention, grad_attention_maps
from .gradcam import GradCAM
from .legrad import LeGrad
from .rollout import AttentionRollout
from .score_cam import ScoreCAM, VLScore, VLScoreAuthors, prompt_targets

__all__ = [
    "AttentionRollout",
    "Explainer",
    "GradAttention",
    "GradCAM",
    "LeGrad",
    "MaskInversionMaps",
    "ScoreCAM",
    "VLScore",
    "VLScoreAuthors",
    "grad_attention_maps",
    "min_max",
    "prompt_targets",
    "relevance_to_map",
]


def __getattr__(name: str):
    # MaskInversionMaps needs the solver, and the solver needs the explainers: importing it here, on first use,
    # keeps `import regionembed.inversion` free of a cycle
    if name == "MaskInversionMaps":
        from .mask_inversion import MaskInversionMaps

        return MaskInversionMaps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
