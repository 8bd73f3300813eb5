"""Every open_clip config of the SigLIP/SigLIP2, EVA02 (and EVA01), PE-Core and CoCa families through the dispatch.

Issue 14: each config ``open_clip.list_models()`` lists under these families (chosen by the config's tower, see
``regionembed.bench.models``) either builds and explains, or is refused with an error naming the reason and the way
out. Big models cannot be built with real memory here, so they are built on the meta device: shapes, dispatch,
capabilities and autograd structure are real, values are not. What needs values is left to the tiny configs
(``test_open_clip_timm.py``, ``test_coca.py``). ``python -m regionembed.bench models`` prints the same rows.

The default suite builds one config per family (the largest or the odd one); the others are ``slow``.
"""

from __future__ import annotations

import logging
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from timm.models import eva, register_model
from timm.models import vision_transformer as timm_vit
from torch import nn

from helpers.eva import tiny_eva01
from helpers.tokenizers import tiny_hf_tokenizer
from regionembed.backbones import (
    AttentionRecorder,
    OpenCLIPTimmBackbone,
    PretrainedWeightsUnavailable,
    UnsupportedModelError,
)
from regionembed.backbones.open_clip import OpenCLIPAttentionPoolBackbone, OpenCLIPViTBackbone
from regionembed.backbones.timm import eva_block_parts
from regionembed.bench.models import FAMILIES, build_on_meta, family_models, support_row, tower_family
from regionembed.explainers import LeGrad
from regionembed.inversion import MaskInversion, estimate_costs

MODELS = family_models()

#: one per family in the default suite: the largest (nothing allocated), EVA02-E's post-norm blocks, EVA01's
#: decomposable blocks, CoCa without its attentional pooler
FAST = {"ViT-SO400M-14-SigLIP2", "EVA02-E-14", "EVA01-g-14", "PE-Core-bigG-14-448", "coca_ViT-L-14", "coca_base"}

#: configs refused as they are: (error type, what the message must name)
REFUSED = {
    # open_clip builds their Hugging Face text tower from the hub config, even with random weights
    "nllb-clip-base-siglip": (PretrainedWeightsUnavailable, "AutoConfig.from_pretrained"),
    "nllb-clip-large-siglip": (PretrainedWeightsUnavailable, "AutoConfig.from_pretrained"),
    "coca_roberta-ViT-B-32": (PretrainedWeightsUnavailable, "AutoConfig.from_pretrained"),
    # 384 px at patch 14: timm's conv drops 6 pixels; the way out is the same 27x27 grid at 378 px
    "ViT-SO400M-14-SigLIP-384": (UnsupportedModelError, "image_size=378"),
}


def _param(name: str):
    return pytest.param(name, id=name, marks=() if name in FAST else pytest.mark.slow)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A word-level Hugging Face tokenizer saved locally: the stand-in for SigLIP's hub tokenizers."""
    return str(tiny_hf_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture
def no_hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache (offline): nothing a developer's machine cached can be read."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------ which configs
def test_families_are_chosen_by_tower_and_cover_the_named_configs():
    """Selection reads the tower: it finds every config whose name says the family, and more (NLLB-CLIP's SigLIP
    tower); nothing else (ConvNeXt, MobileCLIP, ViTamin towers) is taken."""
    names = set(MODELS)
    named = {
        m
        for m in open_clip.list_models()
        if any(k in m for k in ("SigLIP", "EVA02", "EVA01", "PE-Core", "coca_")) and not m.startswith("re-")
    }
    assert named <= names
    assert {"nllb-clip-base-siglip", "nllb-clip-large-siglip"} <= names - named  # found by tower only
    assert all(tower_family(m) in FAMILIES for m in names)
    assert {tower_family(m) for m in names} == set(FAMILIES)
    assert tower_family("ViT-B-16") is None and tower_family("convnext_base") is None
    assert tower_family("MobileCLIP-B") is None and tower_family("ViTamin-S") is None
    assert names >= FAST | set(REFUSED)


# -------------------------------------------------------------------------------------- every config, on meta
def _expected_adapter(model_name: str, backbone) -> type:
    """The adapter the tower calls for, read from what open_clip built (not from the dispatch's own logic)."""
    visual = backbone.model.visual
    if isinstance(visual, TimmModel):
        return OpenCLIPTimmBackbone
    return OpenCLIPAttentionPoolBackbone if visual.attn_pool is not None else OpenCLIPViTBackbone


def _expected_geometry(backbone) -> tuple[int, int]:
    """(image size from open_clip's preprocessing config, patch size from the tower)."""
    size = open_clip.get_model_preprocess_cfg(backbone.model)["size"]
    size = size if isinstance(size, int) else size[0]
    visual = backbone.model.visual
    patch = visual.trunk.patch_embed.patch_size[0] if isinstance(visual, TimmModel) else visual.patch_size[0]
    return int(size), int(patch)


@pytest.mark.parametrize("name", [_param(m) for m in MODELS])
def test_config_builds_on_meta_and_explains(name, tiny_tokenizer, no_hf_cache, caplog):
    image_size = None
    if name in REFUSED:
        error, says = REFUSED[name]
        with pytest.raises(error, match=says.replace("(", r"\(").replace(".", r"\.")):
            build_on_meta(name, tokenizer=tiny_tokenizer)
        if error is not UnsupportedModelError:
            return
        image_size = 378  # the way out the error names
    before = _rss_bytes()
    with torch.device("meta"):
        from regionembed.backbones import OpenCLIPBackbone

        hf = bool(open_clip.get_model_config(name)["text_cfg"].get("hf_tokenizer_name"))
        b = OpenCLIPBackbone(name, image_size=image_size, tokenizer=tiny_tokenizer if hf else None)
    grown = _rss_bytes() - before
    b.requires_grad_(False)

    # nothing allocated: every parameter and buffer (persistent or not) is a meta tensor, and the process grew by
    # far less than the weights would take
    tensors = list(b.named_parameters()) + list(b.named_buffers())
    assert tensors and all(t.is_meta for _, t in tensors), [n for n, t in tensors if not t.is_meta][:3]
    real_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
    assert grown < max(64 * 2**20, real_bytes // 10), (grown, real_bytes)

    # dispatch and geometry
    assert type(b) is _expected_adapter(name, b)
    size, patch = _expected_geometry(b)
    size = image_size or size
    assert (b.preprocess.size, b.patch_size) == (size, patch)
    grid = (size // patch, size // patch)
    assert b.grid_size(size) == grid
    trunk = getattr(b.model.visual, "trunk", None)
    if trunk is not None:
        assert tuple(trunk.patch_embed.grid_size) == grid  # the native grid: positions are not resampled
    if hf:
        assert b.tokenize(["a photo of a cat"]).shape[0] == 1  # the injected tokenizer is the text side

    # capabilities, read from the tower, and what MaskInversion's auto runs (with the reason it logs)
    if isinstance(trunk, timm_vit.VisionTransformer):
        pool, fits = trunk.global_pool == "map", True
    elif isinstance(trunk, eva.Eva):  # EVA01's pre-norm GELU blocks fit; EVA02's SwiGLU, EVA02-E's post-norm do not
        pool = trunk.global_pool == "map"
        fits = not pool and tower_family(name) == "EVA01"
    else:
        pool, fits = b.model.visual.attn_pool is not None, True
    assert b.has_attention_pool if pool else not getattr(b, "has_attention_pool", False)
    if pool:
        assert b.legrad_recipe == ("coca" if tower_family(name) == "CoCa" else "siglip")
    assert all(b.block_parts(blk) is not None for blk in b.blocks) == fits
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        auto = MaskInversion().plan(b, size, 4)
    if pool:
        assert auto == "attention_pool" and "attention-pool head" in caplog.text
    elif not fits:
        assert auto == "naive" and "does not have the pre-norm form" in caplog.text
    else:
        assert auto in ("per_step", "precomputed") and "strategy auto runs" not in caplog.text
    row = support_row(name, b)  # what `python -m regionembed.bench models` prints for it
    if auto in ("naive", "attention_pool"):  # the reason the row gives is the one the solver logged
        assert f"strategy auto runs '{auto}' ({row.auto_reason})" in caplog.text
    assert (row.adapter, row.grid, row.attention_pool, row.block_parts_fit, row.auto) == (
        type(b).__name__,
        grid,
        pool,
        fits,
        auto,
    )

    # the attention recorder: same Parameter objects, state_dict keys unchanged, nothing left behind
    keys, params = list(b.state_dict()), dict(b.named_parameters())
    with AttentionRecorder(b.blocks, [0, -1]):
        assert list(b.state_dict()) == keys
        assert dict(b.named_parameters()) == params
    assert all("forward" not in blk.attn.__dict__ for blk in b.blocks)

    # forward and LeGrad (forward + autograd backward to the attention probabilities) on meta tensors. The public
    # encode_image / LeGrad() first check that the image is finite, which needs values: call what runs after it.
    x = torch.empty(2, 3, size, size, device="meta")
    targets = F.normalize(torch.empty(2, b.embed_dim, device="meta"), dim=-1)
    with torch.no_grad():
        emb = b.forward_image(x)
        assert emb.shape == (2, b.embed_dim)
        if image_size is None:  # open_clip's own forward takes the native size only (timm's strict_img_size)
            assert b.model.encode_image(x).shape == emb.shape
    maps = LeGrad().explain(b, x, targets)
    assert maps.is_meta and maps.shape == (2, size, size)
    with AttentionRecorder(b.blocks, [-1]) as rec:
        b.forward_blocks(b.embed_tokens(x))
    t = b.num_prefix_tokens + grid[0] * grid[1]
    probs = rec[-1].probs
    assert probs.shape[0] == 2 and probs.shape[2:] == (t, t)
    (grad,) = torch.autograd.grad(rec[-1].out.sum(), probs)
    assert grad.is_meta and grad.shape == probs.shape


def test_coca_l_fits_the_pool_table_under_the_default_budget(caplog):
    """coca_ViT-L-14 at 224 px, LeGrad on two layers: the ``attention_pool`` table holds the one pool query the CoCa
    recipe reads (D 768 x H 8 x 1 x T' 257 floats per layer: 6 MB, 12 MB for the two layers), not all 256 (3 GB,
    over the default 2048 MB, which made ``auto`` run ``naive`` and an explicit ``attention_pool`` raise)."""
    b = build_on_meta("coca_ViT-L-14")
    assert b.attention_pool_shape(224) == (8, 256, 257)
    solver = MaskInversion(LeGrad(layers=[-1, -2]))
    table = estimate_costs(b, 224, 1, solver.iterations, 2)["attention_pool"].memory
    assert table == 4 * 2 * 768 * 8 * 257  # float32, two layers
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        assert solver.plan(b, 224, 1) == "attention_pool"
        assert MaskInversion(LeGrad(layers=[-1, -2]), strategy="attention_pool").plan(b, 224, 1) == "attention_pool"
    assert "over memory_budget_mb" not in caplog.text


def test_support_row_gives_the_solvers_reason(caplog):
    """``auto_reason`` is the reason the solver logs, also when an attention-pool head falls back to ``naive`` for
    the memory budget (not the decomposition's issue, which is no reason there)."""
    b = build_on_meta("coca_ViT-L-14")
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        row = support_row("coca_ViT-L-14", b, solver=MaskInversion(memory_budget_mb=1))
    assert row.auto == "naive"
    assert row.auto_reason == "the attention_pool table, about 6.0 MB, is over memory_budget_mb=1"
    assert f"strategy auto runs 'naive' ({row.auto_reason})" in caplog.text
    row = support_row("coca_ViT-L-14", b)  # the default budget
    assert (row.auto, row.auto_reason) == ("attention_pool", "LeGrad through the attention-pool head")


# ----------------------------------------------------------------------------------------- the refusals
def test_hf_text_tower_offline_names_the_way_out(no_hf_cache):
    with pytest.raises(PretrainedWeightsUnavailable, match="roberta-base") as err:
        build_on_meta("coca_roberta-ViT-B-32")
    assert "HF_HOME" in str(err.value) and "even with random weights" in str(err.value)


def test_hf_text_tower_without_transformers_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"regionembed\[hf\]"):
        build_on_meta("coca_roberta-ViT-B-32", tokenizer=False)


def test_support_row_reports_a_refusal_instead_of_raising():
    row = support_row("ViT-SO400M-14-SigLIP-384")
    assert row.adapter is None and row.error.startswith("UnsupportedModelError") and "image_size=378" in row.error


def test_the_command_prints_the_rows(capsys):
    """``python -m regionembed.bench models --models ... --json``: one JSON record per config, the table, the summary
    with each refusal in full."""
    import json

    from regionembed.bench.models import main

    main(["--models", "coca_base", "ViT-SO400M-14-SigLIP-384", "--json"])
    out = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in out if line.startswith("{")]
    assert [r["model"] for r in records] == ["coca_base", "ViT-SO400M-14-SigLIP-384"]
    assert records[0]["adapter"] == "OpenCLIPViTBackbone" and records[0]["grid"] == [16, 16]
    assert records[0]["auto"] in ("per_step", "precomputed") and records[1]["error"]
    assert "| coca_base | CoCa | OpenCLIPViTBackbone | 288 / 18 / 16x16 | no | fits |" in "\n".join(out)
    assert any(line.startswith("- ViT-SO400M-14-SigLIP-384 refused: UnsupportedModelError") for line in out)


# ------------------------------------------------------------------ the odd towers, with values, at a tiny size
@register_model
def re_test_eva02_post_norm(pretrained: bool = False, **kwargs):
    """``eva02_enormous_patch14_clip_224`` (``EvaBlockPostNorm``) at 32 px, patch 8, width 48, depth 2."""
    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    return eva.eva02_enormous_patch14_clip_224(pretrained=False, **{**tiny, **kwargs})


def _tiny_variant(monkeypatch, kind: str) -> str:
    """A tiny open_clip config with the tower of EVA02-E-14 (post-norm Eva) or coca_base (CoCa, no pooler),
    registered for this test only."""
    from open_clip.factory import _MODEL_CONFIGS

    cfg = dict(open_clip.get_model_config("re-tiny-eva02" if kind == "eva02_e" else "re-tiny-coca"))
    if kind == "eva02_e":
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "timm_model_name": "re_test_eva02_post_norm"}
    else:
        cfg["vision_cfg"] = {k: v for k, v in cfg["vision_cfg"].items() if not k.startswith("att")}
    name = f"re-test-{kind}"
    monkeypatch.setitem(_MODEL_CONFIGS, name, cfg)
    return name


def _tiny_tower(monkeypatch, kind: str):
    if kind.startswith("eva01"):
        return tiny_eva01(layer_scale=kind == "eva01_ls")
    from regionembed.backbones import OpenCLIPBackbone

    name = _tiny_variant(monkeypatch, kind)
    torch.manual_seed(0)
    return OpenCLIPBackbone(name).requires_grad_(False)


@pytest.mark.parametrize("kind", ["eva02_e", "eva01", "eva01_ls", "coca_base"])
def test_odd_towers_match_open_clip_with_values(kind, monkeypatch):
    """What meta tensors cannot show: on real (random) weights the adapter's forward is open_clip's, and LeGrad's
    map is a proper map with a gradient (EVA02-E's post-norm blocks; EVA01's pre-norm blocks, with and without
    layer scale; CoCa without its attentional pooler)."""
    b = _tiny_tower(monkeypatch, kind)
    assert type(b) is (OpenCLIPViTBackbone if kind == "coca_base" else OpenCLIPTimmBackbone)
    if kind == "eva02_e":
        assert type(b.blocks[0]).__name__ == "EvaBlockPostNorm"
    if kind.startswith("eva01"):
        assert type(b.blocks[0]) is eva.EvaBlock and (b.blocks[0].gamma_1 is not None) == (kind == "eva01_ls")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(b.encode_image(x), b.model.encode_image(x, normalize=False), rtol=0, atol=1e-5)
        with AttentionRecorder(b.blocks, [0, -1]):
            torch.testing.assert_close(b.encode_image(x), b.model.encode_image(x, normalize=False), rtol=0, atol=1e-5)
    targets = F.normalize(torch.randn(2, b.embed_dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    maps = LeGrad(layers=(0, -1))(b, x, targets)
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()
    assert maps.amin() >= 0 and maps.amax() <= 1 and maps.flatten(1).std(dim=1).min() > 0
    auto = MaskInversion(iterations=2)(b, x[:1], (torch.rand(1, 32, 32) > 0.5).float())
    assert (
        auto.strategy in (("naive",) if kind == "eva02_e" else ("per_step", "precomputed"))
        and torch.isfinite(auto.embeddings).all()
    )


@pytest.mark.parametrize(("kind", "block"), [("re-tiny-eva02", "EvaBlock"), ("eva02_e", "EvaBlockPostNorm")])
def test_eva02_blocks_still_run_naive_with_the_reason(kind, block, monkeypatch, caplog):
    """EVA02's SwiGLU and inner attention norm (``re-tiny-eva02``) and EVA02-E's post-norm blocks have no
    ``block_parts``: ``auto`` runs ``naive`` and logs why, as before EVA01's blocks got theirs."""
    if kind == "re-tiny-eva02":
        from regionembed.backbones import OpenCLIPBackbone

        b = OpenCLIPBackbone(kind).requires_grad_(False)
    else:
        b = _tiny_tower(monkeypatch, kind)
    assert all(b.block_parts(blk) is None for blk in b.blocks)
    with caplog.at_level(logging.INFO, logger="regionembed.inversion.solver"):
        assert MaskInversion().plan(b, 32, 4) == "naive"
    reason = f"no decomposed strategy: block 1 ({block}) does not have the pre-norm form of the formulas"
    assert f"strategy auto runs 'naive' ({reason})" in caplog.text


def _eva_block(**kwargs) -> nn.Module:
    return eva.EvaBlock(48, 3, mlp_ratio=4.0, norm_layer=nn.LayerNorm, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "fits"),
    [
        ({}, True),  # EVA01-g-14: pre-norm, GELU Mlp, EvaAttention with q/v biases
        ({"init_values": 0.1}, True),  # EVA's layer scale: gamma_1, gamma_2
        ({"init_values": 0.1, "attn_only_layer_scale": True}, True),  # gamma_1 only
        ({"qk_norm": True}, True),  # q/k norms shape the probabilities only, not the block's tail
        ({"swiglu_mlp": True, "scale_mlp": True}, False),  # EVA02: SwiGLU with its inner norm
        ({"swiglu_mlp": True}, False),  # GluMlp
        ({"scale_mlp": True}, False),  # a norm inside the GELU Mlp
        ({"scale_attn_inner": True}, False),  # EVA02: attn.norm before proj
        ({"gated_attn": True}, False),  # attn.gate
        ({"attn_type": "rope"}, False),  # timm's AttentionRope (PE-Core)
    ],
)
def test_eva_block_parts_reads_the_block_form(kwargs, fits):
    """Which timm eva.py blocks get :class:`BlockParts`, read from the attributes that tell EVA01's blocks from
    EVA02's; the parts are the block's own modules and Parameters."""
    blk = _eva_block(**kwargs)
    parts = eva_block_parts(blk)
    assert (parts is not None) == fits
    if fits:
        assert (parts.num_heads, parts.head_dim) == (3, 16) and parts.out_proj_weight is blk.attn.proj.weight
        assert parts.norm2 is blk.norm2 and parts.act is blk.mlp.act
        assert parts.fc1 is blk.mlp.fc1 and parts.fc2 is blk.mlp.fc2
        assert parts.ls1 is blk.gamma_1 and parts.ls2 is blk.gamma_2
    post = eva.EvaBlockPostNorm(48, 3, mlp_ratio=4.0)  # EVA02-E: GELU Mlp, but normed after each branch
    assert eva_block_parts(post) is None
