"""HFBackbone: transformers CLIPModel / SiglipModel folders built offline (tiny random models and tokenizers)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import make_masks
from helpers.hf_models import CONTEXT, EOS, PATCH, SIZE, save_tiny
from regionembed.backbones import (
    AttentionRecorder,
    HFBackbone,
    MHAPoolRecorder,
    TokenGridBackbone,
    UnsupportedModelError,
    require,
    uses_attention_pool,
)
from regionembed.backbones import hf as hf_module
from regionembed.backbones.weights import PretrainedWeightsUnavailable
from regionembed.explainers import AttentionRollout, GradAttention, GradCAM, LeGrad, ScoreCAM, VLScore
from regionembed.explainers.gradcam import layer_activations
from regionembed.inversion import MaskInversion
from regionembed.inversion.strategies import decomposition_issue

FAMILIES = ["clip", "siglip"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    refs = {}
    for family in FAMILIES:
        refs[family] = save_tiny(root / family, family, seed=len(refs))
    return root, refs


@pytest.fixture(scope="module")
def backbones(folders):
    root, _ = folders
    return {family: HFBackbone(str(root / family)).requires_grad_(False) for family in FAMILIES}


def _text_targets(backbone, texts=("a red square", "the blue circle")):
    with torch.no_grad():
        return F.normalize(backbone.encode_text(backbone.tokenize(list(texts))), dim=-1)


# ------------------------------------------------------------------------------------------ loading and encoders
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", [None, "eager"])
def test_embeddings_equal_the_models_own(folders, family, attn):
    root, refs = folders
    b = HFBackbone(str(root / family), attn_implementation=attn)
    ref = refs[family]
    torch.manual_seed(0)
    with torch.no_grad():
        x = torch.randn(2, 3, SIZE, SIZE)
        torch.testing.assert_close(
            b.encode_image(x), ref.get_image_features(pixel_values=x).pooler_output, atol=2e-6, rtol=0
        )
        big = torch.randn(1, 3, 48, 48)  # another size: transformers' own position-embedding interpolation
        theirs = ref.get_image_features(pixel_values=big, interpolate_pos_encoding=True).pooler_output
        torch.testing.assert_close(b.encode_image(big), theirs, atol=2e-6, rtol=0)
        tokens = b.tokenize(["a photo of the cat", "red square"])
        torch.testing.assert_close(b.encode_text(tokens), ref.get_text_features(input_ids=tokens).pooler_output)
        assert b.encode_image(x, normalize=True).norm(dim=-1).sub(1).abs().max() < 1e-5
    assert b.embed_dim == b.encode_image(x).shape[-1]
    assert b.weights == str(root / family)
    assert [k.removeprefix("model.") for k in b.state_dict()] == list(ref.state_dict())  # no keys of its own


def test_preprocess_and_tokenizer_come_from_the_folder(backbones):
    clip, siglip = backbones["clip"], backbones["siglip"]
    assert clip.preprocess.size == SIZE and clip.preprocess.interpolation == "bicubic"
    assert clip.preprocess.resize_mode == "shortest"  # CLIP: shortest edge, then a centre crop
    assert clip.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert siglip.preprocess.interpolation == "bilinear" and siglip.preprocess.resize_mode == "squash"
    assert siglip.preprocess.mean == siglip.preprocess.std == (0.5, 0.5, 0.5)
    tokens = siglip.tokenize("a photo of the cat")
    assert tokens.shape == (1, CONTEXT) and tokens.dtype == torch.int64  # padded to max_length, as trained
    assert tokens[0, :7].tolist() == [2, 4, 5, 6, 7, 8, EOS] and (tokens[0, 7:] == 0).all()
    long = " ".join(["cat"] * 20)
    assert siglip.overlong_texts(["a cat", long]) == [(long, 22, CONTEXT)]
    assert siglip.tokenize(long)[0, -1] == EOS  # truncation keeps the end token
    assert clip.logit_bias is None and siglip.logit_bias is not None
    assert clip.num_prefix_tokens == 1 and siglip.num_prefix_tokens == 0


def test_image_size_argument(folders):
    root, _ = folders
    b = HFBackbone(str(root / "clip"), image_size=48)
    assert b.preprocess.size == 48 and b.grid_size(48) == (6, 6)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        HFBackbone(str(root / "clip"), image_size=50)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_folders_give_clear_errors(folders, tmp_path):
    root, refs = folders
    with pytest.raises(PretrainedWeightsUnavailable, match="folder not found"):
        HFBackbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"no config\.json"):
        HFBackbone(str(tmp_path / "empty"))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="'bert' model; HFBackbone supports CLIPModel"):
        HFBackbone(str(other))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((root / "clip" / "config.json").read_text())
    torch.save(refs["clip"].state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(PretrainedWeightsUnavailable, match=r"only model\.safetensors is loaded"):
        HFBackbone(str(pickled))
    no_processor = tmp_path / "no_processor"
    refs["clip"].save_pretrained(no_processor)
    with pytest.raises(PretrainedWeightsUnavailable, match="image processor and tokenizer of"):
        HFBackbone(str(no_processor))


def test_siglip2_is_refused_with_the_reason(tmp_path):
    from transformers import Siglip2Config

    Siglip2Config().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="SigLIP2's NaFlex"):
        HFBackbone(str(tmp_path))


def test_hub_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable, match=r"HFBackbone\('/path/to/folder'\)") as info:
        HFBackbone("openai/clip-vit-base-patch16")
    assert time.perf_counter() - start < 10
    assert "save_pretrained" in str(info.value) and "not reachable" in info.value.reason


def test_hub_name_fails_at_once_when_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_module, "hub_offline", lambda: True)
    monkeypatch.setattr(hf_module, "_from_pretrained", lambda *a, **k: pytest.fail("must not try the hub"))
    with pytest.raises(PretrainedWeightsUnavailable, match="not reachable"):
        HFBackbone("google/siglip-base-patch16-224")


def test_missing_transformers_names_the_extra(folders, monkeypatch):
    root, _ = folders
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'regionembed\[hf\]'"):
        HFBackbone(str(root / "clip"))


def test_regionembed_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import regionembed.backbones, regionembed.explainers, regionembed.inversion\n"
        "from regionembed.backbones import HFBackbone, OpenCLIPBackbone, AttentionRecorder\n"
        "import torch\n"
        "b = OpenCLIPBackbone('re-tiny-vit')\n"
        "with AttentionRecorder(b.blocks, [-1]):\n"
        "    b.encode_image(torch.zeros(1, 3, 32, 32))\n"
        "print('ok')\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------- attention recorder
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recorder_guarantees(folders, family, attn):
    root, _ = folders
    b = HFBackbone(str(root / family), attn_implementation=attn).requires_grad_(False)
    x = torch.randn(2, 3, SIZE, SIZE)
    keys = list(b.state_dict())
    params = dict(b.named_parameters())
    with torch.no_grad():
        ref = b.encode_image(x)
    with AttentionRecorder(b.blocks, layers=[0, -1]) as rec:
        with torch.no_grad():
            out = b.encode_image(x)
        assert {k: p for k, p in b.named_parameters()} == params  # the same Parameter objects
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert list(b.state_dict()) == keys
    for blk in b.blocks:
        assert "forward" not in blk.attn.__dict__
        assert not blk._forward_hooks and not blk._forward_pre_hooks
    t = b.num_prefix_tokens + (SIZE // PATCH) ** 2
    probs = rec[-1].probs
    assert probs.shape == (2, 2, t, t)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    # gradients reach the probabilities of a frozen model
    with AttentionRecorder(b.blocks, layers=[-1]) as rec:
        emb = b.encode_image(x[:1])
    (g,) = torch.autograd.grad(emb.sum(), rec[-1].probs)
    assert g.abs().sum() > 0


def test_pool_recorder_guarantees(backbones):
    b = backbones["siglip"]
    head = b.model.vision_model.head
    tokens = b.forward_blocks(b.embed_tokens(torch.randn(2, 3, SIZE, SIZE))).detach()
    with torch.no_grad():
        ref = b.pool_tokens(tokens)
        # LeGrad's score (official SigLIP recipe): the head on the raw block output, without the final norm
        torch.testing.assert_close(head(tokens), b.legrad_pool_embed(tokens)[0], rtol=0, atol=2e-6)
    # the model's own route (post_layernorm, then the head): the model's embedding
    emb, probs = b.attention_pool_embed(tokens)
    torch.testing.assert_close(emb, ref, rtol=0, atol=2e-6)
    assert probs.shape == (2, 2, 1, (SIZE // PATCH) ** 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 1))
    (g,) = torch.autograd.grad(emb.sum(), probs)  # a leaf: the model is frozen and the tokens are plain
    assert g.abs().sum() > 0
    assert "forward" not in head.attention.__dict__
    with MHAPoolRecorder(head.attention), pytest.raises(RuntimeError, match="already instrumented"):
        MHAPoolRecorder(head.attention).__enter__()
    assert "forward" not in head.attention.__dict__
    with pytest.raises(UnsupportedModelError, match="no attention-pool head"):
        backbones["clip"].attention_pool_embed(tokens)


def test_backbone_seam_capabilities(backbones):
    """Both families are token grids; only SigLIP pools with its attention head (LeGrad's pool recipe, no
    decomposition); CLIP's blocks have the decomposition's pre-norm form."""
    clip, siglip = backbones["clip"], backbones["siglip"]
    for b in (clip, siglip):
        assert require(b, TokenGridBackbone, "LeGrad") is b
        assert b.rgb_stem_conv is b.model.vision_model.embeddings.patch_embedding
    assert uses_attention_pool(siglip) and not uses_attention_pool(clip)
    assert all(siglip.block_parts(blk) is None for blk in siglip.blocks)
    assert decomposition_issue(siglip, [-1]) is not None and decomposition_issue(clip, [0, -1]) is None
    assert clip.block_parts(siglip.blocks[0].layer) is None  # not an encoder-layer wrapper: no decomposition


def test_unsupported_transformers_version_is_loud(folders, backbones, monkeypatch):
    import transformers

    root, _ = folders
    b = backbones["clip"]
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(UnsupportedModelError, match=r"transformers 4\.57\.1 is not supported"):
        AttentionRecorder(b.blocks, layers=[-1]).__enter__()
    for blk in b.blocks:  # a failed attach leaves nothing behind
        assert "forward" not in blk.attn.__dict__ and not blk._forward_hooks
    with pytest.raises(UnsupportedModelError, match=r"transformers 4\.57\.1"):
        HFBackbone(str(root / "clip"))


# ------------------------------------------------------------------------------------------------ explainers
EXPLAINERS = [
    LeGrad(),
    LeGrad(layers=(0, 1, 2)),
    GradCAM(),
    ScoreCAM(max_channels=8),
    VLScore(max_channels=8),
    AttentionRollout(),
    GradAttention(),
    GradAttention(layer=-2, pooling="gradcam"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("explainer", EXPLAINERS, ids=lambda e: type(e).__name__)
def test_every_explainer_runs(backbones, family, explainer):
    b = backbones[family]
    torch.manual_seed(0)
    image = torch.randn(1, 3, 48, 48)
    targets = _text_targets(b)
    maps = explainer(b, image, targets)
    assert maps.shape == (2, 48, 48) and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    if not isinstance(explainer, VLScore):  # VL-Score may decide "not present" (an all-zero map)
        # 1 exactly, except LeGrad on SigLIP: min-max on the token grid before upsampling, as the official code
        assert (maps.flatten(1).amax(1) > 0.8).all()
    if isinstance(explainer, LeGrad | GradCAM | GradAttention):  # target-conditioned: different texts, different maps
        assert not torch.allclose(maps[0], maps[1])


def test_legrad_on_siglip_is_the_attention_pool_recipe(folders, backbones):
    """An independent implementation on transformers' own hidden states: per layer, the pool head written out by hand
    (probe attention, out-projection, layer norm, MLP) on the raw layer output (the official LeGrad applies no final
    norm), the gradient of the cosine with the target with respect to its attention probabilities, ReLU, mean over
    heads, sum over layers, min-max on the token grid, bilinear upsampling (the official order)."""
    _, refs = folders
    ref, b = refs["siglip"], backbones["siglip"]
    torch.manual_seed(1)
    image = torch.randn(1, 3, SIZE, SIZE)
    targets = _text_targets(b, ["a red square"])
    vision = ref.vision_model
    with torch.no_grad():
        hidden = vision(pixel_values=image, output_hidden_states=True).hidden_states  # embeddings + each layer
    head = vision.head
    mha = head.attention
    c, h = mha.embed_dim, mha.num_heads
    total = 0
    for layer in (0, 1, 2):
        x = hidden[layer + 1]  # [1, T, C]: the raw output of the layer
        wq, wk, wv = mha.in_proj_weight.split(c)
        bq, bk, bv = mha.in_proj_bias.split(c)
        q = (head.probe @ wq.T + bq).view(1, 1, h, -1).transpose(1, 2)
        k = (x @ wk.T + bk).view(1, -1, h, c // h).transpose(1, 2)
        v = (x @ wv.T + bv).view(1, -1, h, c // h).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) / (c // h) ** 0.5).softmax(-1).detach().requires_grad_(True)
        o = mha.out_proj((probs @ v).transpose(1, 2).reshape(1, 1, c))
        pooled = (o + head.mlp(head.layernorm(o)))[:, 0]
        (grad,) = torch.autograd.grad((targets * F.normalize(pooled, dim=-1)).sum(), probs)
        total = total + grad.clamp_min(0).mean(dim=(1, 2)).view(1, 1, SIZE // PATCH, SIZE // PATCH)
    expected = F.interpolate((total - total.min()) / (total.max() - total.min()), scale_factor=PATCH, mode="bilinear")
    expected = expected[:, 0]
    torch.testing.assert_close(LeGrad(layers=(0, 1, 2))(b, image, targets), expected, atol=1e-5, rtol=0)


def test_rollout_on_siglip_ends_with_the_pool_row(backbones):
    b = backbones["siglip"]
    image = torch.randn(1, 3, SIZE, SIZE)
    n = len(b.blocks)
    with torch.no_grad(), AttentionRecorder(b.blocks, range(n), leaf_probs=False) as rec:
        tokens = b.forward_blocks(b.embed_tokens(image))
        with MHAPoolRecorder(b.model.vision_model.head.attention) as pool_rec:
            b.pool_tokens(tokens)  # the pool's attention as the model pools
        pool = pool_rec.record.probs
    roll = None
    for layer in range(n):
        a = 0.5 * rec[layer].probs.mean(1) + 0.5 * torch.eye(tokens.shape[1])
        a = a / a.sum(-1, keepdim=True)
        roll = a if roll is None else a @ roll
    row = (pool.mean(dim=(1, 2)).unsqueeze(1) @ roll)[:, 0].view(1, 1, SIZE // PATCH, SIZE // PATCH)
    row = F.interpolate(row, scale_factor=PATCH, mode="bilinear")[:, 0]
    expected = (row - row.min()) / (row.max() - row.min())
    maps = AttentionRollout()(b, image, torch.randn(1, b.embed_dim))
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ MaskInversion
@pytest.mark.parametrize(("layers", "size"), [((-1,), SIZE), ((0, 1, 2), 48)])
def test_clip_strategies_agree_with_naive(backbones, layers, size):
    b = backbones["clip"]
    torch.manual_seed(0)
    image = torch.randn(1, 3, size, size)
    masks = make_masks(3, 24, 20)
    ref = MaskInversion(LeGrad(layers=layers), strategy="naive", alpha=0.1, iterations=5)(b, image, masks)
    for strategy in ["naive_lean", "per_step", "precomputed"]:
        res = MaskInversion(LeGrad(layers=layers), strategy=strategy, alpha=0.1, iterations=5)(b, image, masks)
        assert res.strategy == strategy
        torch.testing.assert_close(res.maps, ref.maps, atol=1e-5, rtol=0, msg=strategy)
        torch.testing.assert_close(res.loss_history, ref.loss_history, atol=1e-5, rtol=0, msg=strategy)
    assert MaskInversion(LeGrad(layers=layers)).plan(b, size, 3) in ("per_step", "precomputed")


@pytest.mark.parametrize("layers", [(-1,), (0, 1, 2)])
def test_siglip_maskinversion_runs_the_pool_strategy(backbones, layers):
    b = backbones["siglip"]
    torch.manual_seed(0)
    image = torch.randn(1, 3, 64, 64)
    masks = torch.zeros(2, 64, 64)
    masks[0, :32, :32] = 1
    masks[1, 32:, 16:] = 1
    res = MaskInversion(LeGrad(layers=layers), iterations=8)(b, image, masks)
    assert res.strategy == "attention_pool"  # auto: the pool's Jacobian tabulated (no block decomposition)
    assert res.loss_history[-1] < res.loss_history[0] - 0.05
    assert torch.isfinite(res.embeddings).all() and not any(p.requires_grad for p in b.parameters())
    with pytest.raises(UnsupportedModelError, match=r"per_step strategy cannot run.*attention-pool"):
        MaskInversion(strategy="per_step", iterations=1)(b, image, masks)
    naive = MaskInversion(LeGrad(layers=layers), strategy="naive", iterations=8)(b, image, masks)
    torch.testing.assert_close(res.loss_history, naive.loss_history, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.embeddings, naive.embeddings, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ alpha channel
@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_channel(folders, family):
    from regionembed.backbones.alpha import alpha_from_masks

    root, _ = folders
    plain = HFBackbone(str(root / family))
    b = HFBackbone(str(root / family), alpha_channel=True)
    assert b.rgb_stem_conv is b.model.vision_model.embeddings.patch_embedding
    assert b.alpha_embed.conv.kernel_size == (PATCH, PATCH)
    image = torch.randn(2, 3, SIZE, SIZE)
    alpha = alpha_from_masks(make_masks(2, SIZE, SIZE))
    with torch.no_grad():
        ref = plain.encode_image(image)
        torch.testing.assert_close(b.encode_image(image, alpha=alpha), ref, atol=0, rtol=0)  # zero-init: unchanged
        b.alpha_embed.conv.weight.normal_()
        assert not torch.allclose(b.encode_image(image, alpha=alpha), ref, atol=1e-3)
    with pytest.raises(ValueError, match="no alpha channel"):
        plain.encode_image(image, alpha=alpha)


# ------------------------------------------------------------------------------------------ training parts
@pytest.mark.parametrize("family", FAMILIES)
def test_training_parts_and_export(folders, family):
    root, refs = folders
    b = HFBackbone(str(root / family), alpha_channel=True)
    image_ids = {id(p) for p in b.image_tower.parameters()}
    text = dict(b.text_tower_parameters())
    assert image_ids and text and not image_ids & {id(p) for p in text.values()}
    assert "logit_scale" not in text and "logit_bias" not in text
    b.set_trainable(image=True)
    trainable = {id(p) for p in b.parameters() if p.requires_grad}
    assert trainable == image_ids
    if family == "clip":  # transformers keeps CLIP's visual projection beside the vision model
        assert id(b.model.visual_projection.weight) in trainable
    b.set_trainable(text=True, logit_scale=True, alpha=True)
    expected = {id(p) for p in text.values()} | {id(b.model.logit_scale), id(b.alpha_embed.conv.weight)}
    if family == "siglip":
        expected.add(id(b.model.logit_bias))
    assert {id(p) for p in b.parameters() if p.requires_grad} == expected
    b.model.train()
    b.eval_text_tower()
    assert not b.model.text_model.training and b.model.vision_model.training
    state = b.export_state_dict()
    fresh = type(refs[family])(refs[family].config)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    b.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fresh.get_image_features(pixel_values=x).pooler_output, b.encode_image(x))


def test_exported_weights_load_back_as_a_folder(folders, tmp_path):
    """What ContrastiveModule(export_path=...) writes, put in a copy of the folder as model.safetensors."""
    import shutil

    from regionembed.io import save_safetensors

    root, _ = folders
    b = HFBackbone(str(root / "siglip"))
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(0.01)  # "trained"
    shutil.copytree(root / "siglip", tmp_path / "trained")
    save_safetensors(b.export_state_dict(), tmp_path / "trained" / "model.safetensors", metadata={"model_name": "x"})
    loaded = HFBackbone(str(tmp_path / "trained"))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), b.encode_image(x), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcam_drives_maskinversion(backbones, family):
    """The generic autograd path (a second-order backward through Grad-CAM, and through SigLIP's pool head)."""
    b = backbones[family]
    torch.manual_seed(0)
    image = torch.randn(1, 3, 48, 48)
    masks = torch.zeros(2, 48, 48)
    masks[0, :24, :24] = 1
    masks[1, 24:, 8:] = 1
    res = MaskInversion(GradCAM(normalize=False), iterations=4)(b, image, masks)
    assert res.strategy == "explainer" and res.loss_history[-1] < res.loss_history[0] - 0.05


def test_gradcam_twice_differentiable_path_scores_the_model_embedding(backbones):
    """Grad-CAM inside MaskInversion (create_graph) runs the pool explicitly: it must score the model's embedding."""
    b = backbones["siglip"]
    image = torch.randn(2, 3, SIZE, SIZE)
    twice = layer_activations(b, image, None, twice_differentiable=True).embedding
    torch.testing.assert_close(twice, b.encode_image(image), rtol=0, atol=2e-5)
