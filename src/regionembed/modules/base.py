"""What the evaluation modules that compare region embedding methods share (a frozen backbone, frozen methods)."""

from __future__ import annotations

import lightning as L
import torch

from ..backbones.base import Backbone
from ..regions import GlobalEmbedding, MaskInversionEmbedding, RegionEmbedder

__all__ = ["RegionMethodsModule"]


class RegionMethodsModule(L.LightningModule):
    """Base of the test-only modules that score several region methods with one evaluator.

    The backbone and every method that owns a model (e.g. an Alpha-CLIP backbone) are frozen and stay in eval mode
    whatever the loop does; methods that are modules are registered so that they follow the module's device.

    Args:
        backbone: the model (frozen here).
        methods: region embedding methods with unique ``name``; default: global and MaskInversion.
    """

    def __init__(self, backbone: Backbone, methods: list[RegionEmbedder] | None = None) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.methods = list(methods) if methods else [GlobalEmbedding(), MaskInversionEmbedding()]
        self.method_models = torch.nn.ModuleList(
            [m.requires_grad_(False).eval() for m in self.methods if isinstance(m, torch.nn.Module)]
        )
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        if any("." in n for n in names):  # they key torch ModuleDicts of metrics
            raise ValueError(f"method names must not contain '.', got {names}")
        for method in self.methods:  # a MaskInversion setting the model cannot run is found now, not mid-test
            if isinstance(method, MaskInversionEmbedding):
                method.solver.check(self.backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        self.method_models.eval()
        return self

    def configure_optimizers(self):
        return None
