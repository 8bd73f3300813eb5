"""Alpha-CLIP's alpha channel: zero-init identity, alpha maps, official checkpoint format, training pieces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from test_data_formats import coco, refcoco  # noqa: F401  (fixtures in the on-disk formats)

from conftest import make_masks
from regionembed.backbones import Backbone, OpenCLIPBackbone, TimmBackbone, UnsupportedModelError
from regionembed.backbones.alpha import (
    ALPHA_MEAN,
    ALPHA_STD,
    AlphaCheckpointError,
    alpha_clip_key_map,
    alpha_from_boxes,
    alpha_from_masks,
    alpha_input,
    export_alpha_clip_visual,
    load_alpha_clip_visual,
    normalize_alpha,
    whole_image_alpha,
)
from regionembed.backbones.resnet import OpenCLIPResNetBackbone
from regionembed.backbones.weights import PretrainedWeightsUnavailable
from regionembed.losses import masked_contrastive_loss
from regionembed.modules.alpha_clip import AlphaCLIPModule, alpha_pairs
from regionembed.regions import AlphaEmbedding


def _random_alpha(backbone, n: int, seed: int = 0) -> torch.Tensor:
    s = backbone.preprocess.size
    return alpha_from_masks(make_masks(n, s, s, seed=seed))


@pytest.mark.parametrize(
    "build",
    [
        lambda: OpenCLIPBackbone("re-tiny-vit"),
        lambda: OpenCLIPBackbone("re-tiny-vit-ls"),
        lambda: TimmBackbone("test_vit", image_size=32),
        lambda: OpenCLIPResNetBackbone("re-tiny-rn"),
    ],
    ids=["open_clip", "open_clip_ls", "timm", "open_clip_resnet"],
)
def test_fresh_alpha_channel_changes_nothing(build):
    torch.manual_seed(0)
    backbone = build()
    s = backbone.preprocess.size
    image = torch.randn(3, 3, s, s)
    plain = backbone.encode_image(image)
    backbone.enable_alpha()
    assert backbone.alpha_embed.conv.weight.abs().sum() == 0
    assert backbone.alpha_embed.conv.bias is None
    for alpha in (_random_alpha(backbone, 3), whole_image_alpha(3, (s, s)), torch.randn(3, 1, s, s) * 5):
        torch.testing.assert_close(backbone.encode_image(image, alpha=alpha), plain, rtol=0, atol=0)
    # once trained (non-zero), the alpha map matters
    torch.nn.init.normal_(backbone.alpha_embed.conv.weight)
    assert not torch.allclose(backbone.encode_image(image, alpha=_random_alpha(backbone, 3)), plain)
    # the alpha conv has the geometry of the RGB stem conv
    conv, rgb = backbone.alpha_embed.conv, backbone.rgb_stem_conv
    assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        rgb.out_channels,
        rgb.kernel_size,
        rgb.stride,
        rgb.padding,
    )


def test_alpha_input_errors(tiny_backbone):
    image = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="no alpha channel"):
        tiny_backbone.encode_image(image, alpha=torch.zeros(2, 1, 32, 32))
    backbone = OpenCLIPBackbone("re-tiny-vit", alpha_channel=True)
    for bad, match in [
        (torch.zeros(2, 32, 32), r"\[B, 1, H, W\]"),
        (torch.zeros(2, 3, 32, 32), r"\[B, 1, H, W\]"),
        (torch.zeros(1, 1, 32, 32), "does not match"),
        (torch.zeros(2, 1, 16, 16), "does not match"),
        (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
    ]:
        with pytest.raises(ValueError, match=match):
            backbone.encode_image(image, alpha=bad)


def test_alpha_maps():
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:4, 3:6] = 1
    masks[1] = 1
    alpha = alpha_from_masks(masks)
    assert alpha.shape == (2, 1, 8, 8)
    assert torch.allclose(alpha[0, 0, 2, 3], torch.tensor((1 - ALPHA_MEAN) / ALPHA_STD))
    assert torch.allclose(alpha[0, 0, 0, 0], torch.tensor(-ALPHA_MEAN / ALPHA_STD))
    torch.testing.assert_close(alpha[1:], whole_image_alpha(1, (8, 8)))
    boxes = torch.tensor([[3.0, 2.0, 6.0, 4.0], [1.2, 1.2, 1.4, 1.4]])  # the second is thinner than a pixel
    box_alpha = alpha_from_boxes(boxes, (8, 8))
    torch.testing.assert_close(box_alpha[0], alpha[0])
    assert (box_alpha[1] > 0).sum() == 1 and box_alpha[1, 0, 1, 1] > 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        normalize_alpha(torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        normalize_alpha(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        alpha_from_boxes(torch.zeros(4), (8, 8))
    with pytest.raises(ValueError, match=r"\[N, S, S\]"):
        alpha_from_masks(torch.zeros(8, 8))


# ------------------------------------------------------------------------------------- official checkpoints
def _official_forward(state: dict[str, torch.Tensor], image, alpha, heads: int, act=F.gelu) -> torch.Tensor:
    """An independent functional forward of Alpha-CLIP's ViT written against the *official* key names."""
    x = F.conv2d(image, state["conv1.weight"], stride=state["conv1.weight"].shape[-1])
    x = x + F.conv2d(alpha, state["conv1_alpha.weight"], stride=state["conv1_alpha.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = state["class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["positional_embedding"]
    width = x.shape[-1]

    def ln(t, name):
        return F.layer_norm(t, (width,), state[f"{name}.weight"], state[f"{name}.bias"])

    x = ln(x, "ln_pre")
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in state:
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        q, k, v = F.linear(h, state[p + "attn.in_proj.weight"], state[p + "attn.in_proj.bias"]).chunk(3, dim=-1)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, width)
        x = x + F.linear(out, state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"])
        h = act(F.linear(ln(x, p + "ln_2"), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        i += 1
    return ln(x[:, 0], "ln_post") @ state["proj"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_format_roundtrip_matches_an_independent_forward(tmp_path, suffix):
    torch.manual_seed(0)
    trained = OpenCLIPBackbone("re-tiny-vit", alpha_channel=True)
    torch.nn.init.normal_(trained.alpha_embed.conv.weight, std=0.1)
    path = export_alpha_clip_visual(trained, tmp_path / f"alpha{suffix}")
    if suffix == ".pth":
        state = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(path)
    assert "conv1_alpha.weight" in state and "transformer.resblocks.0.attn.in_proj.weight" in state
    assert not any("in_proj_weight" in k for k in state)
    torch.manual_seed(123)  # a different random model: everything visual must come from the file
    loaded = OpenCLIPBackbone("re-tiny-vit", alpha_checkpoint=str(path))
    image, alpha = torch.randn(2, 3, 32, 32), _random_alpha(loaded, 2)
    ours = loaded.encode_image(image, alpha=alpha)
    torch.testing.assert_close(ours, trained.encode_image(image, alpha=alpha), rtol=0, atol=0)
    heads = loaded.blocks[0].attn.num_heads
    torch.testing.assert_close(ours, _official_forward(state, image, alpha, heads), rtol=1e-5, atol=1e-5)


def test_official_checkpoint_prefixes_and_errors(tmp_path):
    torch.manual_seed(0)
    trained = OpenCLIPBackbone("re-tiny-vit", alpha_channel=True)
    state = torch.load(export_alpha_clip_visual(trained, tmp_path / "a.pth"), weights_only=True)
    # DDP-saved ("module.") checkpoints load
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    OpenCLIPBackbone("re-tiny-vit", alpha_checkpoint=str(tmp_path / "ddp.pth"))
    # wrong architecture
    with pytest.raises(AlphaCheckpointError, match="shape mismatches"):
        OpenCLIPBackbone("re-small-vit", alpha_checkpoint=str(tmp_path / "a.pth"))
    # a LoRA variant (extra keys) and a truncated file (missing keys)
    torch.save({**state, "transformer.resblocks.0.attn.in_proj.lora_A": torch.zeros(1)}, tmp_path / "lora.pth")
    with pytest.raises(AlphaCheckpointError, match="unexpected 1 keys"):
        OpenCLIPBackbone("re-tiny-vit", alpha_checkpoint=str(tmp_path / "lora.pth"))
    torch.save({k: v for k, v in state.items() if k != "conv1_alpha.weight"}, tmp_path / "no_alpha.pth")
    with pytest.raises(AlphaCheckpointError, match="missing 1 keys"):
        OpenCLIPBackbone("re-tiny-vit", alpha_checkpoint=str(tmp_path / "no_alpha.pth"))
    # an untrusted pickle is refused (weights_only), the message names the file
    torch.save({"conv1.weight": torch.zeros(1), "evil": object()}, tmp_path / "pickle.pth")
    with pytest.raises(PretrainedWeightsUnavailable, match=r"cannot read weights file .*pickle\.pth.*safe loading"):
        OpenCLIPBackbone("re-tiny-vit", alpha_checkpoint=str(tmp_path / "pickle.pth"))
    # the key map is explicit: every visual key has exactly one official name
    visual_keys = list(trained.model.visual.state_dict())
    mapping = alpha_clip_key_map(visual_keys)
    assert len(mapping) == len(visual_keys) + 1 and len(set(mapping.values())) == len(mapping)
    assert (
        mapping["transformer.resblocks.1.attn.in_proj.bias"] == "model.visual.transformer.resblocks.1.attn.in_proj_bias"
    )


def test_load_keeps_the_text_tower(tmp_path):
    torch.manual_seed(0)
    export = export_alpha_clip_visual(OpenCLIPBackbone("re-tiny-vit", alpha_channel=True), tmp_path / "a.pth")
    torch.manual_seed(5)
    base = OpenCLIPBackbone("re-tiny-vit")
    text = base.model.token_embedding.weight.clone()
    load_alpha_clip_visual(base, export)
    torch.testing.assert_close(base.model.token_embedding.weight, text, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- training pieces
def test_masked_contrastive_loss_matches_open_clip_and_torch():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    expected = ClipLoss()(image, text, scale)
    torch.testing.assert_close(masked_contrastive_loss(logits), expected)
    torch.testing.assert_close(masked_contrastive_loss(logits, torch.arange(6)), expected)
    labels = torch.arange(6)
    smooth = (
        F.cross_entropy(logits, labels, label_smoothing=0.1) + F.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(masked_contrastive_loss(logits, label_smoothing=0.1), smooth)
    # pairs 0 and 1 share a text: each is left out of the other's negatives, in both directions
    ids = torch.tensor([7, 7, 1, 2, 3, 4])
    keep = torch.ones(6, 6, dtype=torch.bool)
    keep[0, 1] = keep[1, 0] = False
    manual = []
    for lg in (logits, logits.T):
        rows = [F.cross_entropy(lg[i][keep[i]][None], torch.tensor([int(keep[i][:i].sum())])) for i in range(6)]
        manual.append(torch.stack(rows).mean())
    torch.testing.assert_close(masked_contrastive_loss(logits, ids), (manual[0] + manual[1]) / 2)
    assert torch.isfinite(masked_contrastive_loss(logits, ids, label_smoothing=0.2))


def _region_batch():
    masks = make_masks(5, 16, 16, seed=3)
    return {
        "image": torch.randn(3, 3, 16, 16),
        "masks": masks,
        "texts": ["red circle", "blue star", "green square", "red star", "blue circle"],
        "region_batch_index": torch.tensor([0, 0, 0, 1, 1]),  # image 2 has no region
        "caption": ["cap a", "cap b", "cap c"],
    }


def test_alpha_pairs():
    batch = _region_batch()
    images, alphas, texts = alpha_pairs(batch, torch.Generator().manual_seed(0), 2, 0.0, ["a {}."])
    assert images.shape == (6, 3, 16, 16) and alphas.shape == (6, 1, 16, 16) and len(texts) == 6
    whole = whole_image_alpha(1, (16, 16))[0]
    assert {texts[0], texts[1]} <= {"a red circle.", "a blue star.", "a green square."} and texts[0] != texts[1]
    assert texts[4:] == ["cap c", "cap c"] and torch.equal(alphas[4], whole)  # no region: the whole image
    for k in range(4):  # each region pair: the alpha is its own mask
        r = batch["texts"].index(texts[k][2:-1])
        torch.testing.assert_close(alphas[k], alpha_from_masks(batch["masks"][r : r + 1])[0])
        torch.testing.assert_close(images[k], batch["image"][k // 2])
    again = alpha_pairs(batch, torch.Generator().manual_seed(0), 2, 0.0, ["a {}."])
    assert again[2] == texts and torch.equal(again[1], alphas)
    _, alphas, texts = alpha_pairs(batch, torch.Generator().manual_seed(0), 1, 1.0, ["a {}."])
    assert texts == ["cap a", "cap b", "cap c"] and all(torch.equal(a, whole) for a in alphas)
    del batch["caption"]
    _, _, texts = alpha_pairs(batch, torch.Generator().manual_seed(0), 1, 1.0, ["a {}."])
    assert texts[0] == "a red circle and blue star and green square." and texts[2] == "a photo."


def test_alpha_module_freezes_text_and_groups_parameters():
    module = AlphaCLIPModule(OpenCLIPBackbone("re-tiny-vit"), lr_alpha=2e-4, lr=2e-6, weight_decay=0.02)
    model = module.backbone.model
    assert module.backbone.alpha_embed is not None
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert "backbone.alpha_embed.conv.weight" in trainable
    assert all(n.startswith(("backbone.model.visual.", "backbone.alpha_embed.")) for n in trainable)
    assert not model.logit_scale.requires_grad and not model.token_embedding.weight.requires_grad
    groups = module.parameter_groups()
    alpha_group = next(g for g in groups if any(p is module.backbone.alpha_embed.conv.weight for p in g["params"]))
    assert alpha_group["lr"] == 2e-4 and alpha_group["weight_decay"] == 0.02
    assert {g["lr"] for g in groups if g is not alpha_group} == {2e-6}
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    learned = AlphaCLIPModule(OpenCLIPBackbone("re-tiny-vit"), learn_temperature=True)
    assert any(p is learned.backbone.logit_scale for g in learned.parameter_groups() for p in g["params"])
    with pytest.raises(ValueError, match="whole_image_ratio"):
        AlphaCLIPModule(OpenCLIPBackbone("re-tiny-vit"), whole_image_ratio=1.5)
    with pytest.raises(ValueError, match="placeholder"):
        AlphaCLIPModule(OpenCLIPBackbone("re-tiny-vit"), templates=["no placeholder"])


def test_alpha_module_step_trains_image_side_only():
    torch.manual_seed(0)
    module = AlphaCLIPModule(OpenCLIPBackbone("re-tiny-vit"), lr_alpha=1e-2, lr=1e-3)
    module.backbone.train()
    batch = _region_batch()
    batch["image"] = torch.randn(3, 3, 32, 32)
    batch["masks"] = make_masks(5, 32, 32, seed=1)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(module.parameter_groups())
    loss = module._loss(*alpha_pairs(batch, torch.Generator(), 1, 0.2))
    loss.backward()
    optimizer.step()
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert "backbone.alpha_embed.conv.weight" in changed
    assert not any(n.startswith("backbone.model.") and not n.startswith("backbone.model.visual.") for n in changed)


def test_alpha_embedding_region_method(tmp_path):
    torch.manual_seed(0)
    plain = OpenCLIPBackbone("re-tiny-vit")
    alpha_model = OpenCLIPBackbone("re-tiny-vit", alpha_channel=True)
    alpha_model.model.load_state_dict(plain.model.state_dict())
    image, masks = torch.randn(3, 32, 32), make_masks(3, 32, 32)
    for kind in ("mask", "box", "whole"):
        method = AlphaEmbedding(kind, backbone=alpha_model)
        out = method(plain, image, masks)
        assert method.name == f"alpha_{kind}" and out.shape == (3, 32)
        # a fresh alpha channel: every region gets the plain whole-image embedding
        torch.testing.assert_close(out, plain.encode_image(image[None]).expand(3, -1))
    with pytest.raises(ValueError, match="no alpha channel"):
        AlphaEmbedding("mask")(plain, image, masks)
    with pytest.raises(ValueError, match="alpha must be"):
        AlphaEmbedding("circle")


def test_alpha_benchmark_runs():
    from regionembed.bench.alpha import run_case, table

    record = run_case("re-tiny-vit", 32, 4, steps=1, warmup=0)
    assert record["plain_median_s"] > 0 and record["alpha_median_s"] > 0
    assert record["alpha_params"] == 48 * 8 * 8  # 1 -> 48 channels, 8x8 kernel, no bias
    assert "re-tiny-vit" in table([record])


def test_pairs_from_coco_and_refcoco_data_modules(coco, refcoco):  # noqa: F811 (fixtures imported above)
    from test_data_formats import SPEC

    from regionembed.data import CocoRegionDataModule, RefCocoDataModule

    coco_dm = CocoRegionDataModule(
        train_images=str(coco["images"]), train_ann_file=str(coco["ann_file"]), preprocess=SPEC, batch_size=2
    )
    coco_dm.setup("fit")
    batch = next(iter(coco_dm.train_dataloader()))
    _, alphas, texts = alpha_pairs(batch, torch.Generator().manual_seed(0), 1, 0.0, ["a photo of a {}."])
    assert alphas.shape == (2, 1, 32, 32)
    assert all(t[len("a photo of a ") : -1] in {"person", "cat", "dog"} for t in texts)
    ref_dm = RefCocoDataModule(
        images=str(refcoco["images"]),
        instances_file=str(refcoco["ann_file"]),
        refs_file=str(refcoco["refs_file"]),
        train_split="val",
        preprocess=SPEC,
        batch_size=3,
    )
    ref_dm.setup("fit")
    batch = next(iter(ref_dm.train_dataloader()))
    images, alphas, texts = alpha_pairs(batch, torch.Generator().manual_seed(0), 1, 0.0, ["{}"])
    assert sorted(texts) == sorted(batch["text"])  # the referring expressions, not class names
    for b, text in enumerate(texts):  # each alpha is the referred region's mask
        k = batch["text"].index(text)
        region = int(torch.nonzero(batch["region_batch_index"] == k)[batch["target_index"][k]])
        torch.testing.assert_close(alphas[b], alpha_from_masks(batch["masks"][region : region + 1])[0])
    module = AlphaCLIPModule(OpenCLIPBackbone("re-tiny-vit"), templates=["{}"])
    assert torch.isfinite(module._loss(images, alphas, texts))


def test_resnet_alpha_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    trained = OpenCLIPResNetBackbone("re-tiny-rn", alpha_channel=True)
    torch.nn.init.normal_(trained.alpha_embed.conv.weight, std=0.1)
    path = export_alpha_clip_visual(trained, tmp_path / "rn.pth")
    assert torch.load(path, weights_only=True)["conv1_alpha.weight"].shape == (8, 1, 3, 3)
    torch.manual_seed(1)
    loaded = OpenCLIPResNetBackbone("re-tiny-rn", alpha_checkpoint=str(path))
    image = torch.randn(2, 3, 64, 64)
    alpha = alpha_from_masks(make_masks(2, 64, 64))
    torch.testing.assert_close(loaded.encode_image(image, alpha=alpha), trained.encode_image(image, alpha=alpha))
    with pytest.raises(AlphaCheckpointError):
        OpenCLIPBackbone("re-tiny-vit", alpha_checkpoint=str(path))


class _ConvNet(Backbone):
    """The least a backbone can be: a conv stem and a pool. It exposes ``rgb_stem_conv`` and nothing about alpha."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.head = torch.nn.Linear(8, 5)

    embed_dim = 5
    patch_size = 4
    preprocess = None

    @property
    def rgb_stem_conv(self):
        return self.stem

    def forward_image(self, image):
        return self.head(self.stem(image).relu().mean(dim=(2, 3)))


def test_alpha_channel_is_an_add_on_for_any_backbone_with_a_stem_conv():
    torch.manual_seed(0)
    net = _ConvNet().enable_alpha()
    torch.nn.init.normal_(net.alpha_embed.conv.weight)
    image, alpha = torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = net.head(
            (net.stem(image) + F.conv2d(alpha, net.alpha_embed.conv.weight, stride=4)).relu().mean((2, 3))
        )
        torch.testing.assert_close(net.encode_image(image, alpha=alpha), expected)
        torch.testing.assert_close(net.encode_image(image), net.forward_image(image), rtol=0, atol=0)
    assert not net.stem._forward_hooks  # nothing stays attached between calls
    assert "alpha_embed.conv.weight" in net.state_dict()
    with pytest.raises(ValueError, match=r"alpha must have shape \[B, 1, H, W\]"):
        net.encode_image(image, alpha=torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        net.encode_image(image, alpha=torch.full((2, 1, 16, 16), float("nan")))
    assert not net.stem._forward_hooks


def test_alpha_input_checks_the_stem_ran_and_the_stem_exists():
    net = _ConvNet().enable_alpha()
    image, alpha = torch.randn(1, 3, 8, 8), torch.zeros(1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="never ran its rgb_stem_conv"), alpha_input(net, alpha, image):
        pass  # a forward that bypasses the stem conv would silently ignore the alpha
    assert not net.stem._forward_hooks

    class NoStem(_ConvNet):
        rgb_stem_conv = None

    with pytest.raises(UnsupportedModelError, match="exposes no rgb_stem_conv"):
        NoStem().enable_alpha()
