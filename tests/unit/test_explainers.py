"""Grad-CAM, Score-CAM, VL-Score and attention rollout against independent references, on ViT and ResNet backbones."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regionembed.backbones import OpenCLIPResNetBackbone, UnsupportedModelError
from regionembed.explainers import AttentionRollout, GradCAM, LeGrad, ScoreCAM, VLScore, prompt_targets
from regionembed.inversion import MaskInversion
from regionembed.text import encode_prompts


@pytest.fixture(scope="module")
def tiny_rn():
    """A tiny RN with random BatchNorm statistics and gains (open_clip zero-inits each block's last BN gain, which
    would make every residual block an identity)."""
    torch.manual_seed(4)
    backbone = OpenCLIPResNetBackbone("re-tiny-rn").requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return backbone


@pytest.fixture(params=["vit", "rn"])
def backbone(request, tiny_backbone, tiny_rn):
    return tiny_backbone if request.param == "vit" else tiny_rn


def _inputs(backbone, n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = backbone.preprocess.size
    image = torch.randn(n, 3, s, s, generator=g, dtype=dtype)
    targets = F.normalize(torch.randn(n, backbone.embed_dim, generator=g, dtype=dtype), dim=-1)
    return image, targets


def _np_min_max(x):
    rng = x.max() - x.min()
    return (x - x.min()) / rng if rng > 1e-12 else np.zeros_like(x)


def _upsample(grid_map, size):
    return F.interpolate(torch.as_tensor(grid_map)[None, None], size=size, mode="bilinear")[0, 0].numpy()


def _activations(backbone, x, layer):
    """The chosen layer's activations ``[C, h, w]`` of one image, written independently of the library helper."""
    if isinstance(backbone, OpenCLIPResNetBackbone):
        return backbone.feature_maps(x, layer)[0]
    tokens = backbone.forward_blocks(backbone.embed_tokens(x), stop=layer % len(backbone.blocks) + 1)[0, 1:]
    h, w = backbone.grid_size(tuple(x.shape[-2:]))
    return tokens.T.reshape(-1, h, w)


# ----------------------------------------------------------------------------------------------- common contract
EXPLAINERS = {
    "gradcam": lambda: GradCAM(),
    "scorecam": lambda: ScoreCAM(max_channels=12, batch_size=5),
    "vlscore": lambda: VLScore(max_channels=12, batch_size=5),
}


@pytest.mark.parametrize("name", list(EXPLAINERS))
def test_shapes_range_and_batch_consistency(backbone, name):
    explainer = EXPLAINERS[name]()
    image, targets = _inputs(backbone)
    maps = explainer(backbone, image, targets)
    s = backbone.preprocess.size
    assert maps.shape == (3, s, s) and maps.dtype == image.dtype
    assert maps.min() >= 0 and maps.max() <= 1 and torch.isfinite(maps).all()
    assert not maps.requires_grad
    single = torch.cat([explainer(backbone, image[i : i + 1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(maps, single, rtol=0, atol=1e-4)  # float32, conv batches of different sizes
    # one image broadcast over several targets (ScoreCAM/VLScore embed the masked copies once)
    shared = explainer(backbone, image[:1], targets)
    per_target = torch.cat([explainer(backbone, image[:1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(shared, per_target, rtol=0, atol=1e-4)


def test_timm_backbone_runs(timm_backbone):
    image, targets = _inputs(timm_backbone, n=2)
    for explainer in (GradCAM(), VLScore(max_channels=4), AttentionRollout()):
        maps = explainer(timm_backbone, image, targets)
        assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1


@pytest.mark.parametrize("explainer", [GradCAM(), ScoreCAM(max_channels=2), VLScore(max_channels=2)])
def test_input_validation(tiny_backbone, explainer):
    image, targets = _inputs(tiny_backbone, n=2)
    with pytest.raises(ValueError, match="targets must have shape"):
        explainer(tiny_backbone, image, targets[:, :5])
    bad = targets.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        explainer(tiny_backbone, image, bad)
    with pytest.raises(ValueError, match="2 images but 3 targets"):
        explainer(tiny_backbone, image, torch.cat([targets, targets[:1]]))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        explainer(tiny_backbone, torch.randn(2, 3, 30, 30), targets)


def test_layer_validation(tiny_backbone, tiny_rn):
    image, targets = _inputs(tiny_backbone, n=1)
    with pytest.raises(ValueError, match="block index"):
        GradCAM(layer="layer4")(tiny_backbone, image, targets)
    with pytest.raises(ValueError, match="out of range"):
        ScoreCAM(layer=7)(tiny_backbone, image, targets)
    image, targets = _inputs(tiny_rn, n=1)
    with pytest.raises(ValueError, match="unknown stage"):
        GradCAM(layer="fc")(tiny_rn, image, targets)
    with pytest.raises(ValueError, match="temperature"):
        VLScore(temperature=0)
    with pytest.raises(ValueError, match="batch_size"):
        ScoreCAM(batch_size=0)
    with pytest.raises(ValueError, match="max_channels"):
        VLScore(max_channels=0)
    with pytest.raises(ValueError, match="baseline"):
        VLScore(baseline="grey")
    with pytest.raises(ValueError, match="residual"):
        AttentionRollout(residual=2.0)


# ---------------------------------------------------------------------------------------------------- Grad-CAM
def _fd_gradcam(backbone, image, e, layer, eps=1e-6):
    """Grad-CAM by hand (float64): the channel weight ``mean_ij ds/dA_cij`` is the directional derivative of the
    score along "add 1 to channel c at every position" divided by h*w, taken by central finite differences."""
    with torch.no_grad():
        if isinstance(backbone, OpenCLIPResNetBackbone):
            acts = backbone.feature_maps(image, layer)  # [1, C, h, w]
            grid_acts = acts[0]
            ones = torch.eye(acts.shape[1], dtype=acts.dtype)[:, :, None, None].expand(-1, -1, *acts.shape[-2:])

            def score(a):
                return F.normalize(backbone.pool_features(a, layer), dim=-1) @ e

        else:
            acts = backbone.forward_blocks(backbone.embed_tokens(image), stop=layer + 1)  # [1, T, C]
            h, w = backbone.grid_size(tuple(image.shape[-2:]))
            grid_acts = acts[0, 1:].T.reshape(-1, h, w)  # prefix token dropped
            ones = torch.eye(acts.shape[-1], dtype=acts.dtype)[:, None, :].expand(-1, acts.shape[1], -1).clone()
            ones[:, 0] = 0  # the [CLS] token is not part of the map

            def score(a):
                for blk in backbone.blocks[layer + 1 :]:
                    a = blk(a)
                return F.normalize(backbone.pool_tokens(a), dim=-1) @ e

        hw = grid_acts.shape[-1] * grid_acts.shape[-2]
        weights = ((score(acts + eps * ones) - score(acts - eps * ones)) / (2 * eps * hw)).numpy()
    cam = np.maximum(np.tensordot(weights, grid_acts.numpy(), axes=1), 0)
    return _np_min_max(_upsample(cam, tuple(image.shape[-2:])))


@pytest.mark.parametrize(("kind", "layer"), [("vit", 0), ("vit", 1), ("rn", "layer4"), ("rn", "layer3")])
def test_gradcam_matches_finite_differences(tiny_backbone, tiny_rn, kind, layer):
    backbone = copy.deepcopy(tiny_backbone if kind == "vit" else tiny_rn).double()
    image, targets = _inputs(backbone, n=2, seed=3, dtype=torch.float64)
    ours = GradCAM(layer=layer)(backbone, image, targets).numpy()
    ref = np.stack([_fd_gradcam(backbone, image[i : i + 1], targets[i], layer) for i in range(2)])
    if kind == "vit" and layer == 1:  # last block of a [CLS]-pooled ViT: patch tokens never reach the embedding
        assert ours.max() == 0 and ref.max() == 0
    else:
        assert ref.max() == 1  # not all maps are empty (ReLU of a negative sum): the comparison means something
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_gradcam_default_layer(tiny_backbone, tiny_rn):
    image, targets = _inputs(tiny_backbone, n=2)
    torch.testing.assert_close(GradCAM()(tiny_backbone, image, targets), GradCAM(0)(tiny_backbone, image, targets))
    image, targets = _inputs(tiny_rn, n=2)
    torch.testing.assert_close(GradCAM()(tiny_rn, image, targets), GradCAM(-1)(tiny_rn, image, targets))


def test_gradcam_is_differentiable(backbone):
    image, targets = _inputs(backbone, n=4)
    e = targets.clone().requires_grad_(True)
    maps = GradCAM(normalize=False)(backbone, image, e)
    assert maps.requires_grad
    weight = torch.randn(maps.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((maps * weight).sum(), e)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        GradCAM()(backbone, image, targets)


def test_gradcam_drives_maskinversion(tiny_backbone):
    image, _ = _inputs(tiny_backbone, n=1, seed=5)
    masks = torch.zeros(2, 32, 32)
    masks[0, :16] = 1
    masks[1, :, 16:] = 1
    result = MaskInversion(GradCAM(normalize=False), iterations=10)(tiny_backbone, image, masks)
    assert result.strategy == "explainer"
    assert result.loss_history[-1] < result.loss_history[0] - 0.05
    assert result.maps.shape == (2, 32, 32)


def test_gradcam_drives_maskinversion_on_a_resnet(tiny_rn):
    image, _ = _inputs(tiny_rn, n=1, seed=6)
    masks = torch.zeros(1, 64, 64)
    masks[0, :32] = 1
    result = MaskInversion(GradCAM(normalize=False), iterations=3)(tiny_rn, image, masks)
    assert result.embeddings.shape == (1, 32) and torch.isfinite(result.loss_history).all()


@pytest.mark.parametrize("explainer", [ScoreCAM(), VLScore(), AttentionRollout()])
def test_maskinversion_refuses_gradient_free_explainers(tiny_backbone, explainer):
    assert explainer.differentiable is False
    with pytest.raises(ValueError, match="not differentiable"):
        MaskInversion(explainer=explainer)


# ---------------------------------------------------------------------------------------- Score-CAM / VL-Score
def _naive_score_cam(backbone, image, targets, layer, k, temperature, filter_baseline):
    """A per-item, per-channel loop with numpy weights."""
    maps, present = [], []
    size = tuple(image.shape[-2:])
    with torch.no_grad():
        for b in range(image.shape[0]):
            x, t = image[b : b + 1], F.normalize(targets[b], dim=-1)
            acts = _activations(backbone, x, layer)
            order = torch.argsort(acts.mean(dim=(1, 2)), descending=True)[:k]
            scores = []
            for c in order.tolist():
                mask = torch.as_tensor(_np_min_max(_upsample(acts[c], size)))
                scores.append(float(backbone.encode_image(x * mask, normalize=True)[0] @ t))
            scores = np.array(scores)
            keep = np.ones_like(scores, dtype=bool)
            if filter_baseline:
                keep = scores > float(backbone.encode_image(torch.zeros_like(x), normalize=True)[0] @ t)
            if not keep.any():
                maps.append(np.zeros(size, dtype=np.float32))
                present.append(False)
                continue
            logits = np.where(keep, scores / temperature, -np.inf)
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            cam = np.maximum(np.tensordot(weights, acts[order].numpy(), axes=1), 0)
            maps.append(_np_min_max(_upsample(cam, size)))
            present.append(True)
    return np.stack(maps), np.array(present)


@pytest.mark.parametrize("cls", [ScoreCAM, VLScore])
@pytest.mark.parametrize("k", [5, None])
def test_score_cam_matches_naive_loop(backbone, cls, k):
    layer = 0 if backbone.patch_size == 8 else "layer4"
    if k is None and isinstance(backbone, OpenCLIPResNetBackbone):
        k = 40  # 512 channels: a cap above the ViT's 48 keeps the test fast
    image, targets = _inputs(backbone, n=2, seed=7)
    explainer = cls(layer=layer, max_channels=k, temperature=0.05, batch_size=4)
    maps, present = explainer.explain_with_presence(backbone, image, targets)
    ref, ref_present = _naive_score_cam(backbone, image, targets, layer, k, 0.05, cls is VLScore)
    np.testing.assert_allclose(maps.numpy(), ref, atol=1e-4)  # float32; softmax at temperature 0.05
    np.testing.assert_array_equal(present.numpy(), ref_present)


def test_channel_batch_size_does_not_change_maps(backbone):
    image, targets = _inputs(backbone, n=2, seed=8)
    a = VLScore(max_channels=20, batch_size=1)(backbone, image, targets)
    b = VLScore(max_channels=20, batch_size=7)(backbone, image, targets)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_channel_cap_bounds_the_forwards(tiny_backbone, monkeypatch):
    image, targets = _inputs(tiny_backbone, n=2, seed=9)
    calls = []
    encode = tiny_backbone.encode_image

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "encode_image", counting)
    VLScore(max_channels=6, batch_size=4)(tiny_backbone, image, targets)
    assert sum(calls) == 2 * 6 + 2 and max(calls) == 4  # 6 channels per image, and one baseline image each
    calls.clear()
    ScoreCAM(max_channels=1000, batch_size=64)(tiny_backbone, image, targets)
    assert sum(calls) == 2 * 48  # the cap is clipped at the 48 channels; no baseline forward for Score-CAM
    calls.clear()
    VLScore(max_channels=6)(tiny_backbone, image[:1], targets)  # one image, two targets: embedded once
    assert sum(calls) == 6 + 1


def test_vlscore_not_present(backbone):
    image, _ = _inputs(backbone, n=2, seed=10)
    with torch.no_grad():
        baseline = backbone.encode_image(torch.zeros_like(image[:1]), normalize=True)
        itself = backbone.encode_image(image[1:], normalize=True)
    targets = torch.cat([baseline, itself])  # the empty image's own embedding: no masked image beats the baseline
    explainer = VLScore(max_channels=10)
    maps, present = explainer.explain_with_presence(backbone, image, targets)
    assert present.tolist() == [False, True]
    assert not hasattr(explainer, "last_present")  # presence is returned, never kept as state
    assert maps[0].abs().max() == 0 and maps[1].max() == 1
    torch.testing.assert_close(explainer(backbone, image, targets), maps)  # the plain call gives the same maps
    plain_maps, plain_present = ScoreCAM(max_channels=10).explain_with_presence(backbone, image, targets)
    assert plain_maps[0].max() == 1 and plain_present.all()


def test_explainers_without_a_presence_decision_say_present(tiny_backbone):
    image, targets = _inputs(tiny_backbone, n=2, seed=12)
    for explainer in (LeGrad(), GradCAM()):
        maps, present = explainer.explain_with_presence(tiny_backbone, image, targets)
        torch.testing.assert_close(maps, explainer(tiny_backbone, image, targets))
        assert present.dtype == torch.bool and present.tolist() == [True, True]
    with pytest.raises(ValueError, match="targets must have shape"):
        LeGrad().explain_with_presence(tiny_backbone, image, targets[:, :3])


def test_vlscore_blur_baseline(tiny_backbone):
    image, targets = _inputs(tiny_backbone, n=2, seed=11)
    maps, present = VLScore(baseline="blur", max_channels=8).explain_with_presence(tiny_backbone, image, targets)
    assert maps.shape == (2, 32, 32) and present.shape == (2,)
    assert torch.all(maps.amax(dim=(1, 2)) == present.float())


def test_prompt_targets_average_synonyms(tiny_backbone):
    targets = prompt_targets(tiny_backbone, ["cat", ["tv", "television"]], templates=("a {}.", "the {}"))
    assert targets.shape == (2, 32)
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(2))
    both = encode_prompts(tiny_backbone, ["tv", "television"], ("a {}.", "the {}"))
    torch.testing.assert_close(targets[1], F.normalize(both.mean(0), dim=-1))
    torch.testing.assert_close(targets[0], encode_prompts(tiny_backbone, ["cat"], ("a {}.", "the {}"))[0])
    with pytest.raises(ValueError, match="no classes"):
        prompt_targets(tiny_backbone, [])


# --------------------------------------------------------------------------------------------- attention rollout
def _reference_rollout(backbone, image, residual=0.5):
    """Attention probabilities recomputed from each block's weights; the rollout as a numpy matrix product."""
    x = backbone.embed_tokens(image)
    rollout = None
    for blk in backbone.blocks:
        attn = blk.attn
        t, c = x.shape[-2:]
        h = attn.num_heads
        q, k, _ = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (z.reshape(1, t, h, c // h).transpose(1, 2) for z in (q, k))
        probs = ((q * (c // h) ** -0.5) @ k.transpose(-1, -2)).softmax(-1)[0].mean(0).numpy()
        a = (1 - residual) * probs + residual * np.eye(t)
        a /= a.sum(-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout
        x = blk(x)
    grid = backbone.grid_size(tuple(image.shape[-2:]))
    rel = torch.as_tensor(rollout[0, 1:]).reshape(1, 1, *grid)
    return _np_min_max(F.interpolate(rel, scale_factor=backbone.patch_size, mode="bilinear")[0, 0].numpy())


def test_rollout_matches_reference_and_ignores_targets(tiny_ls_backbone):
    backbone = copy.deepcopy(tiny_ls_backbone).double()
    image, targets = _inputs(backbone, n=2, seed=12, dtype=torch.float64)
    maps = AttentionRollout()(backbone, image, targets)
    with torch.no_grad():
        for i in range(2):
            np.testing.assert_allclose(maps[i].numpy(), _reference_rollout(backbone, image[i : i + 1]), atol=1e-10)
    other = AttentionRollout()(backbone, image, -targets)
    torch.testing.assert_close(maps, other, rtol=0, atol=0)
    shared = AttentionRollout()(backbone, image[:1], targets)
    torch.testing.assert_close(shared, maps[:1].expand(2, -1, -1))


def test_rollout_needs_a_vit(tiny_rn):
    image, targets = _inputs(tiny_rn, n=1)
    with pytest.raises(UnsupportedModelError, match=r"rollout needs a token-grid .* is a feature-map .*GradCAM"):
        AttentionRollout()(tiny_rn, image, targets)
    with pytest.raises(UnsupportedModelError, match=r"LeGrad needs a token-grid .*re-tiny-rn.*GradCAM"):
        LeGrad()(tiny_rn, image, targets)
    with pytest.raises(UnsupportedModelError, match=r"MaskInversion with LeGrad maps needs .*GradCAM\(normalize=False"):
        MaskInversion().check(tiny_rn)
