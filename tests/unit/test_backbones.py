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


@pytest.mark.parametrize(
    ("name", "tag"), [("ViT-B-16-SigLIP", "webli"), ("PE-Core-B-16", "meta"), ("ViT-B-16", "openai")]
)
def test_random_weights_get_the_models_own_preprocessing(name, tag):
    """open_clip applies a tag's preprocessing only when the weights come from the tag; without one, a model whose
    tags agree gets theirs (SigLIP/PE: 0.5 mean and std, squash; PE: bilinear), not OpenAI's defaults."""
    import open_clip

    want = open_clip.get_pretrained_cfg(name, tag)
    with torch.device("meta"):
        b = OpenCLIPBackbone(name, tokenizer=False)
    spec = b.preprocess
    assert (spec.mean, spec.std) == (tuple(want["mean"]), tuple(want["std"]))
    assert (spec.interpolation, spec.resize_mode) == (want["interpolation"], want["resize_mode"])


def test_tags_that_disagree():
    """The open_clip configs whose pretrained tags disagree on preprocessing (the docs name them): registry reads
    only, no model is built."""
    import open_clip

    from regionembed.backbones.open_clip import tag_preprocess_cfg

    found = {(m, k) for m in open_clip.list_models() for k in tag_preprocess_cfg(m)[1]}
    assert found == {
        ("ViT-L-14", "mean"),
        ("ViT-L-14", "std"),
        ("ViT-H-14", "resize_mode"),
        ("ViT-H-14-quickgelu", "resize_mode"),
    }


@pytest.fixture
def tagged_tiny(monkeypatch):
    """re-tiny-vit given two fake pretrained tags (what open_clip's registry says for real models): they agree on
    the mean and the resize mode, and disagree on the std."""
    import open_clip

    cfgs = {
        "a": {"mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "squash"},
        "b": {"mean": (0.5,) * 3, "std": (0.25,) * 3, "resize_mode": "squash"},
    }
    tags, get_cfg = open_clip.list_pretrained_tags_by_model, open_clip.get_pretrained_cfg
    monkeypatch.setattr(
        open_clip, "list_pretrained_tags_by_model", lambda m: list(cfgs) if m == "re-tiny-vit" else tags(m)
    )
    monkeypatch.setattr(
        open_clip, "get_pretrained_cfg", lambda m, t: dict(cfgs[t]) if m == "re-tiny-vit" else get_cfg(m, t)
    )
    return cfgs


def test_local_weights_get_the_tags_common_preprocessing(tmp_path, tiny_backbone, tagged_tiny, caplog):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.model.state_dict().items()}, str(path))
    with caplog.at_level("WARNING", logger="regionembed.backbones.open_clip"):
        b = OpenCLIPBackbone("re-tiny-vit", pretrained=str(path))
    assert b.preprocess.mean == (0.5,) * 3 and b.preprocess.resize_mode == "squash"  # the tags agree
    assert b.preprocess.std == tiny_backbone.preprocess.std != (0.5,) * 3  # they don't: open_clip's default
    assert (
        "disagree on std" in caplog.text
        and "preprocess_cfg" in caplog.text
        and "(0.25, 0.25, 0.25) for b" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="regionembed.backbones.open_clip"):
        b = OpenCLIPBackbone("re-tiny-vit", pretrained=str(path), preprocess_cfg="b")
    assert b.preprocess.std == (0.25,) * 3 and "disagree" not in caplog.text
    b = OpenCLIPBackbone("re-tiny-vit", preprocess_cfg={"std": [0.1, 0.2, 0.3], "interpolation": "bilinear"})
    assert (
        b.preprocess.std == (0.1, 0.2, 0.3) and b.preprocess.mean[0] == 0.5 and b.preprocess.interpolation == "bilinear"
    )


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"meen": (0.5,) * 3}, r"preprocess_cfg: unknown keys \['meen'\]"),
        ({"mean": (0.5, 0.5)}, "preprocess_cfg: mean must be three numbers"),
        ({"std": "0.5"}, "preprocess_cfg: std must be three numbers"),
        ({"mean": [0.5, 0.5, True]}, "preprocess_cfg: mean must be three numbers"),
        ({"interpolation": "cubic"}, "preprocess_cfg: interpolation must be one of bicubic, bilinear, got 'cubic'"),
        ({"resize_mode": "bogus"}, "preprocess_cfg: resize_mode must be one of shortest, longest, squash"),
        ("laion", "preprocess_cfg='laion' is not a pretrained tag of re-tiny-vit"),
    ],
)
def test_bad_preprocess_cfg_names_the_setting(cfg, message):
    with pytest.raises(ValueError, match=message):
        OpenCLIPBackbone("re-tiny-vit", preprocess_cfg=cfg)


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
