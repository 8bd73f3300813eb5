"""open_clip towers built on timm (SigLIP/SigLIP2, EVA02, PE-Core): building, text side offline, recorder, LeGrad."""

from __future__ import annotations

import logging
import time

import pytest
import torch
import torch.nn.functional as F

from helpers.tokenizers import tiny_hf_tokenizer
from regionembed.backbones import (
    AttentionRecorder,
    OpenCLIPBackbone,
    OpenCLIPTimmBackbone,
    PretrainedWeightsUnavailable,
    UnsupportedModelError,
)
from regionembed.backbones.attention import attention_pool_forward
from regionembed.backbones.base import AttentionPoolHead, TokenGridBackbone, uses_attention_pool
from regionembed.backbones.open_clip import _adapter_class
from regionembed.explainers import AttentionRollout, GradAttention, GradCAM, LeGrad, ScoreCAM, VLScore
from regionembed.explainers.gradcam import layer_activations
from regionembed.inversion import MaskInversion

FAMILIES = ("siglip", "eva02", "pe")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A word-level Hugging Face tokenizer saved locally: SigLIP's hub tokenizer stand-in."""
    return str(tiny_hf_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def timm_towers(tiny_tokenizer):
    torch.manual_seed(5)
    return {
        "siglip": OpenCLIPBackbone("re-tiny-siglip", tokenizer=tiny_tokenizer).requires_grad_(False),
        "eva02": OpenCLIPBackbone("re-tiny-eva02").requires_grad_(False),
        "pe": OpenCLIPBackbone("re-tiny-pe").requires_grad_(False),
    }


@pytest.fixture(params=FAMILIES)
def tower(request, timm_towers):
    return timm_towers[request.param]


def _inputs(backbone, n=2, seed=0, size=None):
    g = torch.Generator().manual_seed(seed)
    s = size or backbone.preprocess.size
    image = torch.randn(n, 3, s, s, generator=g)
    targets = F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1)
    return image, targets


# ------------------------------------------------------------------------------------------------ building
@pytest.mark.parametrize("name", ["re-tiny-siglip", "re-tiny-eva02", "re-tiny-pe"])
def test_tiny_configs_build_fast_and_match_open_clip(name, tiny_tokenizer):
    start = time.perf_counter()
    b = OpenCLIPBackbone(name, tokenizer=tiny_tokenizer if "siglip" in name else None)
    assert time.perf_counter() - start < 1.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.encode_image(x), b.model.encode_image(x), rtol=0, atol=1e-6)
    assert b.encode_image(x).shape == (2, b.embed_dim)
    assert b.weights == "random"


def test_tokens_and_prefix(timm_towers):
    assert timm_towers["siglip"].num_prefix_tokens == 0  # no class token
    assert timm_towers["eva02"].num_prefix_tokens == 1
    assert timm_towers["pe"].num_prefix_tokens == 1
    assert uses_attention_pool(timm_towers["siglip"]) and uses_attention_pool(timm_towers["pe"])
    assert not uses_attention_pool(timm_towers["eva02"])
    with pytest.raises(UnsupportedModelError, match="mean-token"):
        timm_towers["eva02"].attention_pool_embed(torch.zeros(1, 17, 48))


def test_other_image_sizes_resample_positions_and_rotary_embeddings(timm_towers):
    for b in timm_towers.values():
        x = torch.randn(1, 3, 48, 40)
        tokens = b.embed_tokens(x)
        assert tokens.shape[1] == b.num_prefix_tokens + 6 * 5
        assert b.encode_image(x).shape == (1, b.embed_dim)
    for name in ("eva02", "pe"):
        rope = timm_towers[name].trunk.rope
        torch.testing.assert_close(timm_towers[name].rotary_embedding((4, 4)), rope.get_embed())
        # the rebuild used for other grids gives the cached embedding on the native grid
        torch.testing.assert_close(rope._build_embed_cat([4, 4], rope.bands), rope.get_embed())
        assert timm_towers[name].rotary_embedding((6, 5)).shape[0] == 30


def test_blocks_called_one_by_one_get_the_rotary_embedding(timm_towers):
    """Explainers run ``blk(x)``: EVA blocks then need the grid's rotary embedding, which the adapter supplies."""
    b = timm_towers["eva02"]
    x = torch.randn(1, 3, 32, 32)
    tokens = b.embed_tokens(x)
    one_by_one = tokens
    for blk in b.blocks:
        one_by_one = blk(one_by_one)
    rope = b.rotary_embedding((4, 4))
    explicit = tokens
    for blk in b.blocks:
        explicit = blk(explicit, rope=rope)
    without = tokens
    for blk in b.blocks:
        without = blk.forward.__func__(blk, without, rope=None)  # the plain forward, no rotary embedding
    torch.testing.assert_close(one_by_one, explicit, rtol=0, atol=0)
    assert not torch.allclose(one_by_one, without)


def test_bad_arguments_are_clear(tiny_tokenizer, tmp_path):
    with pytest.raises(UnsupportedModelError, match="OpenCLIPBackbone"):
        OpenCLIPTimmBackbone("re-tiny-vit")  # the adapter named explicitly refuses other towers
    with pytest.raises(UnsupportedModelError, match="alpha_channel=True"):
        OpenCLIPBackbone("re-tiny-eva02", alpha_checkpoint="x.pth")
    with pytest.raises(ValueError, match="built-in tokenizer"):
        OpenCLIPBackbone("re-tiny-eva02", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="not a folder"):
        OpenCLIPBackbone("re-tiny-siglip", tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        OpenCLIPBackbone("re-tiny-eva02", image_size=36)
    big = tiny_hf_tokenizer(tmp_path / "big", words=[f"w{i}" for i in range(1200)])
    with pytest.raises(ValueError, match="1000 token embeddings"):
        OpenCLIPBackbone("re-tiny-siglip", tokenizer=str(big))


# ------------------------------------------------------------------------------------------ text side offline
def test_siglip_text_side_from_a_local_tokenizer(timm_towers):
    b = timm_towers["siglip"]
    tokens = b.tokenize(["a photo of a cat", "zebra"])
    assert tokens.shape == (2, 16)
    assert tokens[0, :6].tolist() == [3, 6, 7, 3, 8, 1]  # words, then </s>, then padding
    assert tokens[1, :2].tolist() == [2, 1]  # unknown word
    emb = b.encode_text(tokens, normalize=True)
    assert emb.shape == (2, b.embed_dim) and torch.isfinite(emb).all()
    assert b.logit_bias is not None


def test_no_tokenizer_for_image_side_use():
    b = OpenCLIPBackbone("re-tiny-siglip", tokenizer=False)
    assert b.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 48)
    with pytest.raises(ValueError, match="tokenizer=False"):
        b.tokenize(["a cat"])
    assert b.overlong_texts(["a cat"]) == []


def test_missing_transformers_names_the_extra(monkeypatch, tiny_tokenizer):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"regionembed\[hf\]"):
        OpenCLIPBackbone("re-tiny-siglip", tokenizer=tiny_tokenizer)
    OpenCLIPBackbone("re-tiny-eva02")  # the CLIP tokenizer needs no transformers


def test_hub_tokenizer_offline_fails_fast_naming_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"tokenizer='/path/to/tokenizer_folder'") as err:
        OpenCLIPBackbone("re-tiny-siglip")
    assert time.perf_counter() - start < 10
    assert "save_pretrained" in str(err.value)
    assert err.value.reason == str(err.value)  # reported whole: the CLI's `pretrained` flag is not the way out here


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "EVA02-B-16", "PE-Core-B-16"])
def test_real_configs_build_with_random_weights(name, tiny_tokenizer):
    b = OpenCLIPBackbone(name, tokenizer=tiny_tokenizer if "SigLIP" in name else None, image_size=64)
    assert type(b) is OpenCLIPTimmBackbone
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert b.encode_image(x).shape == (1, b.embed_dim)
    maps = LeGrad()(b, x, F.normalize(torch.randn(1, b.embed_dim), dim=-1))
    assert maps.shape == (1, 64, 64) and torch.isfinite(maps).all()


@pytest.mark.slow
def test_real_pretrained_tag_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="pretrained="):
        OpenCLIPBackbone("EVA02-B-16", pretrained="merged2b_s8b_b131k")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        OpenCLIPBackbone("re-tiny-eva02", pretrained="laion2b")


# --------------------------------------------------------------------------------------- attention recorder
def _hooks(b):
    return [(dict(blk._forward_hooks), dict(blk._forward_pre_hooks)) for blk in b.blocks]


def test_recorder_outputs_identical_and_nothing_left_behind(tower):
    b = tower
    x, _ = _inputs(b)
    keys = list(b.state_dict().keys())
    params = dict(b.named_parameters())
    hooks = _hooks(b)
    with torch.no_grad():
        ref = b.encode_image(x)
    with AttentionRecorder(b.blocks, layers=[0, -1]) as rec:
        with torch.no_grad():
            out = b.encode_image(x)
        assert dict(b.named_parameters()) == params  # the same Parameter objects
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert list(b.state_dict().keys()) == keys
    assert _hooks(b) == hooks
    for blk in b.blocks:
        assert "forward" not in blk.attn.__dict__
    t = b.num_prefix_tokens + 16
    probs = rec[-1].probs
    assert probs.shape == (2, 3, t, t)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert rec[-1].v.shape == (2, 3, t, 16)


def test_recorder_probabilities_have_gradients(tower):
    x, _ = _inputs(tower, n=1)
    with AttentionRecorder(tower.blocks, layers=[-1]) as rec:
        emb = tower.encode_image(x)
    (g,) = torch.autograd.grad(emb.sum(), rec[-1].probs)
    assert g.abs().sum() > 0
    assert not any(p.requires_grad for p in tower.parameters())


def test_recorder_gradients_reach_the_same_parameters():
    torch.manual_seed(0)
    b = OpenCLIPBackbone("re-tiny-eva02")
    x = torch.randn(1, 3, 32, 32)
    attn = b.blocks[-1].attn
    b.encode_image(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in attn.named_parameters()}
    b.zero_grad()
    with AttentionRecorder(b.blocks, layers=[-1]):
        b.encode_image(x).sum().backward()
    for n, p in attn.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)


def test_unsupported_timm_version_is_loud(timm_towers, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "__version__", "9.0.0")
    with (
        pytest.raises(UnsupportedModelError, match=r"timm 9\.0\.0"),
        AttentionRecorder(timm_towers["eva02"].blocks, [-1]),
    ):
        pass
    with pytest.raises(UnsupportedModelError, match=r"timm 9\.0\.0"):
        attention_pool_forward(timm_towers["siglip"].trunk.attn_pool, torch.zeros(1, 16, 48))
    assert "forward" not in timm_towers["eva02"].blocks[-1].attn.__dict__


@pytest.mark.parametrize("fused", [True, False])
def test_attention_pool_forward_is_the_pool(timm_towers, fused, monkeypatch):
    for name in ("siglip", "pe"):
        pool = timm_towers[name].trunk.attn_pool
        monkeypatch.setattr(pool, "fused_attn", fused)
        x = torch.randn(2, 16 + timm_towers[name].num_prefix_tokens, 48)
        out, probs = attention_pool_forward(pool, x)
        torch.testing.assert_close(out, pool(x), rtol=0, atol=2e-6)
        assert probs.shape == (2, pool.num_heads, 1, x.shape[1])
        with torch.enable_grad():
            out, probs = attention_pool_forward(pool, x)
            (g,) = torch.autograd.grad(out.sum(), probs)  # a leaf although the pool is frozen
        assert g.abs().sum() > 0
        assert not pool._forward_hooks and "forward" not in pool.__dict__


def test_attention_pool_embed_is_the_model_route_and_legrad_skips_the_final_norm(timm_towers):
    for name in ("siglip", "pe"):
        b = timm_towers[name]
        tokens = b.forward_blocks(b.embed_tokens(torch.randn(2, 3, 32, 32)))
        trunk = b.trunk
        # the model's own embedding (final norm, pool, head)
        torch.testing.assert_close(b.attention_pool_embed(tokens)[0], b.pool_tokens(tokens), rtol=0, atol=2e-6)
        # LeGrad's score (official SigLIP recipe): the pool on the raw block output
        emb, _ = b.legrad_pool_embed(tokens)
        torch.testing.assert_close(emb, trunk.head(trunk.fc_norm(trunk.attn_pool(tokens))), rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------- LeGrad
def _official_style_legrad(b, image, targets, layers):
    """The official LeGrad SigLIP recipe, written out step by step (layer outputs from forward hooks, the pool's
    probabilities from a hand-written pool forward)."""
    outs = {}
    handles = [
        b.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in range(len(b.blocks))
    ]
    try:
        b.forward_blocks(b.embed_tokens(image))
    finally:
        for h in handles:
            h.remove()
    pool, trunk = b.trunk.attn_pool, b.trunk
    accum = 0
    for layer in layers:
        x = outs[layer % len(b.blocks)].detach()
        n = x.shape[1]
        q = pool.q(pool.latent.expand(x.shape[0], -1, -1)).reshape(x.shape[0], 1, pool.num_heads, -1).transpose(1, 2)
        k, v = pool.kv(x).reshape(x.shape[0], n, 2, pool.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(-1).detach().requires_grad_(True)
        y = pool.proj((attn @ v).transpose(1, 2).reshape(x.shape[0], 1, -1))
        y = (y + pool.mlp(pool.norm(y)))[:, 0]
        y = trunk.head(trunk.fc_norm(y))
        sim = (targets * F.normalize(y, dim=-1)).sum()
        (grad,) = torch.autograd.grad(sim, attn)
        accum = accum + grad.clamp(min=0).mean(dim=1)[:, 0, b.num_prefix_tokens :]
    h, w = b.grid_size(tuple(image.shape[-2:]))
    grid = accum.reshape(-1, 1, h, w)
    lo = grid.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = grid.flatten(1).max(1).values.view(-1, 1, 1, 1)
    grid = (grid - lo) / (hi - lo)
    return F.interpolate(grid, scale_factor=b.patch_size, mode="bilinear")[:, 0]


@pytest.mark.parametrize("name", ["siglip", "pe"])
@pytest.mark.parametrize("layers", [(-1,), (0, 1)])
def test_legrad_attention_pool_matches_the_official_recipe(timm_towers, name, layers):
    b = timm_towers[name]
    image, targets = _inputs(b, n=3)
    maps = LeGrad(layers=layers)(b, image, targets)
    ref = _official_style_legrad(b, image, targets, layers)
    torch.testing.assert_close(maps, ref, rtol=0, atol=1e-5)
    assert maps.shape == (3, 32, 32)


def test_legrad_attention_pool_is_differentiable_and_batched(timm_towers):
    b = timm_towers["siglip"]
    image, targets = _inputs(b, n=3)
    one_by_one = torch.cat([LeGrad()(b, image[i : i + 1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(LeGrad()(b, image, targets), one_by_one, rtol=0, atol=1e-6)
    t = targets.clone().requires_grad_(True)
    maps = LeGrad()(b, image, t)
    (g,) = torch.autograd.grad((maps * torch.rand_like(maps)).sum(), t)
    assert g.abs().sum() > 0


# ------------------------------------------------------------------------------- every explainer, every family
EXPLAINERS = {
    "gradcam": lambda: GradCAM(),
    "scorecam": lambda: ScoreCAM(),
    "vlscore": lambda: VLScore(),
    "rollout": lambda: AttentionRollout(),
    "legrad": lambda: LeGrad(),
    "legrad_all_layers": lambda: LeGrad(layers=(0, 1)),
    "legrad_model_pooling": lambda: LeGrad(pooling="model"),
    "grad_attention": lambda: GradAttention(),
}


@pytest.mark.parametrize("explainer", sorted(EXPLAINERS))
def test_every_explainer_on_every_family(tower, explainer):
    image, targets = _inputs(tower, n=2)
    maps = EXPLAINERS[explainer]()(tower, image, targets)
    assert maps.shape == (2, 32, 32)
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    if explainer != "vlscore":  # VL-Score may decide the target is absent (an all-zero map)
        assert (maps.flatten(1).max(1).values - maps.flatten(1).min(1).values > 0.5).all()


def test_rollout_on_attention_pool_uses_the_pool_row(timm_towers):
    b = timm_towers["siglip"]
    image, targets = _inputs(b, n=1)
    with AttentionRecorder(b.blocks, [0, 1], leaf_probs=False) as rec, torch.no_grad():
        tokens = b.forward_blocks(b.embed_tokens(image))
    eye = torch.eye(16)
    a = [0.5 * rec[i].probs.mean(1)[0] + 0.5 * eye for i in (0, 1)]
    a = [m / m.sum(-1, keepdim=True) for m in a]
    pool = b.attention_pool_embed(tokens)[1].mean(dim=(1, 2))[0]
    rel = pool @ (a[1] @ a[0])
    ref = F.interpolate(rel.view(1, 1, 4, 4), scale_factor=8, mode="bilinear")[0, 0]
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    torch.testing.assert_close(AttentionRollout()(b, image, targets)[0], ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- MaskInversion
def _mask(size=32):
    m = torch.zeros(2, size, size)
    m[0, 4:20, 4:16] = 1
    m[1, 16:30, 10:30] = 1
    return m


def test_mask_inversion_naive_on_every_family(tower):
    image, _ = _inputs(tower, n=1)
    result = MaskInversion(strategy="naive", iterations=3)(tower, image, _mask())
    assert result.strategy == "naive"
    assert result.embeddings.shape == (2, tower.embed_dim)
    assert torch.isfinite(result.loss_history).all()
    assert not any(p.requires_grad for p in tower.parameters())  # restored


def test_mask_inversion_auto_picks_and_says_so(tower, caplog):
    image, _ = _inputs(tower, n=1)
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        result = MaskInversion(iterations=1)(tower, image, _mask())
    expected = "attention_pool" if uses_attention_pool(tower) else "naive"
    assert MaskInversion().plan(tower, 32, 2) == expected
    assert result.strategy == expected
    assert f"strategy auto runs '{expected}'" in caplog.text


@pytest.mark.parametrize("name", ["siglip", "pe"])
@pytest.mark.parametrize("layers", [(-1,), (0, 1)])
def test_attention_pool_strategy_agrees_with_naive(timm_towers, name, layers):
    """The tabulated strategy and the official double backward give the same maps, losses and tokens."""
    b = timm_towers[name]
    image, _ = _inputs(b, n=1, seed=3)
    masks = _mask()
    results = {
        s: MaskInversion(LeGrad(layers=layers), strategy=s, iterations=4, lr=0.1)(b, image, masks)
        for s in ("naive", "attention_pool")
    }
    ref, fast = results["naive"], results["attention_pool"]
    assert fast.strategy == "attention_pool"
    torch.testing.assert_close(fast.loss_history, ref.loss_history, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.embeddings, ref.embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.maps, ref.maps, rtol=1e-4, atol=1e-4)


def test_attention_pool_strategy_refused_without_a_pool(timm_towers):
    # EVA02 has no decomposition either: the message names only what runs on it
    with pytest.raises(UnsupportedModelError, match=r"otherwise: use strategy 'auto' or 'naive'$"):
        MaskInversion(strategy="attention_pool", iterations=1)(timm_towers["eva02"], torch.randn(1, 3, 32, 32), _mask())


@pytest.mark.parametrize("strategy", ["per_step", "precomputed"])
def test_decomposed_strategies_refused_with_the_alternative(timm_towers, strategy):
    """Asked for explicitly, the decomposed strategies refuse: on a pool head (SigLIP, PE) LeGrad reads the pool's
    attention; EVA02's blocks (SwiGLU, inner attention norm) have no ``block_parts``."""
    image = torch.randn(1, 3, 32, 32)
    eva = timm_towers["eva02"]
    assert all(eva.block_parts(blk) is None for blk in eva.blocks)
    assert all(timm_towers["siglip"].block_parts(blk) is not None for blk in timm_towers["siglip"].blocks)
    for name, reason in (
        ("siglip", "attention_pool strategy"),
        ("pe", "attention_pool strategy"),
        ("eva02", "EvaBlock"),
    ):
        with pytest.raises(UnsupportedModelError, match=f"(?s){reason}.*strategy='naive'"):
            MaskInversion(strategy=strategy, iterations=1)(timm_towers[name], image, _mask())


def test_mask_inversion_with_gradcam_explainer(tower):
    image, _ = _inputs(tower, n=1)
    result = MaskInversion(explainer=GradCAM(normalize=False), iterations=2)(tower, image, _mask())
    assert result.strategy == "explainer" and torch.isfinite(result.embeddings).all()


# ---------------------------------------------------------------------------------------- alpha channel
def test_alpha_channel_on_every_family(tiny_tokenizer):
    from regionembed.backbones.alpha import alpha_from_masks

    for name in ("re-tiny-siglip", "re-tiny-eva02", "re-tiny-pe"):
        torch.manual_seed(0)
        b = OpenCLIPBackbone(name, alpha_channel=True, tokenizer=tiny_tokenizer if "siglip" in name else None)
        assert b.alpha_embed is not None
        assert b.alpha_embed.conv.weight.shape[-2:] == b.rgb_stem_conv.weight.shape[-2:]
        x = torch.randn(2, 3, 32, 32)
        alpha = alpha_from_masks(_mask())
        with torch.no_grad():
            torch.testing.assert_close(b.encode_image(x, alpha=alpha), b.encode_image(x), rtol=0, atol=0)
            b.alpha_embed.conv.weight.normal_()
            assert not torch.allclose(b.encode_image(x, alpha=alpha), b.encode_image(x))
        b.set_trainable(alpha=True)
        assert all(p.requires_grad for p in b.alpha_embed.parameters())
        assert not any(p.requires_grad for p in b.image_tower.parameters())


# ------------------------------------------------------------------------------------------ region methods
def _region_methods():
    from regionembed import regions

    return {
        "global": regions.GlobalEmbedding(),
        "crop": regions.CropEmbedding(),
        "masked_crop": regions.MaskedCropEmbedding(),
        "crop_square": regions.ContextCropEmbedding(),
        "mask_pool": regions.MaskPoolEmbedding(),
        "red_circle": regions.RedCircleEmbedding(),
        "mask_inversion": regions.MaskInversionEmbedding(MaskInversion(iterations=2)),
        "alpha_mask": regions.AlphaEmbedding("mask"),
    }


@pytest.mark.parametrize("method", sorted(_region_methods()))
def test_every_region_method_on_every_family(timm_towers, method, tiny_tokenizer):
    embedder = _region_methods()[method]
    for name, b in timm_towers.items():
        if method.startswith("alpha"):
            torch.manual_seed(0)
            tok = tiny_tokenizer if name == "siglip" else None
            b = OpenCLIPBackbone(b.model_name, alpha_channel=True, tokenizer=tok).requires_grad_(False)
        image = torch.randn(3, 32, 32)
        out = embedder(b, image, _mask())
        assert out.shape == (2, b.embed_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "EVA02-B-16", "PE-Core-B-16", "re-tiny-siglip", "re-tiny-eva02"]
)
def test_open_clip_backbone_dispatches_timm_towers(name):
    """``OpenCLIPBackbone(name)`` returns the timm adapter for every config with a timm tower (``__new__`` picks the
    class; the real configs are not built here, see the slow test below), and the ViT configs stay ViT adapters."""
    assert _adapter_class(name) is OpenCLIPTimmBackbone
    assert type(OpenCLIPBackbone.__new__(OpenCLIPBackbone, name)) is OpenCLIPTimmBackbone
    assert _adapter_class("ViT-B-16") is not OpenCLIPTimmBackbone


def test_dispatched_tiny_towers_have_the_capabilities(timm_towers):
    for name, b in timm_towers.items():
        assert type(b) is OpenCLIPTimmBackbone, name
        assert isinstance(b, OpenCLIPBackbone) and isinstance(b, TokenGridBackbone) and isinstance(b, AttentionPoolHead)


@pytest.mark.parametrize(
    "variant",
    [
        {"qkv_fused": True},
        {"qkv_fused": True, "qk_norm": True, "attn_type": "rope"},
        {"use_post_norm": True, "swiglu_mlp": True, "scale_mlp": True},
    ],
)
def test_recorder_on_other_eva_attention_variants(variant):
    """Fused q/k/v with EVA's separate biases (EVA01/EVA02 classification variants), AttentionRope with q/k norms and
    ``EvaBlockPostNorm`` (EVA02-E-14: norms after the attention and the MLP)."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    m = Eva(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=1,
        num_heads=3,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
        num_classes=0,
        **variant,
    ).eval()
    attn = m.blocks[0].attn
    with torch.no_grad():
        for name in ("q_bias", "v_bias"):
            if getattr(attn, name, None) is not None:
                getattr(attn, name).normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_features(x)
        with AttentionRecorder(m.blocks, [0]) as rec:
            out = m.forward_features(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert type(m.blocks[0]).__name__ == ("EvaBlockPostNorm" if variant.get("use_post_norm") else "EvaBlock")
    assert rec[0].probs.shape == (2, 3, 17, 17)
    assert "forward" not in attn.__dict__


def test_other_image_sizes_match_timms_dynamic_size_path(timm_towers):
    """At a non-native size the SigLIP tower equals timm's own dynamic-image-size forward (positions resampled)."""
    import copy

    from timm.layers.format import Format

    b = timm_towers["siglip"]
    trunk = copy.deepcopy(b.trunk)
    trunk.dynamic_img_size = True
    trunk.patch_embed.strict_img_size, trunk.patch_embed.flatten = False, False
    trunk.patch_embed.output_fmt = Format.NHWC
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(b.encode_image(x), trunk(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["siglip", "pe"])
def test_gradcam_twice_differentiable_path_scores_the_model_embedding(timm_towers, name):
    """Grad-CAM inside MaskInversion (create_graph) runs the pool explicitly: it must score the model's embedding."""
    b = timm_towers[name]
    image = torch.randn(2, 3, 32, 32)
    twice = layer_activations(b, image, None, twice_differentiable=True).embedding
    torch.testing.assert_close(twice, b.encode_image(image), rtol=0, atol=2e-5)
