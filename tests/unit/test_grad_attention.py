"""Gradient attention (explainer), attention losses, combiners, gathered InfoNCE and the retrieval gallery."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from regionembed.backbones import AttentionRecorder, OpenCLIPBackbone
from regionembed.composed import LearnedCombiner, SumCombiner, build_gallery, gather_rows
from regionembed.explainers import GradAttention, grad_attention_maps
from regionembed.losses import attention_loss, composed_info_nce, dice_loss


@pytest.fixture(scope="module")
def trainable_backbone():
    torch.manual_seed(3)
    return OpenCLIPBackbone("re-tiny-vit")  # parameters require grad


def _inputs(backbone, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, backbone.embed_dim, generator=g)


# ---------------------------------------------------------------------------------------------------- explainer
@pytest.mark.parametrize(("pooling", "layer"), [("legrad", -1), ("legrad", 0), ("gradcam", -2)])
def test_maps_shape_and_range(tiny_backbone, pooling, layer):
    image, targets = _inputs(tiny_backbone, b=3)
    maps = GradAttention(layer=layer, pooling=pooling)(tiny_backbone, image, targets)
    assert maps.shape == (3, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1 and torch.isfinite(maps).all()
    assert (maps.flatten(1).max(1).values == 1).all()  # min-max normalised, not constant


def _expected_map(relevance: torch.Tensor) -> torch.Tensor:
    """Patch relevance ``[2, 16]`` of the tiny model -> 32 px maps, bilinear by the patch size, min-max per map."""
    up = F.interpolate(relevance.reshape(2, 1, 4, 4), scale_factor=8, mode="bilinear")[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    return (up - lo) / (hi - lo)


def test_legrad_pooling_matches_a_hand_computation(tiny_backbone):
    image, targets = _inputs(tiny_backbone)
    maps = GradAttention(layer=-1)(tiny_backbone, image, targets)
    with torch.enable_grad(), AttentionRecorder(tiny_backbone.blocks, [-1]) as rec:
        feats = tiny_backbone.encode_image(image)
        probs = rec[-1].probs
        probs.retain_grad()
        (F.normalize(feats, dim=-1) * F.normalize(targets, dim=-1)).sum().backward()
    torch.testing.assert_close(maps, _expected_map(probs.grad.clamp_min(0).mean(dim=(1, 2))[:, 1:]))


def test_gradcam_pooling_matches_hooks(tiny_backbone):
    image, targets = _inputs(tiny_backbone, seed=1)
    maps = GradAttention(layer=-2, pooling="gradcam")(tiny_backbone, image, targets)
    saved = {}

    def hook(module, args, output):
        output.retain_grad()
        saved["out"] = output

    handle = tiny_backbone.blocks[-2].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = image.clone().requires_grad_(True)  # so block outputs are on a graph in the frozen model
            feats = tiny_backbone.encode_image(x)
            (F.normalize(feats, dim=-1) * F.normalize(targets, dim=-1)).sum().backward()
    finally:
        handle.remove()
    acts, grads = saved["out"][:, 1:], saved["out"].grad[:, 1:]
    torch.testing.assert_close(maps, _expected_map((grads.mean(1, keepdim=True) * acts).sum(-1).clamp_min(0)))


def test_modifier_conditions_the_map(tiny_backbone):
    image, targets = _inputs(tiny_backbone, b=1)
    g = torch.Generator().manual_seed(5)
    text_a, text_b = torch.randn(2, 1, tiny_backbone.embed_dim, generator=g)
    combiner = SumCombiner()
    explainer = GradAttention()
    a = explainer(tiny_backbone, image, targets, query_fn=lambda f: combiner(f, text_a))
    b = explainer(tiny_backbone, image, targets, query_fn=lambda f: combiner(f, text_b))
    plain = explainer(tiny_backbone, image, targets)
    assert (a - b).abs().max() > 1e-3 and (a - plain).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["legrad", "gradcam"])
def test_second_order_gradient_reaches_the_model(trainable_backbone, pooling):
    image, targets = _inputs(trainable_backbone)
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:20, 8:24] = 1
    trainable_backbone.zero_grad()
    layer = -1 if pooling == "legrad" else -2
    maps = GradAttention(layer=layer, pooling=pooling)(trainable_backbone, image, targets, create_graph=True)
    assert maps.requires_grad
    attention_loss(maps, masks).backward()
    visual = trainable_backbone.model.visual
    # The score's first-order graph ends at the attention (or tokens) of `layer`; only the double backward
    # reaches the projection after it and the blocks before it.
    for p in (visual.proj, visual.conv1.weight, trainable_backbone.blocks[0].attn.in_proj_weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_features_are_returned_on_the_graph(trainable_backbone):
    image, targets = _inputs(trainable_backbone)
    target = F.normalize(targets, dim=-1)
    maps, feats = grad_attention_maps(
        trainable_backbone, image, lambda f: (F.normalize(f, dim=-1) * target).sum(-1), create_graph=False
    )
    assert not maps.requires_grad and feats.requires_grad
    torch.testing.assert_close(feats, trainable_backbone.encode_image(image), atol=1e-5, rtol=1e-5)


def test_explainer_errors(tiny_backbone):
    image, targets = _inputs(tiny_backbone)
    with pytest.raises(ValueError, match="pooling"):
        GradAttention(pooling="rollout")
    with pytest.raises(ValueError, match="score_fn must return"):
        grad_attention_maps(tiny_backbone, image, lambda f: f.sum())
    with pytest.raises(ValueError, match="targets must have shape"):
        GradAttention()(tiny_backbone, image, targets[:, :5])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        GradAttention()(tiny_backbone, image, targets)


# ------------------------------------------------------------------------------------------------------- losses
MAPS = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[1.0, 1.0], [0.5, 0.0]]])
MASKS = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])


def test_dice_loss_by_hand():
    # map 0: sum(p*m) = 1.5, sum(p) = 1.5, sum(m) = 2: 1 - (3 + 1) / (1.5 + 2 + 1)
    # map 1: sum(p*m) = 1.5, sum(p) = 2.5: 1 - 4 / 5.5
    expected = torch.tensor([1 - 4 / 4.5, 1 - 4 / 5.5])
    torch.testing.assert_close(attention_loss(MAPS, MASKS, "dice", reduction="none"), expected)
    torch.testing.assert_close(attention_loss(MAPS, MASKS, "dice"), dice_loss(MAPS, MASKS))


def test_bce_loss_by_hand():
    top = torch.tensor(1.0).clamp(max=1 - 1e-6)  # probabilities are clamped to [eps, 1 - eps] (float32)
    right = -torch.log(top)  # a confident correct pixel
    wrong = -torch.log(1 - top)  # a confident wrong pixel
    # map 0: (p, m) = (1, 1) (0, 0) (.5, 1) (0, 0); map 1: (1, 1) (1, 0) (.5, 1) (0, 0)
    m0 = (right + right + torch.log(torch.tensor(2.0)) + right) / 4
    m1 = (right + wrong + torch.log(torch.tensor(2.0)) + right) / 4
    torch.testing.assert_close(attention_loss(MAPS, MASKS, "bce", reduction="none"), torch.stack([m0, m1]))


def test_energy_loss_by_hand():
    # the fraction of the map outside the mask: 0 / 1.5 and 1 / 2.5
    torch.testing.assert_close(
        attention_loss(MAPS, MASKS, "energy", reduction="none"), torch.tensor([0.0, 0.4]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("kind", ["dice", "bce", "energy"])
def test_losses_are_differentiable(kind):
    maps = MAPS.clone().requires_grad_(True)
    attention_loss(maps, MASKS, kind).backward()
    assert torch.isfinite(maps.grad).all() and maps.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("maps", "masks", "kwargs", "match"),
    [
        (MAPS, MASKS[:, :1], {}, "differ in shape"),
        (MAPS[0], MASKS[0], {}, r"\[N, H, W\]"),
        (MAPS * torch.nan, MASKS, {}, "NaN"),
        (MAPS, MASKS * torch.nan, {}, "NaN"),
        (MAPS * 2, MASKS, {}, r"maps must lie in \[0, 1\]"),
        (MAPS, MASKS * 3, {}, r"masks must lie in \[0, 1\]"),
        (MAPS, MASKS * torch.tensor([1.0, 0.0])[:, None, None], {}, r"masks \[1\] are empty"),
        (MAPS, MASKS, {"kind": "l2"}, "unknown attention loss"),
        (MAPS, MASKS, {"reduction": "sum"}, "unknown reduction"),
    ],
)
def test_loss_errors(maps, masks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_loss(maps, masks, **kwargs)


# ---------------------------------------------------------------------------------------------------- combiners
def test_combiners():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 5, 16, generator=g)
    out = SumCombiner()(image, text)
    torch.testing.assert_close(out, F.normalize(F.normalize(image, dim=-1) + F.normalize(text, dim=-1), dim=-1))
    learned = LearnedCombiner(16, proj_dim=8, hidden_dim=12).eval()
    q = learned(image, text)
    assert q.shape == (5, 16)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(5))
    # the output layer starts at zero: a convex mix of the unit-norm inputs (the sum direction at lam = 1/2)
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    lam = learned.mix(torch.cat([learned.image_proj(i), learned.text_proj(t)], -1))
    torch.testing.assert_close(q, F.normalize(lam * t + (1 - lam) * i, dim=-1))
    q.sum().backward()
    assert learned.output.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must both be"):
        learned(image, text[:, :8])


# ------------------------------------------------------------------------------------------------ InfoNCE, gallery
def test_info_nce_single_process():
    g = torch.Generator().manual_seed(0)
    q, t = F.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    loss = composed_info_nce(q, t, 10.0)
    torch.testing.assert_close(loss, F.cross_entropy(10.0 * q @ t.T, torch.arange(6)))
    with pytest.raises(ValueError, match="must both be"):
        composed_info_nce(q, t[:3], 1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nce_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        g = torch.Generator().manual_seed(0)
        q, t = F.normalize(torch.randn(2, 8, 8, generator=g), dim=-1)
        rows = slice(4 * rank, 4 * rank + 4)
        q_r, t_r = q[rows].clone().requires_grad_(True), t[rows].clone().requires_grad_(True)
        loss = composed_info_nce(q_r, t_r, 10.0)
        loss.backward()
        uneven = gather_rows(torch.arange(3 + 2 * rank).float()[:, None])  # 3 rows on rank 0, 5 on rank 1
        torch.save({"loss": loss.detach(), "q": q_r.grad, "t": t_r.grad, "uneven": uneven}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow  # two spawned processes importing the stack: ~15-35 s on 2 shared cores
def test_gathered_info_nce_equals_the_concatenated_batch(tmp_path):
    mp.spawn(_nce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    q, t = F.normalize(torch.randn(2, 8, 8, generator=g), dim=-1)
    q.requires_grad_(True)
    t.requires_grad_(True)
    full = composed_info_nce(q, t, 10.0)
    full.backward()
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close((res[0]["loss"] + res[1]["loss"]) / 2, full.detach())
    # DDP averages the ranks' gradients: (grad on rank r) / 2 is the full batch's gradient of rank r's rows
    torch.testing.assert_close(torch.cat([r["q"] for r in res]) / 2, q.grad)
    torch.testing.assert_close(torch.cat([r["t"] for r in res]) / 2, t.grad)
    expected = torch.cat([torch.arange(3.0), torch.arange(5.0)])[:, None]
    for r in res:
        torch.testing.assert_close(r["uneven"], expected)


def test_build_gallery_dedupes_and_excludes():
    keys = torch.tensor([11, 13, 10, 12, 13])  # 13 comes twice (a target that is also another query's reference)
    emb = torch.arange(5.0)[:, None].expand(5, 2)
    gallery, target, exclude = build_gallery(keys, emb, torch.tensor([11, 13]), torch.tensor([10, 14]))
    torch.testing.assert_close(gallery[:, 0], torch.tensor([2.0, 0.0, 3.0, 1.0]))  # keys 10, 11, 12, 13
    assert target.tolist() == [1, 3]
    assert exclude.tolist() == [0, -1]  # 14 is not in the gallery
    with pytest.raises(ValueError, match="not in the gallery"):
        build_gallery(keys, emb, torch.tensor([99]), torch.tensor([10]))
    assert gather_rows(keys) is keys  # one process: nothing to gather


# ------------------------------------------------------------------------------------------------------- module
@pytest.mark.parametrize(
    ("options", "trained", "frozen"),
    [
        ({"combiner": "sum", "attn_score": "both", "attn_loss": "energy", "train_towers": ["text"]}, "text", "visual"),
        (
            {"attn_pooling": "gradcam", "attn_layer": -2, "attn_loss": "bce", "train_towers": ["image"]},
            "visual",
            "text",
        ),
    ],
)
def test_training_step_variants(options, trained, frozen):
    from regionembed.data import SyntheticComposedDataModule, WorldConfig
    from regionembed.modules import ComposedRetrievalModule

    torch.manual_seed(0)
    module = ComposedRetrievalModule(OpenCLIPBackbone("re-tiny-vit"), attn_weight=1.0, **options)
    data = SyntheticComposedDataModule(
        world=WorldConfig(image_size=32, size_range=(0.3, 0.5), max_objects=2), train_size=4, batch_size=4
    )
    data.preprocess = module.backbone.preprocess
    data.setup("fit")
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached: logging is skipped
        loss = module.training_step(next(iter(data.train_dataloader())), 0)
    loss.backward()
    model = module.backbone.model
    text = model.transformer.resblocks[0].mlp.c_fc.weight
    visual = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert {"text": text, "visual": visual}[trained].grad.abs().sum() > 0
    assert {"text": text, "visual": visual}[frozen].grad is None
    assert not model.logit_scale.requires_grad


def test_old_import_paths_still_work():
    import regionembed.composed as composed
    import regionembed.losses as losses
    from regionembed.modules import LearnedCombiner as ModulesLearned
    from regionembed.modules.composed_retrieval import LearnedCombiner as Old
    from regionembed.modules.composed_retrieval import build_gallery as old_gallery
    from regionembed.modules.composed_retrieval import composed_info_nce as old_nce

    assert Old is ModulesLearned is composed.LearnedCombiner
    assert old_gallery is composed.build_gallery and old_nce is losses.composed_info_nce


def test_eval_logs_the_dashboard_names_and_the_functional_recall():
    """The module's Recall@K (metrics.RecallAtK) equals recall_at_k over all queries, under the same names."""
    from regionembed.data import SyntheticComposedDataModule, WorldConfig
    from regionembed.metrics.functional import map_mask_agreement, recall_at_k
    from regionembed.modules import ComposedRetrievalModule

    torch.manual_seed(0)
    module = ComposedRetrievalModule(OpenCLIPBackbone("re-tiny-vit"), combiner="sum", recall_k=(1, 2, 5, 50)).eval()
    data = SyntheticComposedDataModule(
        world=WorldConfig(image_size=32, size_range=(0.3, 0.5), max_objects=2),
        train_size=0,
        val_size=10,
        test_size=1,
        batch_size=4,
    )
    data.preprocess = module.backbone.preprocess
    data.setup("validate")
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    batches = list(data.val_dataloader())
    for i, batch in enumerate(batches):
        module.validation_step(batch, i)
    module.on_validation_epoch_end()
    # the independent reference: every query against the deduplicated gallery of targets and references
    rows = [module.forward_batch(b, maps=False, create_graph=False) for b in batches]
    with torch.no_grad():
        query, target, reference = (torch.cat([r[k] for r in rows]) for k in range(3))
    target_key = torch.cat([b["target_key"] for b in batches])
    reference_key = torch.cat([b["reference_key"] for b in batches])
    gallery, t, ex = build_gallery(
        torch.cat([target_key, reference_key]), torch.cat([target, reference]), target_key, reference_key
    )
    want = {f"val/{k}": float(v) for k, v in recall_at_k(query @ gallery.T, t, (1, 2, 5, 50), ex).items()}
    maps = []
    for b in batches:
        with torch.enable_grad():
            maps.append(module.forward_batch(b, maps=True, create_graph=False)[3].detach())
    masks = torch.cat([b["mask"] for b in batches]) > 0.5
    want.update({f"val/{k}": float(v) for k, v in map_mask_agreement(torch.cat(maps), masks).items()})
    want.update({"val/gallery_size": float(len(gallery)), "val/queries": 10.0})
    assert logged.keys() == want.keys()
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < logged["val/R@1"] < logged["val/R@50"] == 1.0  # a test that can fail: not all 0 or all 1
