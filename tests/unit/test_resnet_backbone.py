"""The open_clip ModifiedResNet adapter: equal to open_clip at the native size, any size, the alpha hook, errors."""

import copy
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from regionembed.backbones import (
    FeatureMapBackbone,
    OpenCLIPBackbone,
    OpenCLIPResNetBackbone,
    OpenCLIPViTBackbone,
    PretrainedWeightsUnavailable,
    TokenGridBackbone,
    UnsupportedModelError,
)
from regionembed.explainers import LeGrad


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return OpenCLIPResNetBackbone("re-tiny-rn").requires_grad_(False)


def _randomize_batchnorm(backbone):
    """Random BN statistics/affines so that a wrong stem or a skipped BN would show (open_clip inits them trivially)."""
    g = torch.Generator().manual_seed(5)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return backbone


def test_encode_image_matches_open_clip_at_native_size(rn):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rn.encode_image(x), rn.model.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(rn.encode_image(x, normalize=True), rn.model.encode_image(x, normalize=True))
        feats = rn.feature_maps(x)
    assert feats.shape == (3, rn.feature_dim, 2, 2) == (3, 512, 2, 2)
    assert rn.patch_size == 32 and rn.grid_size(64) == (2, 2) and rn.embed_dim == 32


def test_stem_and_stages_match_open_clip_intermediates():
    bb = _randomize_batchnorm(OpenCLIPResNetBackbone("re-tiny-rn")).requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = bb.model.visual.forward_intermediates(x, indices=[0, 1, 2, 3, 4], intermediates_only=True)
        ref = ref["image_intermediates"]
        torch.testing.assert_close(bb.stem(x), ref[0], rtol=0, atol=0)
        for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            torch.testing.assert_close(bb.feature_maps(x, name), ref[i + 1], rtol=0, atol=0)
            torch.testing.assert_close(bb.feature_maps(x, i), ref[i + 1], rtol=0, atol=0)
        torch.testing.assert_close(bb.pool_features(ref[3], "layer3"), bb.model.encode_image(x))


def test_other_sizes_resample_the_attention_pool_without_mutating_parameters(rn):
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = rn.encode_image(x)
        pos = rn.attnpool_positional_embedding((3, 4))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    assert pos.shape == (1 + 12, rn.feature_dim)
    assert rn.attnpool_positional_embedding((2, 2)) is rn.model.visual.attnpool.positional_embedding
    for k, v in rn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    big = OpenCLIPResNetBackbone("re-tiny-rn", image_size=128)
    assert big.preprocess.size == 128


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_explicit_attention_pool_equals_open_clip(rn, size):
    feats = rn.feature_maps(torch.randn(2, 3, *size))
    with torch.no_grad():
        torch.testing.assert_close(
            rn.pool_features(feats, explicit_attention=True), rn.pool_features(feats), rtol=1e-5, atol=1e-6
        )


def test_alpha_hook():
    torch.manual_seed(1)
    bb = _randomize_batchnorm(OpenCLIPResNetBackbone("re-tiny-rn")).requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    alpha = torch.randn(2, 1, 64, 64)
    with pytest.raises(ValueError, match="no alpha channel"):
        bb.encode_image(x, alpha=alpha)
    with torch.no_grad():
        plain = bb.encode_image(x)
        conv1 = bb.rgb_stem_conv
        bb.alpha_embed = nn.Conv2d(1, conv1.out_channels, 3, stride=2, padding=1, bias=False)
        nn.init.zeros_(bb.alpha_embed.weight)
        torch.testing.assert_close(bb.encode_image(x, alpha=alpha), plain, rtol=0, atol=0)
        torch.testing.assert_close(bb.encode_image(x, alpha=None), plain, rtol=0, atol=0)
        # the hook is live: a non-zero alpha conv changes the embedding (added before bn1, so every stage sees it)
        nn.init.normal_(bb.alpha_embed.weight)
        assert not torch.allclose(bb.encode_image(x, alpha=alpha), plain)
        assert not torch.allclose(bb.feature_maps(x, "layer1", alpha=alpha), bb.feature_maps(x, "layer1"))
    with pytest.raises(ValueError, match="alpha"):
        bb.encode_image(x, alpha=torch.randn(2, 1, 32, 32))


def test_alpha_channel_argument():
    bb = OpenCLIPResNetBackbone("re-tiny-rn", alpha_channel=True)
    assert bb.alpha_embed is not None
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(x, alpha=torch.rand(1, 1, 64, 64)), bb.encode_image(x))


def test_text_tower(rn):
    tokens = rn.tokenize(["a red circle", "a blue square"])
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        emb = rn.encode_text(tokens, normalize=True)
        torch.testing.assert_close(emb, rn.model.encode_text(tokens, normalize=True))
    assert emb.shape == (2, 32)
    assert rn.tokenize("one").shape == (1, 16)
    assert rn.logit_scale is rn.model.logit_scale


def test_resnet_has_the_feature_map_capability_only(rn):
    x = torch.randn(1, 3, 64, 64)
    assert isinstance(rn, FeatureMapBackbone) and not isinstance(rn, TokenGridBackbone)
    for name in ("blocks", "embed_tokens", "pool_tokens", "legrad_head", "block_parts", "forward_blocks"):
        assert not hasattr(rn, name), name
    with pytest.raises(UnsupportedModelError, match=r"LeGrad needs a token-grid .* is a feature-map .*GradCAM"):
        LeGrad()(rn, x, torch.randn(1, 32))
    assert rn.layer_indices([-1, 0, 3]) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        rn.layer_indices([4])


def test_open_clip_backbone_dispatches_to_the_resnet_adapter():
    bb = OpenCLIPBackbone("re-tiny-rn", alpha_channel=True)
    assert type(bb) is OpenCLIPResNetBackbone and isinstance(bb, OpenCLIPBackbone)
    assert bb.alpha_embed is not None and bb.model_name == "re-tiny-rn"
    assert type(OpenCLIPBackbone("re-tiny-vit")) is OpenCLIPViTBackbone
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        OpenCLIPResNetBackbone("re-tiny-vit")


def test_input_validation(rn):
    with pytest.raises(ValueError, match="multiple of the patch size 32"):
        rn.encode_image(torch.randn(1, 3, 48, 64))
    x = torch.randn(1, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rn.feature_maps(x)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rn.encode_image(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="unknown stage"):
        rn.feature_maps(torch.randn(1, 3, 64, 64), "layer5")
    with pytest.raises(ValueError, match=r"feature maps \[B, C, h, w\]"):
        rn.pool_features(torch.randn(2, 512))
    with pytest.raises(ValueError, match="multiple of the ResNet's total stride"):
        OpenCLIPResNetBackbone("re-tiny-rn", image_size=80)
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        OpenCLIPResNetBackbone("re-tiny-vit")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPResNetBackbone("RN-nonexistent")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        OpenCLIPResNetBackbone("re-tiny-rn", pretrained="openai")


def test_pretrained_tag_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match="local file"):
        OpenCLIPResNetBackbone("RN50", pretrained="openai")
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file(tmp_path, suffix):
    torch.manual_seed(2)
    src = _randomize_batchnorm(OpenCLIPResNetBackbone("re-tiny-rn"))
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = OpenCLIPResNetBackbone("re-tiny-rn", pretrained=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), src.encode_image(x))
    assert loaded.pretrained == str(path)
    assert copy.deepcopy(loaded).model_name == "re-tiny-rn"


def test_preprocess_spec_comes_from_the_model(rn):
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(rn.model)
    assert rn.preprocess.mean == tuple(cfg["mean"]) and rn.preprocess.std == tuple(cfg["std"])
    assert rn.preprocess.size == 64


@pytest.mark.slow
def test_rn50_random_weights():
    bb = OpenCLIPResNetBackbone("RN50").requires_grad_(False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(x), bb.model.encode_image(x), rtol=0, atol=0)
        assert bb.feature_maps(x).shape == (1, 2048, 7, 7)
    assert bb.embed_dim == 1024 and bb.feature_dim == 2048
