"""LeGrad against an independent brute-force reference: central finite differences of the layer score with
respect to each attention probability, through a hand-written block forward in float64."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regionembed.backbones import OpenCLIPBackbone
from regionembed.explainers import LeGrad, min_max


def _block_score(block, visual, x_in, e, delta):
    """Layer score <e, normalize(proj(ln_post(mean_tokens(block(x_in)))))> with ``delta`` added to the attention
    probabilities; ``delta`` is ``[P, H, T, T]`` (P perturbations), returns ``[P]``."""
    attn = block.attn
    h = attn.num_heads
    t, c = x_in.shape[-2:]
    dh = c // h
    y = block.ln_1(x_in)
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(1, t, h, dh).transpose(1, 2) for z in (q, k, v))
    probs = ((q * dh**-0.5) @ k.transpose(-1, -2)).softmax(-1) + delta  # [P, H, T, T]
    o = (probs @ v).transpose(1, 2).reshape(-1, t, c)
    x = x_in + block.ls_1(attn.out_proj(o))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    f = F.normalize(visual.ln_post(x.mean(1)) @ visual.proj, dim=-1)
    return f @ e


def _reference_map(backbone, image, e, layers, eps=1e-6):
    visual = backbone.model.visual
    x = backbone.embed_tokens(image)
    total = 0
    grid = image.shape[-1] // backbone.patch_size
    for layer in sorted({i % len(backbone.blocks) for i in layers}):
        x_in = backbone.forward_blocks(x, stop=layer)
        block = backbone.blocks[layer]
        h, t = block.attn.num_heads, x_in.shape[1]
        n = h * t * t
        basis = torch.eye(n, dtype=torch.float64).view(n, h, t, t)
        grad = _block_score(block, visual, x_in, e, eps * basis) - _block_score(block, visual, x_in, e, -eps * basis)
        grad = (grad / (2 * eps)).view(h, t, t).numpy()
        rel = np.maximum(grad, 0).mean(axis=(0, 1))[1:].reshape(1, 1, grid, grid)
        up = F.interpolate(torch.from_numpy(rel), scale_factor=backbone.patch_size, mode="bilinear")[0, 0].numpy()
        total = total + up
    return (total - total.min()) / (total.max() - total.min())


@pytest.mark.parametrize(("name", "layers"), [("re-tiny-vit", [-1]), ("re-tiny-vit-ls", [0, 2])])
def test_legrad_matches_brute_force(name, layers):
    torch.manual_seed(3)
    backbone = copy.deepcopy(OpenCLIPBackbone(name)).double().requires_grad_(False)
    s = backbone.preprocess.size
    image = torch.randn(1, 3, s, s, dtype=torch.float64)
    e = F.normalize(torch.randn(backbone.embed_dim, dtype=torch.float64), dim=-1)
    ours = LeGrad(layers)(backbone, image, e[None])[0].detach().numpy()
    with torch.no_grad():
        ref = _reference_map(backbone, image, e, layers)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_batched_equals_one_by_one_and_broadcast(tiny_backbone):
    image = torch.randn(1, 3, 32, 32)
    targets = F.normalize(torch.randn(3, tiny_backbone.embed_dim), dim=-1)
    legrad = LeGrad([0, -1])
    batched = legrad(tiny_backbone, image, targets)
    assert batched.shape == (3, 32, 32)
    for i in range(3):
        torch.testing.assert_close(batched[i], legrad(tiny_backbone, image, targets[i : i + 1])[0], atol=1e-6, rtol=0)
    assert batched.min() >= 0 and batched.max() <= 1


def test_differentiable_with_respect_to_targets(tiny_backbone):
    image = torch.randn(2, 3, 32, 32)
    targets = torch.randn(2, tiny_backbone.embed_dim, requires_grad=True)
    maps = LeGrad()(tiny_backbone, image, F.normalize(targets, dim=-1))
    assert maps.requires_grad
    (maps * torch.rand_like(maps)).sum().backward()
    assert targets.grad.abs().sum() > 0
    assert LeGrad.differentiable


def test_bad_targets(tiny_backbone):
    image = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="targets must have shape"):
        LeGrad()(tiny_backbone, image, torch.randn(2, 7))
    with pytest.raises(ValueError, match="NaN"):
        LeGrad()(tiny_backbone, image, torch.full((1, tiny_backbone.embed_dim), float("nan")))
    with pytest.raises(ValueError, match="2 images but 3 targets"):
        LeGrad()(tiny_backbone, torch.randn(2, 3, 32, 32), torch.randn(3, tiny_backbone.embed_dim))
    with pytest.raises(ValueError, match="at least one layer"):
        LeGrad([])


def test_inference_mode_refused(tiny_backbone):
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode: false"):
        LeGrad()(tiny_backbone, torch.randn(1, 3, 32, 32), torch.randn(1, tiny_backbone.embed_dim))


def test_min_max_constant_map_is_not_nan():
    out = min_max(torch.full((2, 4, 4), 3.0))
    assert torch.isfinite(out).all() and (out == 0).all()
    x = torch.tensor([[[0.0, 2.0], [1.0, 4.0]]])
    torch.testing.assert_close(min_max(x), x / 4)


def test_timm_legrad_runs(timm_backbone):
    maps = LeGrad([-1])(timm_backbone, torch.randn(1, 3, 64, 64), torch.randn(2, timm_backbone.embed_dim))
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()


def test_model_pooling_route(tiny_backbone):
    """LeGrad(pooling="model") scores through the model's own pooling ([CLS] on re-tiny-vit), not the token mean."""
    from regionembed.explainers.legrad import legrad_layer_features
    from regionembed.inversion import MaskInversion
    from regionembed.regions import MaskInversionEmbedding

    torch.manual_seed(0)
    image = torch.randn(2, 3, 32, 32)
    target = torch.nn.functional.normalize(torch.randn(2, tiny_backbone.embed_dim), dim=-1)
    tokens = tiny_backbone.forward_blocks(tiny_backbone.embed_tokens(image))
    model_route = legrad_layer_features(tiny_backbone, tokens, "model")
    assert torch.allclose(model_route, tiny_backbone.encode_image(image, normalize=True), atol=1e-5)
    assert not torch.allclose(model_route, legrad_layer_features(tiny_backbone, tokens), atol=1e-3)
    maps = LeGrad(pooling="model").explain(tiny_backbone, image, target)
    assert maps.shape == (2, 32, 32) and not torch.allclose(maps, LeGrad().explain(tiny_backbone, image, target))
    solver = MaskInversion(LeGrad(pooling="model"), iterations=2)
    # the autograd path; only the official route has the fast ones
    assert solver.plan(tiny_backbone, 32, 2) == "explainer"
    masks = torch.zeros(2, 32, 32)
    masks[0, :16], masks[1, 16:] = 1, 1
    emb = MaskInversionEmbedding(solver, name="mi_model")
    assert emb.name == "mi_model" and emb(tiny_backbone, image[0], masks).shape == (2, tiny_backbone.embed_dim)
    with pytest.raises(ValueError, match="pooling"):
        LeGrad(pooling="cls")
