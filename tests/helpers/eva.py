"""Tiny EVA01-like open_clip towers with values: timm ``eva_giant_patch14_224`` (EVA01-g-14's tower) at 32 px.

open_clip's EVA01 configs have a timm ``Eva`` tower of pre-norm ``EvaBlock`` s (GELU ``Mlp``, ``EvaAttention`` with
q/v biases, no rotary embeddings). The tiny copies keep that architecture, with or without EVA's layer scale
(``gamma_1``/``gamma_2``, ``init_values``), and are registered for the test that builds them only.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
from timm.models import eva, register_model

_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


@register_model
def re_test_eva01(pretrained: bool = False, **kwargs):
    """``eva_giant_patch14_224`` (EVA01-g-14's tower) at 32 px, patch 8, width 48, depth 2."""
    return eva.eva_giant_patch14_224(pretrained=False, **{**_TINY, **kwargs})


@register_model
def re_test_eva01_ls(pretrained: bool = False, **kwargs):
    """:func:`re_test_eva01` with EVA's layer scale (``gamma_1``, ``gamma_2``)."""
    return eva.eva_giant_patch14_224(pretrained=False, **{**_TINY, "init_values": 0.5, **kwargs})


def tiny_eva01(layer_scale: bool = False, seed: int = 0):
    """A tiny EVA01-like open_clip CLIP as an ``OpenCLIPTimmBackbone``, frozen, with real random weights.

    timm initialises the q/v biases to zero, the norms to the identity and the layer scales to one constant; they
    are drawn at random here so that every term of the block's tail (and ``V``'s bias) is exercised.
    """
    from open_clip.factory import _MODEL_CONFIGS

    from regionembed.backbones import OpenCLIPBackbone

    cfg = dict(open_clip.get_model_config("re-tiny-eva02"))  # the tiny text tower and embedding size
    timm_name = "re_test_eva01_ls" if layer_scale else "re_test_eva01"
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "timm_model_name": timm_name}
    name = f"re-test-eva01{'-ls' if layer_scale else ''}"
    with pytest.MonkeyPatch.context() as mp:  # the config is read while building only
        mp.setitem(_MODEL_CONFIGS, name, cfg)
        torch.manual_seed(seed)
        backbone = OpenCLIPBackbone(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in backbone.blocks:
            for p in (blk.attn.q_bias, blk.attn.v_bias, blk.norm1.bias, blk.norm2.bias):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            for p in (blk.norm1.weight, blk.norm2.weight):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            for p in (blk.gamma_1, blk.gamma_2):
                if p is not None:
                    p.copy_(0.2 + 1.3 * torch.rand(p.shape, generator=g))
    return backbone.requires_grad_(False)
