"""``TokenGridBackbone.pool_tokens(..., explicit_attention=True)`` on every tiny token-grid family: the same embedding
as the model's own pooling, twice differentiable (what Grad-CAM, LeGrad ``pooling="model"`` and gradient attention
need under ``create_graph``), and what Grad-CAM driving MaskInversion runs through."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_masks
from regionembed.backbones import OpenCLIPBackbone, TimmBackbone, TokenGridBackbone, uses_attention_pool
from regionembed.explainers import GradCAM, LeGrad
from regionembed.explainers.grad_attention import grad_attention_maps
from regionembed.explainers.gradcam import layer_activations, resolve_layer
from regionembed.inversion import MaskInversion

#: every token-grid adapter on a tiny model: open_clip ViT ([CLS], layer scale), CoCa's attentional pooler, the
#: open_clip timm towers (SigLIP and PE: attention pool; EVA02: [CLS]), a timm ViT, Hugging Face CLIP and SigLIP
FAMILIES = (
    "re-tiny-vit",
    "re-tiny-vit-ls",
    "re-tiny-coca",
    "re-tiny-siglip",
    "re-tiny-eva02",
    "re-tiny-pe",
    "timm-test_vit",
    "hf-clip",
    "hf-siglip",
)


def _build(name: str, folder) -> TokenGridBackbone:
    if name.startswith("hf-"):
        pytest.importorskip("transformers")
        from helpers.hf_models import save_tiny
        from regionembed.backbones import HFBackbone

        family = name[3:]
        save_tiny(folder / family, family, seed=3)
        return HFBackbone(str(folder / family))
    if name.startswith("timm-"):
        return TimmBackbone(name[5:], image_size=32)
    return OpenCLIPBackbone(name, tokenizer=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, TokenGridBackbone] = {}

    def get(name: str) -> TokenGridBackbone:
        if name not in cache:
            torch.manual_seed(FAMILIES.index(name))
            cache[name] = _build(name, tmp_path_factory.mktemp("hf")).requires_grad_(False)
        return cache[name]

    return get


@pytest.fixture(params=FAMILIES)
def backbone(request, built) -> TokenGridBackbone:
    return built(request.param)


def _image(b: TokenGridBackbone, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, b.preprocess.size, b.preprocess.size, generator=g)


def test_the_families_cover_both_kinds_of_head(built):
    pools = {name for name in FAMILIES if uses_attention_pool(built(name))}
    assert pools == {"re-tiny-coca", "re-tiny-siglip", "re-tiny-pe", "hf-siglip"}


def test_explicit_attention_equals_the_models_pooling(backbone):
    image = _image(backbone)
    with torch.no_grad():
        first = backbone.forward_blocks(backbone.embed_tokens(image), stop=1)
        last = backbone.forward_blocks(backbone.embed_tokens(image))
        for tokens in (first, last):  # any block's output (per-layer scores), the last block's (the embedding)
            explicit = backbone.pool_tokens(tokens, explicit_attention=True)
            torch.testing.assert_close(explicit, backbone.pool_tokens(tokens), rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(explicit, backbone.encode_image(image), rtol=1e-5, atol=2e-6)


def test_explicit_attention_is_twice_differentiable(backbone):
    """Second derivatives of the pooled embedding with respect to the tokens, checked against finite differences in
    float64 (a fused attention kernel has none: ``derivative for ..._backward is not implemented``)."""
    b = copy.deepcopy(backbone).double()
    with torch.no_grad():
        tokens = b.forward_blocks(b.embed_tokens(_image(b, n=1).double()))
    tokens.requires_grad_(True)
    target = F.normalize(torch.randn(1, b.embed_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))

    def score(x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(b.pool_tokens(x, explicit_attention=True), dim=-1) * target).sum()

    assert torch.autograd.gradgradcheck(score, (tokens,), fast_mode=True)
    # and the second-order gradient Grad-CAM's MaskInversion step takes: d/d target of a map built from d score/d x
    target.requires_grad_(True)
    (g,) = torch.autograd.grad(score(tokens), tokens, create_graph=True)
    (second,) = torch.autograd.grad(g.clamp_min(0).sum(), target)
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_grad_cam_runs_the_route_it_ran_before(backbone):
    """Grad-CAM's twice-differentiable embedding (``pool_tokens(..., explicit_attention=True)``, no branch on the
    head) equals the route it replaced: ``attention_pool_embed`` on an attention-pool head, ``pool_tokens`` else."""
    image = _image(backbone)
    layer = resolve_layer(backbone, None)
    with torch.enable_grad():
        act = layer_activations(backbone, image, layer, twice_differentiable=True)
    with torch.no_grad():
        x = act.source.detach()
        for blk in list(backbone.blocks)[layer + 1 :]:
            x = blk(x)
        before = backbone.attention_pool_embed(x)[0] if uses_attention_pool(backbone) else backbone.pool_tokens(x)
    torch.testing.assert_close(act.embedding, before, rtol=1e-5, atol=2e-6)


def test_create_graph_explainers_differentiate_through_the_pool(backbone):
    """Grad-CAM driving MaskInversion, LeGrad through the model's pooling and gradient attention all take gradients
    of their maps through the pooling head (``create_graph``): every family, attention pools included."""
    image = _image(backbone, n=1)
    s = backbone.preprocess.size
    result = MaskInversion(explainer=GradCAM(normalize=False), iterations=2)(backbone, image, make_masks(2, s, s))
    assert result.strategy == "explainer" and torch.isfinite(result.embeddings).all()
    assert not torch.equal(result.embedding_history[0], result.embedding_history[-1])  # the tokens moved
    target = F.normalize(torch.randn(1, backbone.embed_dim), dim=-1).requires_grad_(True)
    maps = LeGrad(pooling="model")(backbone, image, target, create_graph=True)
    (grad,) = torch.autograd.grad(maps.sum(), target)
    assert torch.isfinite(grad).all()
    for pooling in ("legrad", "gradcam"):
        maps, _ = grad_attention_maps(
            backbone,
            image,
            lambda f: (F.normalize(f, dim=-1) * target).sum(-1),
            layer=0,
            pooling=pooling,
            create_graph=True,
        )
        (grad,) = torch.autograd.grad(maps.sum(), target)
        assert torch.isfinite(grad).all()
