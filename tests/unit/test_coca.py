"""CoCa's attentional pooler (open_clip): the adapter, the recorder on the pool, LeGrad through the pool's attention,
the other explainers and MaskInversion on ``re-tiny-coca``."""

import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import make_masks
from regionembed.backbones import (
    AttentionPoolHead,
    AttentionRecorder,
    OpenCLIPAttentionPoolBackbone,
    OpenCLIPBackbone,
    OpenCLIPViTBackbone,
    TokenGridBackbone,
    UnsupportedModelError,
)
from regionembed.backbones.alpha import alpha_from_masks
from regionembed.explainers import AttentionRollout, GradCAM, LeGrad, ScoreCAM
from regionembed.explainers.gradcam import layer_activations
from regionembed.inversion import MaskInversion
from regionembed.inversion.strategies import STRATEGIES
from regionembed.regions import MaskPoolEmbedding


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    return OpenCLIPBackbone("re-tiny-coca").requires_grad_(False)


def _inputs(b, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = b.preprocess.size
    return torch.randn(n, 3, s, s, generator=g), F.normalize(torch.randn(n, b.embed_dim, generator=g), dim=-1)


def test_builds_the_attention_pool_adapter_and_encodes_like_open_clip(coca):
    assert type(coca) is OpenCLIPAttentionPoolBackbone
    assert isinstance(coca, TokenGridBackbone) and isinstance(coca, AttentionPoolHead)
    x, _ = _inputs(coca, n=3)
    with torch.no_grad():
        torch.testing.assert_close(coca.encode_image(x), coca.model.encode_image(x, normalize=False), rtol=0, atol=0)
        tokens = coca.tokenize(["a red circle", "a blue square"])
        torch.testing.assert_close(coca.encode_text(tokens), coca.model.encode_text(tokens, normalize=False))
        big = coca.encode_image(torch.randn(1, 3, 48, 64))  # another size: positional embedding resampled
    assert tokens.shape == (2, 16) and big.shape == (1, coca.embed_dim) and torch.isfinite(big).all()
    with pytest.raises(UnsupportedModelError, match="picks the adapter"):
        OpenCLIPViTBackbone("re-tiny-coca")  # the plain ViT adapter would ignore the pool's attention


def _reference_pool(b, tokens, ln_post=True):
    """CoCa's pool written out from its parameters (independent of open_clip's forward and of the recorder);
    ``ln_post=False``: the official LeGrad's CoCa embedding (``compute_legrad_coca`` skips the final norm)."""
    v = b.model.visual
    pool, mha = v.attn_pool, v.attn_pool.attn
    x = F.layer_norm(tokens, tokens.shape[-1:], pool.ln_k.weight, pool.ln_k.bias, pool.ln_k.eps)
    q = F.layer_norm(pool.query, pool.query.shape[-1:], pool.ln_q.weight, pool.ln_q.bias, pool.ln_q.eps)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    h, e = mha.num_heads, mha.embed_dim
    dh = e // h
    bsz, t = x.shape[:2]
    qh = (q @ mha.q_proj_weight.T + bq).view(1, -1, h, dh).transpose(1, 2)
    kh = (x @ mha.k_proj_weight.T + bk).view(bsz, t, h, dh).transpose(1, 2)
    vh = (x @ mha.v_proj_weight.T + bv).view(bsz, t, h, dh).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) / dh**0.5).softmax(-1)  # [B, H, Q, T]
    if not probs.requires_grad:
        probs.requires_grad_(True)
    out = (probs @ vh).transpose(1, 2).reshape(bsz, -1, e) @ mha.out_proj.weight.T + mha.out_proj.bias
    if ln_post:
        out = F.layer_norm(out, out.shape[-1:], v.ln_post.weight, v.ln_post.bias, v.ln_post.eps)
    return out[:, 0] @ v.proj, probs


def test_attention_pool_embed_and_the_recorder_guarantees(coca):
    x, _ = _inputs(coca)
    pool = coca.model.visual.attn_pool
    keys, params = list(coca.state_dict()), dict(coca.named_parameters())
    with torch.no_grad():
        tokens = coca.forward_blocks(coca.embed_tokens(x))
        plain = coca.pool_tokens(tokens)
    embedding, probs = coca.attention_pool_embed(tokens)
    ref_embedding, ref_probs = _reference_pool(coca, tokens)
    t = 1 + (coca.preprocess.size // coca.patch_size) ** 2
    assert probs.shape == (2, pool.attn.num_heads, pool.query.shape[0], t)
    torch.testing.assert_close(embedding, plain, rtol=0, atol=2e-6)  # identical up to the fused kernel's rounding
    torch.testing.assert_close(embedding, ref_embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    legrad_embedding, legrad_probs = coca.legrad_pool_embed(tokens)  # LeGrad's CoCa score: no ln_post
    torch.testing.assert_close(legrad_embedding, _reference_pool(coca, tokens, ln_post=False)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(legrad_probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(legrad_embedding, embedding, atol=1e-3)
    (grad,) = torch.autograd.grad(embedding.sum(), probs)  # a leaf on the graph although the model is frozen
    assert grad.abs().sum() > 0
    # nothing left behind: same Parameters, same keys, no patched forward, no hooks
    assert dict(coca.named_parameters()) == params and list(coca.state_dict()) == keys
    assert "forward" not in pool.attn.__dict__ and not pool._forward_hooks and not pool._forward_pre_hooks


def test_recorder_on_the_pool_is_loud_on_an_unknown_open_clip(coca, monkeypatch):
    monkeypatch.setattr(open_clip, "__version__", "2.23.0")
    tokens = torch.randn(1, 17, 48)
    with pytest.raises(UnsupportedModelError, match=r"open_clip 2\.23\.0 is not supported"):
        coca.attention_pool_embed(tokens)
    assert "forward" not in coca.model.visual.attn_pool.attn.__dict__


def _reference_legrad(b, image, targets, layers):
    """The official CoCa LeGrad recipe (``legrad.LeWrapper.compute_legrad_coca``), written out with the reference pool
    above: the raw score ``<e, pool(tokens_l)[:, 0] @ proj>`` (no ln_post, no normalisation), the first query's
    row of the pool's attention gradient, each layer's map upsampled, the sum min-max normalised."""
    grid = b.grid_size(tuple(image.shape[-2:]))
    total = 0.0
    with AttentionRecorder(b.blocks, layers) as rec:  # only for the block outputs
        b.forward_blocks(b.embed_tokens(image))
    for layer in b.layer_indices(layers):
        embedding, probs = _reference_pool(b, rec.records[layer].out, ln_post=False)
        (grad,) = torch.autograd.grad((targets * embedding).sum(), probs)
        relevance = grad.clamp_min(0).mean(dim=1)[:, 0, 1:].reshape(-1, 1, *grid)  # query 0, [CLS] column dropped
        total = total + F.interpolate(relevance, scale_factor=b.patch_size, mode="bilinear")[:, 0]
    flat = total.flatten(1)  # upsampled first, then min-max (the official CoCa order)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo)).view_as(total)


@pytest.mark.parametrize("layers", [(-1,), (0, 1)])
def test_legrad_follows_the_attention_pool_recipe(coca, layers):
    image, targets = _inputs(coca, seed=1)
    maps = LeGrad(layers=layers)(coca, image, targets)
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
    torch.testing.assert_close(maps, _reference_legrad(coca, image, targets, layers), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(maps, LeGrad(layers=layers)(coca, image, -targets))  # target-conditioned


@pytest.mark.parametrize("explainer", [GradCAM(), ScoreCAM(), AttentionRollout()], ids=repr)
def test_other_explainers_and_region_methods(coca, explainer):
    image, targets = _inputs(coca)
    maps = explainer(coca, image, targets)
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.max() == 1
    region = MaskPoolEmbedding()(coca, image[0], make_masks(2, 32, 32))
    assert region.shape == (2, coca.embed_dim) and torch.isfinite(region).all()


def test_rollout_on_coca_ends_with_the_pool_row(coca):
    """The embedding reads the pool's output, not the [CLS] token: rollout's last step is the pool's attention over
    the last block's tokens (mean over heads and queries), the patch columns of that row are the map."""
    image, _ = _inputs(coca, n=1)
    n = len(coca.blocks)
    with torch.no_grad(), AttentionRecorder(coca.blocks, range(n), leaf_probs=False) as rec:
        tokens = coca.forward_blocks(coca.embed_tokens(image))
    _, probs = _reference_pool(coca, tokens)
    roll = None
    for layer in range(n):
        a = 0.5 * rec[layer].probs.mean(1) + 0.5 * torch.eye(tokens.shape[1])
        a = a / a.sum(-1, keepdim=True)
        roll = a if roll is None else a @ roll
    grid = coca.grid_size(image.shape[-1])
    row = (probs.mean(dim=(1, 2)).unsqueeze(1) @ roll)[:, 0, 1:].view(1, 1, *grid)  # [CLS] column dropped
    row = F.interpolate(row, scale_factor=coca.patch_size, mode="bilinear")[:, 0]
    expected = (row - row.min()) / (row.max() - row.min())
    torch.testing.assert_close(AttentionRollout()(coca, image, torch.randn(1, coca.embed_dim)), expected)


def test_mask_inversion_on_coca(coca, caplog):
    image, _ = _inputs(coca, n=1)
    masks = torch.zeros(2, 32, 32)
    masks[0, :16], masks[1, :, 16:] = 1, 1
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        # two layers: the sum over layers and the strategy's per-layer tables are exercised
        result = MaskInversion(explainer=LeGrad(layers=(0, 1)), iterations=8)(coca, image, masks)
    assert result.strategy == "attention_pool" and "attention-pool head" in caplog.text
    assert result.loss_history[-1] < result.loss_history[0] - 0.1
    assert result.embeddings.shape == (2, coca.embed_dim) and torch.isfinite(result.embeddings).all()
    with pytest.raises(UnsupportedModelError, match=r"per_step strategy cannot run.*attention-pool"):
        MaskInversion(strategy="per_step")(coca, image, masks)
    driven = MaskInversion(explainer=GradCAM(normalize=False), iterations=4)(coca, image, masks)  # double backward
    assert driven.loss_history[-1] < driven.loss_history[0]
    # the tabulated pool strategy computes the official double backward's maps and token gradients (compared at
    # random tokens: a whole run at lr 0.5 amplifies float rounding, the gradients here are ~400 in size)
    e = F.normalize(torch.randn(2, coca.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    weights = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(2))
    out = {}
    for name in ("naive", "attention_pool"):
        strategy = STRATEGIES[name](coca, image, [0, 1], 2, 1e-12)
        tokens = e.clone().requires_grad_(True)
        maps = strategy.maps(tokens)
        out[name] = (maps.detach(), *torch.autograd.grad((maps * weights).sum(), tokens))
        strategy.close()
    torch.testing.assert_close(out["attention_pool"][0], out["naive"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["attention_pool"][1], out["naive"][1], rtol=1e-4, atol=1e-3)
    # and whole runs agree, the last block included: the official CoCa score is the raw <e, pool @ proj> (a cosine
    # would have no gradient at the start, where the target is the image embedding itself, and leave rounding noise)
    runs = {
        name: MaskInversion(LeGrad(layers=(-1,)), strategy=name, iterations=6)(coca, image, masks)
        for name in ("naive", "attention_pool")
    }
    torch.testing.assert_close(runs["attention_pool"].loss_history, runs["naive"].loss_history, rtol=0, atol=1e-5)
    torch.testing.assert_close(runs["attention_pool"].embeddings, runs["naive"].embeddings, rtol=0, atol=1e-4)


def test_alpha_channel_on_coca():
    torch.manual_seed(2)
    b = OpenCLIPBackbone("re-tiny-coca", alpha_channel=True).requires_grad_(False)
    image, _ = _inputs(b)
    alpha = alpha_from_masks(make_masks(2, 32, 32))
    with torch.no_grad():
        plain = b.encode_image(image)
        torch.testing.assert_close(b.encode_image(image, alpha=alpha), plain, rtol=0, atol=0)
        torch.nn.init.normal_(b.alpha_embed.conv.weight)
        assert not torch.allclose(b.encode_image(image, alpha=alpha), plain)


@pytest.mark.slow
def test_coca_vit_b_32_builds_and_explains():
    b = OpenCLIPBackbone("coca_ViT-B-32", pretrained=None).requires_grad_(False)
    assert type(b) is OpenCLIPAttentionPoolBackbone and b.embed_dim == 512
    image, targets = _inputs(b, n=1)
    maps = LeGrad()(b, image, targets)
    assert maps.shape == (1, 224, 224) and torch.isfinite(maps).all()


def test_gradcam_twice_differentiable_path_scores_the_model_embedding(coca):
    """Grad-CAM inside MaskInversion (create_graph) runs the pool explicitly: it must score the model's embedding."""
    image = torch.randn(2, 3, 32, 32)
    twice = layer_activations(coca, image, None, twice_differentiable=True).embedding
    torch.testing.assert_close(twice, coca.encode_image(image), rtol=0, atol=2e-5)
