import time

import pytest
import torch
from safetensors.torch import save_file

from regionembed.backbones import (
    Backbone,
    FeatureMapBackbone,
    OpenCLIPBackbone,
    OpenCLIPResNetBackbone,
    PretrainedWeightsUnavailable,
    TimmBackbone,
    TokenGridBackbone,
    UnsupportedModelError,
    require,
)


def test_encode_image_matches_open_clip(tiny_backbone, tiny_ls_backbone):
    for b in (tiny_backbone, tiny_ls_backbone):
        s = b.preprocess.size
        x = torch.randn(3, 3, s, s)
        with torch.no_grad():
            torch.testing.assert_close(b.encode_image(x), b.model.encode_image(x), rtol=0, atol=1e-6)
            torch.testing.assert_close(b.encode_text(b.tokenize(["a cat"])), b.model.encode_text(b.tokenize("a cat")))


def test_encode_image_matches_timm(timm_backbone):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(timm_backbone.encode_image(x), timm_backbone.model(x), rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="no text tower"):
        timm_backbone.encode_text(torch.zeros(1, 4, dtype=torch.long))


def test_any_image_size_without_mutating_parameters():
    b = OpenCLIPBackbone("re-tiny-vit", image_size=64)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    ids = {k: id(p) for k, p in b.named_parameters()}
    with torch.no_grad():
        out = b.encode_image(torch.randn(2, 3, 64, 64))
        b.encode_image(torch.randn(1, 3, 48, 48))  # another size in the same process
    assert out.shape == (2, b.embed_dim)
    assert b.preprocess.size == 64
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert ids == {k: id(p) for k, p in b.named_parameters()}
    assert b.grid_size(64) == (8, 8)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        b.encode_image(torch.randn(1, 3, 60, 60))


def test_preprocess_spec_comes_from_the_model(tiny_backbone, timm_backbone):
    import open_clip
    import timm

    cfg = open_clip.get_model_preprocess_cfg(tiny_backbone.model)
    assert tiny_backbone.preprocess.mean == tuple(cfg["mean"])
    assert tiny_backbone.preprocess.size == 32
    tcfg = timm.data.resolve_model_data_config(timm_backbone.model)
    assert timm_backbone.preprocess.std == tuple(tcfg["std"])


def test_unknown_model_and_tag():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPBackbone("not-a-model")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        OpenCLIPBackbone("re-tiny-vit", pretrained="openai")


def test_pretrained_tag_offline_fails_fast_with_a_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match="local file"):
        OpenCLIPBackbone("ViT-B-32", pretrained="openai")
    assert time.monotonic() - start < 20


def test_unreachable_hub_fails_fast_without_env(monkeypatch):
    import regionembed.backbones.open_clip as oc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(oc, "hub_offline", lambda: True)
    with pytest.raises(PretrainedWeightsUnavailable, match="pretrained"):
        OpenCLIPBackbone("ViT-B-32", pretrained="openai")


def test_timm_pretrained_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable):
        TimmBackbone("test_vit", pretrained=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file(tmp_path, tiny_backbone, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = OpenCLIPBackbone("re-tiny-vit", pretrained=str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), tiny_backbone.encode_image(x))


def test_missing_or_bad_local_file(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="not found"):
        OpenCLIPBackbone("re-tiny-vit", pretrained=str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "weights.txt"
    bad.write_text("x")
    with pytest.raises(PretrainedWeightsUnavailable, match="unsupported weights file"):
        OpenCLIPBackbone("re-tiny-vit", pretrained=str(bad))


def test_nan_image_rejected(tiny_backbone):
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tiny_backbone.encode_image(x)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_backbone.encode_image(torch.randn(3, 32, 32))


def test_capabilities_and_require():
    vit, rn = OpenCLIPBackbone("re-tiny-vit"), OpenCLIPBackbone("re-tiny-rn")
    assert isinstance(vit, TokenGridBackbone) and not isinstance(vit, FeatureMapBackbone)
    assert isinstance(rn, FeatureMapBackbone) and not isinstance(rn, TokenGridBackbone)
    assert require(vit, TokenGridBackbone, "LeGrad") is vit
    with pytest.raises(UnsupportedModelError) as err:
        require(rn, TokenGridBackbone, "LeGrad", alternative="GradCAM")
    assert str(err.value) == (
        "LeGrad needs a token-grid (vision transformer) backbone, but OpenCLIPResNetBackbone('re-tiny-rn') is a "
        "feature-map (convolutional) backbone; use GradCAM instead"
    )
    with pytest.raises(UnsupportedModelError, match="needs a feature-map"):
        require(vit, FeatureMapBackbone, "X")


def test_open_clip_backbone_from_yaml_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Backbone)
    cfg = parser.parse_args(
        [
            "--backbone",
            '{"class_path": "regionembed.backbones.OpenCLIPBackbone", "init_args": {"model_name": "re-tiny-rn"}}',
        ]
    )
    backbone = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg).backbone
    assert type(backbone) is OpenCLIPResNetBackbone and backbone.model_name == "re-tiny-rn"
