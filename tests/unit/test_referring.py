"""Zero-shot REC scoring (regionembed.referring) and ReferringModule on hand-built batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regionembed.metrics import ReferringAccuracy
from regionembed.modules import ReferringModule
from regionembed.referring import answer_targets, candidate_scores, comprehend
from regionembed.regions import GlobalEmbedding, RegionEmbedder


class MeanColour(RegionEmbedder):
    """Embeds a region by the mean of the image inside its mask, padded to D (a transparent, exact method)."""

    name = "mean_colour"

    def __init__(self, dim: int) -> None:
        self.dim, self.calls = dim, 0

    def embed(self, backbone, image, masks):
        self.calls += 1
        mean = (masks[:, None] * image[None]).flatten(2).sum(-1) / masks.flatten(1).sum(-1, keepdim=True)
        return F.pad(mean, (0, self.dim - 3))


def _image_and_masks(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A red, a green and a blue square (in the normalised space), their masks and boxes."""
    image = torch.zeros(3, size, size)
    masks = torch.zeros(3, size, size)
    boxes = torch.tensor([[2.0, 2, 10, 10], [12, 2, 20, 10], [2, 20, 10, 28]])
    for c, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        image[c, y0:y1, x0:x1] = 1
        masks[c, y0:y1, x0:x1] = 1
    return image, masks, boxes


def test_the_closest_candidate_is_the_answer(tiny_backbone):
    d = tiny_backbone.embed_dim
    image, masks, boxes = _image_and_masks()
    expressions = F.pad(torch.tensor([[0.0, 0, 1], [1, 0.1, 0], [0, 1, 0]]), (0, d - 3))  # blue, red, green
    scores = candidate_scores(MeanColour(d), tiny_backbone, image, masks, expressions)
    assert scores.shape == (3, 3)
    chosen = comprehend(scores)
    assert chosen.tolist() == [2, 0, 1]
    target = torch.tensor([2, 0, 0])  # the last expression refers to the red square: a miss
    metric = ReferringAccuracy()
    metric.update(*answer_targets(chosen, target, boxes, masks, "box"))
    out = metric.compute()
    assert float(out["ref_acc"]) == pytest.approx(2 / 3) and float(out["ref_miou"]) == pytest.approx(2 / 3)
    pred, truth = answer_targets(chosen, target, boxes, masks, "mask")
    assert pred.dtype == torch.bool and (pred == truth).flatten(1).all(1).tolist() == [True, True, False]
    pred, truth = answer_targets(chosen, target, boxes, masks, "index")
    assert (pred == truth).tolist() == [True, True, False]


def test_ties_are_misses(tiny_backbone):
    """The global embedding gives every candidate the same score: no answer, not "the first candidate"."""
    image, masks, boxes = _image_and_masks()
    expressions = torch.randn(2, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    scores = candidate_scores(GlobalEmbedding(), tiny_backbone, image, masks, expressions)
    chosen = comprehend(scores)
    assert chosen.tolist() == [-1, -1]
    target = torch.tensor([0, 0])
    pred, _ = answer_targets(chosen, target, boxes, masks, "box")
    assert (pred == 0).all()  # a zero-area box: IoU 0 with the referred box
    metric = ReferringAccuracy()
    metric.update(*answer_targets(chosen, target, boxes, masks, "mask"))
    assert float(metric.compute()["ref_acc"]) == 0
    assert comprehend(torch.tensor([[0.1, 0.3, 0.3], [0.5, 0.2, 0.1]])).tolist() == [-1, 0]
    # identical embeddings through a matrix product: cosines that differ in the last bits are still a tie
    near = torch.tensor([[0.3, 0.3 + 3e-7, 0.1], [0.3, 0.31, 0.1]])
    assert comprehend(near).tolist() == [-1, 1]
    assert comprehend(near, tie_tolerance=0).tolist() == [1, 1]
    same = F.normalize(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)), dim=-1).expand(5, -1)
    text = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    assert (comprehend(text @ same.T) == -1).all()


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[E, N\]"):
        comprehend(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        comprehend(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="tie_tolerance"):
        comprehend(torch.zeros(1, 2), tie_tolerance=-1.0)
    with pytest.raises(ValueError, match="unknown match"):
        answer_targets(torch.tensor([0]), torch.tensor([0]), torch.zeros(1, 4), torch.zeros(1, 4, 4), "iou")


def _batch(image, masks, boxes, texts, targets, ids):
    b = len(texts)
    return {
        "image": image[None].expand(b, -1, -1, -1).clone(),
        "masks": masks.repeat(b, 1, 1),
        "boxes": boxes.repeat(b, 1),
        "region_batch_index": torch.arange(b).repeat_interleave(len(masks)),
        "num_regions": torch.full((b,), len(masks)),
        "text": texts,
        "target_index": torch.tensor(targets),
        "image_ids": ids,
    }


def test_module_embeds_each_image_once_and_counts_skipped(tiny_backbone):
    d = tiny_backbone.embed_dim
    method = MeanColour(d)
    module = ReferringModule(tiny_backbone, methods=[method], match="index")
    colours = {"red": [1.0, 0, 0], "green": [0.0, 1, 0], "blue": [0.0, 0, 1]}
    module.text_cache = lambda backbone, texts, device=None: F.pad(
        torch.tensor([colours[t] for t in texts]), (0, d - 3)
    )
    image, masks, boxes = _image_and_masks()
    batch = _batch(image, masks, boxes, ["blue", "red", "green", "red"], [2, 0, 1, -1], ["a", "a", "a", "a"])
    module.test_step(batch, 0)
    assert method.calls == 1  # three expressions of one image: its candidates are embedded once
    other = _batch(image, masks, boxes, ["green", "blue"], [1, 0], ["a", "b"])
    other["image"][1] = image.flip(-1)  # same id, another picture: not merged
    module.test_step(other, 1)
    assert method.calls == 3
    acc = module.metrics["mean_colour"].compute()
    # only "blue" on the flipped image is wrong: no candidate mask holds blue there, every score ties at 0
    assert float(acc["ref_acc"]) == pytest.approx(4 / 5)
    assert int(module.counts["expressions"].compute()) == 5
    assert int(module.counts["skipped_expressions"].compute()) == 1
    assert float(module.counts["chance_hits"].compute()) == pytest.approx(5 / 3)  # 1 of 3 candidates, 5 times


def test_module_errors(tiny_backbone):
    with pytest.raises(ValueError, match="unknown match"):
        ReferringModule(tiny_backbone, match="nearest")
    with pytest.raises(ValueError, match="unique"):
        ReferringModule(tiny_backbone, methods=[GlobalEmbedding(), GlobalEmbedding()])
    image, masks, boxes = _image_and_masks()
    batch = _batch(image, masks, boxes, ["x"], [0], ["a"])
    with pytest.raises(ValueError, match="per-expression `kind`"):
        ReferringModule(tiny_backbone, kinds=["relation"]).test_step(batch, 0)
    del batch["text"]
    with pytest.raises(ValueError, match="SyntheticReferringDataModule"):
        ReferringModule(tiny_backbone).test_step(batch, 0)
