"""Every metric against an independent numpy reference (seeded random inputs), hand-computed cases and bad input."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection
from torchvision.ops import box_iou

from regionembed.metrics import (
    BoxLocalization,
    DeletionInsertionAUC,
    MapMaskAgreement,
    MaxBoxAccV2,
    RecallAtK,
    ReferringAccuracy,
    RegionAccuracy,
    auc,
    contrastive_deletion_gap,
    deletion_insertion_curves,
)
from regionembed.metrics import functional as MF

# ---------------------------------------------------------------------------------------------------------------------
# numpy references (written from the definitions, sharing no code with the library)
# ---------------------------------------------------------------------------------------------------------------------


def np_box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def np_region_accuracy(logits: np.ndarray, target: np.ndarray, top_k) -> dict[str, float]:
    n, c = logits.shape
    order = np.argsort(-logits, axis=1, kind="stable")
    out, per_class = {}, {}
    for k in top_k:
        hit = np.array([target[i] in order[i, : min(k, c)] for i in range(n)])
        out[f"top{k}"] = hit.mean()
        per_class[k] = np.mean([hit[target == cls].mean() for cls in np.unique(target)])
    out.update({f"mean_class_top{k}": v for k, v in per_class.items()})
    return out


def np_map_mask(maps: np.ndarray, masks: np.ndarray, thr: float) -> dict[str, float]:
    ious, dices, points, energies = [], [], [], []
    for m, g in zip(maps, masks.astype(bool), strict=True):
        fg = m >= thr
        union = np.logical_or(fg, g).sum()
        ious.append(np.logical_and(fg, g).sum() / union if union else 1.0)
        den = m.sum() + g.sum()
        dices.append(2 * (m * g).sum() / den if den else 1.0)
        r, c = np.unravel_index(np.argmax(m), m.shape)
        points.append(float(g[r, c]))
        energies.append((m * g).sum() / m.sum() if m.sum() else 0.0)
    return {
        "map_miou": np.mean(ious),
        "map_dice": np.mean(dices),
        "pointing_game": np.mean(points),
        "energy_pointing_game": np.mean(energies),
    }


def np_components(fg: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by breadth-first search."""
    seen = np.zeros_like(fg, dtype=bool)
    comps = []
    h, w = fg.shape
    for r0 in range(h):
        for c0 in range(w):
            if not fg[r0, c0] or seen[r0, c0]:
                continue
            queue, comp = deque([(r0, c0)]), []
            seen[r0, c0] = True
            while queue:
                r, c = queue.popleft()
                comp.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and fg[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            queue.append((rr, cc))
            comps.append(comp)
    return comps


def np_max_box_acc(maps, gts, deltas, cams, multi_contour=True) -> dict[str, float]:
    correct = np.zeros((len(cams), len(deltas)))
    for m, gt in zip(maps, gts, strict=True):
        m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else np.zeros_like(m)
        for ti, t in enumerate(cams):
            comps = np_components(m >= t)
            if not multi_contour and comps:
                comps = [max(comps, key=len)]  # first largest in raster order
            best = 0.0
            for comp in comps:
                rows, cols = zip(*comp, strict=True)
                box = np.array([min(cols), min(rows), max(cols) + 1, max(rows) + 1], float)
                best = max([best] + [np_box_iou(box, g) for g in gt])
            correct[ti] += [best >= d for d in deltas]
    best_acc = (correct / len(maps)).max(0)
    out = {"maxboxacc_v2": best_acc.mean()}
    out.update({f"maxboxacc@{round(100 * d)}": best_acc[j] for j, d in enumerate(deltas)})
    return out


def np_recall(scores: np.ndarray, target: np.ndarray, ks, exclude=None) -> dict[str, float]:
    ranks = []
    for q in range(scores.shape[0]):
        keep = [g for g in range(scores.shape[1]) if exclude is None or g != exclude[q]]
        order = [keep[i] for i in np.argsort(-scores[q, keep], kind="stable")]
        ranks.append(order.index(target[q]))
    return {f"R@{k}": np.mean(np.array(ranks) < k) for k in ks}


def np_curves(weights, image, maps, steps, mode, baseline):
    """Deletion / insertion curves for the linear score ``sum(weights[b] * x)``."""
    b, c, h, w = image.shape
    curves = np.zeros((b, steps + 1))
    for i in range(b):
        order = np.argsort(-maps[i].ravel(), kind="stable")
        for s in range(steps + 1):
            n = s * h * w // steps
            x = (image[i] if mode == "deletion" else baseline[i]).reshape(c, -1).copy()
            src = (baseline[i] if mode == "deletion" else image[i]).reshape(c, -1)
            x[:, order[:n]] = src[:, order[:n]]
            curves[i, s] = (weights[i].reshape(c, -1) * x).sum()
    return curves


def np_auc(curve: np.ndarray) -> np.ndarray:
    dx = 1 / (curve.shape[1] - 1)
    return ((curve[:, 1:] + curve[:, :-1]) / 2).sum(1) * dx


def assert_dict_close(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert list(got) == list(want), (list(got), list(want))
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(float(value), abs=atol, nan_ok=True), key


def random_boxes(rng: np.random.Generator, n: int, size: float = 32) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


# ---------------------------------------------------------------------------------------------------------------------
# region classification
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_classes", "top_k"), [(10, (1, 5)), (3, (1, 5)), (7, (2, 3, 8))])
def test_region_accuracy_matches_numpy(num_classes, top_k):
    rng = np.random.default_rng(num_classes)
    logits = rng.normal(size=(50, num_classes))
    target = rng.integers(0, num_classes, 50)
    want = np_region_accuracy(logits, target, top_k)
    metric = RegionAccuracy(num_classes, top_k=top_k)
    for chunk in np.array_split(np.arange(50), 3):
        metric.update(torch.from_numpy(logits[chunk]).float(), torch.from_numpy(target[chunk]))
    assert_dict_close(metric.compute(), want)
    assert_dict_close(MF.region_accuracy(torch.from_numpy(logits), torch.from_numpy(target), top_k=top_k), want)


def test_region_accuracy_hand_computed_and_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 2, 0])
    # ranks: 0; 1 (tie with class 0 counts against); 1; 2 (constant logits)
    out = MF.region_accuracy(logits, target, top_k=(1, 2, 5))
    assert float(out["top1"]) == 0.25
    assert float(out["top2"]) == 0.75
    assert float(out["top5"]) == 1.0  # clipped to C = 3
    # class 0: 1/2 top-1, 1/2 top-2; class 1: 0, 1; class 2: 0, 1
    assert float(out["mean_class_top1"]) == pytest.approx(1 / 6)
    assert float(out["mean_class_top2"]) == pytest.approx(5 / 6)


def test_region_accuracy_bad_input():
    metric = RegionAccuracy(4)
    with pytest.raises(ValueError, match=r"logits must have shape \[N, 4\]"):
        metric.update(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must have shape \[2\]"):
        metric.update(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 4\)"):
        metric.update(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((2, 4), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(2, 4), torch.zeros(2))
    assert torch.isnan(metric.compute()["top1"])  # nothing was added


# ---------------------------------------------------------------------------------------------------------------------
# referring expressions
# ---------------------------------------------------------------------------------------------------------------------


def test_paired_box_iou_matches_torchvision_and_numpy():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 40), random_boxes(rng, 40)
    got = MF.paired_box_iou(torch.from_numpy(a), torch.from_numpy(b))
    torch.testing.assert_close(got, box_iou(torch.from_numpy(a), torch.from_numpy(b)).diagonal())
    np.testing.assert_allclose(got.numpy(), [np_box_iou(x, y) for x, y in zip(a, b, strict=True)], atol=1e-12)
    degenerate = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert float(MF.paired_box_iou(degenerate, degenerate)[0]) == 0.0


def test_referring_accuracy_boxes_matches_numpy():
    rng = np.random.default_rng(1)
    gt = random_boxes(rng, 60)
    pred = gt + rng.normal(scale=3.0, size=gt.shape)
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2])
    ious = np.array([np_box_iou(p, g) for p, g in zip(pred, gt, strict=True)])
    assert 0.1 < (ious > 0.5).mean() < 0.9  # the test exercises both outcomes
    metric = ReferringAccuracy(0.5)
    metric.update(torch.from_numpy(pred[:25]).float(), torch.from_numpy(gt[:25]).float())
    metric.update(torch.from_numpy(pred[25:]).float(), torch.from_numpy(gt[25:]).float())
    assert_dict_close(metric.compute(), {"ref_acc": (ious > 0.5).mean(), "ref_miou": ious.mean()}, atol=1e-5)


def test_referring_accuracy_masks_and_indices():
    rng = np.random.default_rng(2)
    pred = rng.random((20, 8, 8)) > 0.5
    gt = rng.random((20, 8, 8)) > 0.4
    ious = [np.logical_and(p, g).sum() / np.logical_or(p, g).sum() for p, g in zip(pred, gt, strict=True)]
    want = {"ref_acc": (np.array(ious) > 0.3).mean(), "ref_miou": np.mean(ious)}
    assert_dict_close(MF.referring_accuracy(torch.from_numpy(pred), torch.from_numpy(gt), 0.3), want)
    # exactly at the threshold is a miss (IoU must exceed it)
    half = torch.tensor([[[1, 1, 0, 0]]])
    assert float(MF.referring_accuracy(half, torch.ones(1, 1, 4), 0.5)["ref_acc"]) == 0.0

    metric = ReferringAccuracy()
    metric.update(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 1, 3]))
    out = metric.compute()
    assert float(out["ref_acc"]) == 0.75
    assert torch.isnan(out["ref_miou"])  # no IoU in the index form


def test_referring_accuracy_bad_input():
    metric = ReferringAccuracy()
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="binary"):
        metric.update(torch.full((1, 2, 2), 0.5), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="x2 >= x1"):
        metric.update(torch.tensor([[5.0, 0, 1, 1]]), torch.tensor([[0.0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.tensor([[0.0, 0, float("nan"), 1]]), torch.tensor([[0.0, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"pred must be candidate indices \[N\]"):
        metric.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# map-vs-mask agreement
# ---------------------------------------------------------------------------------------------------------------------


def test_map_mask_agreement_matches_numpy():
    rng = np.random.default_rng(3)
    maps = rng.random((30, 12, 10)) ** 3
    maps[0] = 0  # zero map: energy 0, points at (0, 0)
    masks = rng.random((30, 12, 10)) > 0.7
    masks[1] = False  # empty mask
    want = np_map_mask(maps, masks, 0.4)
    metric = MapMaskAgreement(threshold=0.4)
    metric.update(torch.from_numpy(maps[:11]).float(), torch.from_numpy(masks[:11]))
    metric.update(torch.from_numpy(maps[11:]).float(), torch.from_numpy(masks[11:]).float())
    assert_dict_close(metric.compute(), want)
    assert_dict_close(MF.map_mask_agreement(torch.from_numpy(maps), torch.from_numpy(masks), 0.4), want)


def test_map_mask_agreement_hand_computed():
    maps = torch.tensor([[[1.0, 0.5], [0.5, 0.0]], [[0.2, 0.2], [0.2, 0.2]]])
    masks = torch.tensor([[[1, 0], [1, 0]], [[0, 1], [0, 0]]])
    s = MF.map_mask_scores(maps, masks, threshold=0.5)
    # map 0: fg = {(0,0), (0,1), (1,0)}, mask = {(0,0), (1,0)} -> IoU 2/3; dice 2*1.5/(2+2); max inside; energy 1.5/2
    # map 1: fg empty vs 1-pixel mask -> IoU 0; dice 2*0.2/(0.8+1); tie -> first pixel (0,0), outside; energy 0.25
    torch.testing.assert_close(s["iou"], torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(s["dice"], torch.tensor([0.75, 0.4 / 1.8], dtype=torch.float64))
    assert s["pointing"].tolist() == [True, False]
    torch.testing.assert_close(s["energy"], torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_map_mask_agreement_bad_input():
    metric = MapMaskAgreement()
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((1, 4, 4), float("nan")), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(torch.full((1, 4, 4), 2.0), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"maps must have shape \[N, H, W\]"):
        metric.update(torch.zeros(4, 4), torch.zeros(4, 4))


# ---------------------------------------------------------------------------------------------------------------------
# box localization
# ---------------------------------------------------------------------------------------------------------------------


def test_box_localization_matches_numpy():
    rng = np.random.default_rng(4)
    n = 40
    gts = [random_boxes(rng, int(rng.integers(0, 4))) for _ in range(n)]
    pred = random_boxes(rng, n)
    for i in range(0, n, 3):  # some predictions close to a GT box
        if len(gts[i]):
            pred[i] = gts[i][0] + rng.normal(scale=1.0, size=4)
            pred[i, 2:] = np.maximum(pred[i, 2:], pred[i, :2])
    labels_topk = np.stack([rng.permutation(6) for _ in range(n)])[:, :3]  # K = 3 < 5: top-5 is clipped
    gt_labels = rng.integers(0, 6, n)
    best = np.array([max([0.0] + [np_box_iou(p, g) for g in gt]) for p, gt in zip(pred, gts, strict=True)])
    box_ok = best >= 0.5
    want = {
        "gt_known_loc": box_ok.mean(),
        "top1_loc": (box_ok & (labels_topk[:, 0] == gt_labels)).mean(),
        "top5_loc": (box_ok & (labels_topk == gt_labels[:, None]).any(1)).mean(),
    }
    assert 0 < want["top1_loc"] < want["top5_loc"] < want["gt_known_loc"] < 1
    metric = BoxLocalization(0.5)
    for chunk in np.array_split(np.arange(n), 2):
        metric.update(
            torch.from_numpy(pred[chunk]).float(),
            [torch.from_numpy(gts[i]).float().reshape(-1, 4) for i in chunk],
            torch.from_numpy(labels_topk[chunk]),
            torch.from_numpy(gt_labels[chunk]),
        )
    assert_dict_close(metric.compute(), want)


def test_box_localization_hand_computed():
    pred = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    # image 0: second GT box matches exactly; image 1: IoU 50/100 = 0.5 counts (>=); image 2: IoU 25/100
    gts = [
        torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 10]]),
        torch.tensor([[0.0, 0, 10, 5]]),
        torch.tensor([[0.0, 0, 5, 5]]),
    ]
    labels = torch.tensor([[1, 2], [3, 1], [1, 0]])
    out = MF.box_localization(pred, gts, labels, torch.tensor([1, 1, 1]), 0.5)
    assert {k: round(float(v), 4) for k, v in out.items()} == {
        "gt_known_loc": 0.6667,
        "top1_loc": 0.3333,
        "top5_loc": 0.6667,
    }


def test_box_localization_bad_input():
    metric = BoxLocalization()
    with pytest.raises(ValueError, match="one entry per sample"):
        metric.update(
            torch.zeros(2, 4),
            [torch.zeros(1, 4)],
            torch.zeros(2, 1, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
        )
    with pytest.raises(ValueError, match=r"pred_labels_topk must have shape \[2, K\]"):
        metric.update(
            torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        )


# ---------------------------------------------------------------------------------------------------------------------
# MaxBoxAcc
# ---------------------------------------------------------------------------------------------------------------------


def blob_maps(rng: np.random.Generator, n: int, h: int = 16, w: int = 14) -> tuple[np.ndarray, list[np.ndarray]]:
    """Maps with 1-3 Gaussian blobs, quantised so that thresholds hit exact map values, and GT boxes around some
    blobs (jittered, so that accuracies are neither 0 nor 1)."""
    yy, xx = np.mgrid[:h, :w]
    maps, gts = np.zeros((n, h, w)), []
    for i in range(n):
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 3)
            maps[i] += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
            r = 1.5 * s + rng.uniform(-1, 1, 4)
            boxes.append([max(0, cx - r[0]), max(0, cy - r[1]), min(w, cx + r[2]), min(h, cy + r[3])])
        gts.append(np.array(boxes[: int(rng.integers(1, len(boxes) + 1))]).round())
    return np.round(maps * 20) / 20, gts


@pytest.mark.parametrize("multi_contour", [True, False])
def test_max_box_acc_matches_numpy(multi_contour):
    rng = np.random.default_rng(5)
    maps, gts = blob_maps(rng, 12)
    cams = np.linspace(0, 1, 21)
    want = np_max_box_acc(maps, gts, (0.3, 0.5, 0.7), cams, multi_contour)
    assert 0 < want["maxboxacc@70"] < want["maxboxacc@30"] < 1
    metric = MaxBoxAccV2(cam_thresholds=cams, multi_contour=multi_contour)
    metric.update(torch.from_numpy(maps[:5]).float(), [torch.from_numpy(g) for g in gts[:5]])
    metric.update(torch.from_numpy(maps[5:]).float(), [torch.from_numpy(g) for g in gts[5:]])
    assert_dict_close(metric.compute(), want)
    assert metric.box_accuracy().shape == (21, 3)


def test_max_box_acc_hand_computed():
    cam = torch.zeros(1, 8, 8)
    cam[0, 1:3, 1:3] = 1.0  # a strong 2x2 blob
    cam[0, 5:8, 4:8] = 0.6  # a weaker 3x4 blob
    gts = [torch.tensor([[4.0, 5, 8, 8]])]  # the weaker blob is the object
    # t = 0.5: both blobs; only multi-contour finds the second (IoU 1); the largest component *is* the weak blob
    # t = 0.8: only the strong blob (IoU 0); t = 0: the whole image, IoU 12/64 < 0.3
    v2 = MF.max_box_acc(cam, gts, cam_thresholds=[0.0, 0.8])
    assert float(v2["maxboxacc_v2"]) == 0.0
    v2 = MF.max_box_acc(cam, gts, cam_thresholds=[0.0, 0.5, 0.8])
    assert float(v2["maxboxacc_v2"]) == 1.0
    ious = MF.cam_threshold_box_ious(cam[0], gts[0], [0.0, 0.5, 0.8], multi_contour=True)
    torch.testing.assert_close(ious, torch.tensor([12 / 64, 1.0, 0.0], dtype=torch.float64))
    cam[0, 0:4, 0:4] = 1.0  # the strong blob becomes the largest: V1 at 0.5 now misses
    ious_v1 = MF.cam_threshold_box_ious(cam[0], gts[0], [0.5], multi_contour=False)
    assert float(ious_v1[0]) == 0.0


def test_max_box_acc_bad_input():
    metric = MaxBoxAccV2()
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((1, 4, 4), float("nan")), [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="one entry per sample"):
        metric.update(torch.zeros(2, 4, 4), [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MaxBoxAccV2(normalize=False).update(torch.full((1, 4, 4), 3.0), [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match="distinct"):
        MaxBoxAccV2(iou_thresholds=(0.5, 0.501))


# ---------------------------------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------------------------------


def test_recall_at_k_matches_numpy():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(40, 60))
    target = rng.integers(0, 60, 40)
    scores[np.arange(40), target] += 1.5  # make the task non-trivial but imperfect
    exclude = np.where(rng.random(40) < 0.5, (target + 1 + rng.integers(0, 59, 40)) % 60, -1)
    for ex in (None, exclude):
        want = np_recall(scores, target, (1, 5, 10, 50), ex)
        metric = RecallAtK()
        for chunk in np.array_split(np.arange(40), 3):
            metric.update(
                torch.from_numpy(scores[chunk]).float(),
                torch.from_numpy(target[chunk]),
                None if ex is None else torch.from_numpy(ex[chunk]),
            )
        assert_dict_close(metric.compute(), want)


def test_recall_at_k_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.5, 0.9], [0.1, 0.2, 0.3]])
    target = torch.tensor([1, 0, 0])
    exclude = torch.tensor([0, -1, 2])
    # q0: the better item is excluded -> rank 0; q1: 0.9 above, tie counts against -> rank 2; q2: rank 1 after exclusion
    out = MF.recall_at_k(scores, target, k=(1, 2, 3), exclude=exclude)
    assert {k: round(float(v), 4) for k, v in out.items()} == {"R@1": 0.3333, "R@2": 0.6667, "R@3": 1.0}


def test_recall_at_k_bad_input():
    metric = RecallAtK()
    with pytest.raises(ValueError, match=r"target must have shape \[2\]"):
        metric.update(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="exclude must never equal target"):
        metric.update(torch.zeros(2, 5), torch.tensor([0, 1]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((2, 5), float("nan")), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------------------
# faithfulness
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "steps", "batch_size"), [("deletion", 7, 5), ("insertion", 10, 64)])
def test_deletion_insertion_curves_match_numpy(mode, steps, batch_size):
    rng = np.random.default_rng(7)
    image = rng.normal(size=(3, 3, 6, 5))
    maps = np.round(rng.random((3, 6, 5)) * 4) / 4  # ties: broken in raster order
    weights = rng.normal(size=(3, 3, 6, 5))
    baseline = np.broadcast_to(rng.normal(size=(3, 1, 1)), image.shape)
    w = torch.from_numpy(weights)

    def score_fn(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        assert images.shape[0] <= batch_size
        return (images * w[index]).sum((1, 2, 3))

    curves = deletion_insertion_curves(
        score_fn,
        torch.from_numpy(image),
        torch.from_numpy(maps),
        steps=steps,
        mode=mode,
        baseline=torch.from_numpy(baseline[0, :, :1, :1].copy()),
        batch_size=batch_size,
    )
    want = np_curves(weights, image, maps, steps, mode, baseline)
    np.testing.assert_allclose(curves.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(auc(curves).numpy(), np_auc(want), rtol=1e-5, atol=1e-5)

    metric = DeletionInsertionAUC()
    metric.update(curves[:2])
    metric.update(auc(curves[2:]))
    assert float(metric.compute()) == pytest.approx(np_auc(want).mean(), abs=1e-5)


def test_deletion_insertion_endpoints_and_blur():
    image = torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)

    def score_fn(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return images.mean((1, 2, 3)) + index

    dele = deletion_insertion_curves(score_fn, image, maps, steps=4, mode="deletion", baseline="zeros")
    torch.testing.assert_close(dele[:, 0], image.mean((1, 2, 3)) + torch.arange(2))
    torch.testing.assert_close(dele[:, -1], torch.arange(2.0))
    ins = deletion_insertion_curves(score_fn, image, maps, steps=4, mode="insertion", baseline="blur")
    torch.testing.assert_close(ins[:, -1], dele[:, 0])
    assert not torch.allclose(ins[:, 0], dele[:, 0])  # starts from the blurred image


def test_auc_and_contrastive_gap_hand_computed():
    curves = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(auc(curves), torch.tensor([0.5, 1.0]))
    # A drops from 1 to 0 (mean drop 0.5); B stays flat at 3 (drop 0): A drops 0.5 faster
    gap = contrastive_deletion_gap(curves[:1], torch.tensor([[3.0, 3.0, 3.0]]))
    torch.testing.assert_close(gap, torch.tensor([0.5]))


def test_faithfulness_bad_input():
    image, maps = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)

    def score_fn(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return images.mean((1, 2, 3))

    with pytest.raises(ValueError, match="upsample the maps"):
        deletion_insertion_curves(score_fn, image, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        deletion_insertion_curves(score_fn, image, torch.full((2, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="mode"):
        deletion_insertion_curves(score_fn, image, maps, mode="sideways")
    with pytest.raises(ValueError, match="score_fn must return"):
        deletion_insertion_curves(lambda x, i: x.mean(), image, maps)
    with pytest.raises(ValueError, match="at least 2 points"):
        auc(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="values must be curves"):
        DeletionInsertionAUC().update(torch.zeros(1, 2, 3))


# ---------------------------------------------------------------------------------------------------------------------
# the torchmetrics contract
# ---------------------------------------------------------------------------------------------------------------------

EMPTY_BATCHES = {
    "region": (lambda: RegionAccuracy(4), (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))),
    "referring": (lambda: ReferringAccuracy(), (torch.zeros(0, 4), torch.zeros(0, 4))),
    "agreement": (lambda: MapMaskAgreement(), (torch.zeros(0, 3, 3), torch.zeros(0, 3, 3))),
    "boxloc": (
        lambda: BoxLocalization(),
        (torch.zeros(0, 4), [], torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
    ),
    "maxboxacc": (lambda: MaxBoxAccV2(), (torch.zeros(0, 3, 3), [])),
    "recall": (lambda: RecallAtK(), (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))),
    "faithfulness": (lambda: DeletionInsertionAUC(), (torch.zeros(0, 5),)),
}


@pytest.mark.parametrize("name", list(EMPTY_BATCHES))
def test_empty_batch_is_a_no_op(name):
    factory, batch = EMPTY_BATCHES[name]
    metric = factory()
    metric.update(*batch)
    value = metric.compute()
    values = value.values() if isinstance(value, dict) else [value]
    assert all(bool(torch.isnan(v)) for v in values)  # no samples: NaN, not 0


def test_metric_collection_keys_and_forward():
    collection = MetricCollection(
        {"cls": RegionAccuracy(3, top_k=(1,)), "agree": MapMaskAgreement(), "deletion": DeletionInsertionAUC()},
        prefix="val/",
    )
    collection.update(
        logits=torch.eye(3),
        target=torch.tensor([0, 1, 1]),
        maps=torch.rand(3, 4, 4),
        masks=torch.ones(3, 4, 4),
        values=torch.rand(3),  # each metric receives the arguments its update names
    )
    keys = ["val/top1", "val/mean_class_top1", "val/map_miou", "val/map_dice", "val/pointing_game"]
    assert set(collection.compute()) == {*keys, "val/energy_pointing_game", "val/deletion"}

    metric = RegionAccuracy(3, top_k=(1,))
    batch = metric(torch.eye(3), torch.tensor([0, 1, 1]))  # forward: this batch only
    metric(torch.eye(3), torch.tensor([0, 1, 2]))
    assert float(batch["top1"]) == pytest.approx(2 / 3)
    assert float(metric.compute()["top1"]) == pytest.approx(5 / 6)


def test_map_mask_agreement_absent_maps_are_misses_even_when_the_mask_covers_everything():
    """``present=False`` scores 0 everywhere without planting pixels: also for a mask that covers the whole map."""
    maps = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, 6, 6, dtype=torch.bool)
    masks[0] = True  # no pixel outside the mask: a planted "outside" pixel could not exist here
    masks[1, :3] = True
    masks[2, 2:5, 1:4] = True
    present = torch.tensor([False, True, False])
    scores = MF.map_mask_scores(maps, masks, present=present)
    plain = MF.map_mask_scores(maps, masks)
    for key in ("iou", "dice", "energy"):
        assert scores[key][0] == 0 and scores[key][2] == 0, key
        assert scores[key][1] == plain[key][1], key
    assert scores["pointing"].tolist() == [False, bool(plain["pointing"][1]), False]
    assert bool(plain["pointing"][0])  # without the flag the map points inside the all-covering mask
    metric = MapMaskAgreement()
    metric.update(maps, masks, present)
    out = metric.compute()
    assert float(out["pointing_game"]) == pytest.approx(float(plain["pointing"][1]) / 3)
    with pytest.raises(ValueError, match="present must be bool"):
        MF.map_mask_scores(maps, masks, present=torch.ones(2, dtype=torch.bool))


def test_iteration_curve():
    from regionembed.metrics import IterationCurve

    metric = IterationCurve(steps=2)
    logits = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [T=2, N=2, C=2]
    metric.update(logits, torch.tensor([1, 0]), torch.tensor([[0.8, 0.6], [0.4, 0.2]]))
    out = metric.compute()
    assert torch.allclose(out["top1"], torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(out["dice"], torch.tensor([0.7, 0.3], dtype=torch.float64))
    with pytest.raises(ValueError, match="logits"):
        metric.update(logits[:1], torch.tensor([1, 0]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="steps"):
        IterationCurve(steps=0)


def test_explainer_localization_every_component_picks_the_best_matching_box():
    """VL-Score authors' protocol: every component is a candidate and the best match to the ground truth counts."""
    from regionembed.metrics import ExplainerLocalization, localization_queries

    maps = torch.zeros(1, 16, 16)
    maps[0, 1:9, 1:9] = 1.0  # the largest component, away from the object
    maps[0, 11:14, 11:14] = 0.9  # a small component on the object
    maps[0, 9, 9] = 0.9  # touches the large block only diagonally: 8-connected it joins it, 4-connected it does not
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 11:14, 11:14] = True
    boxes = torch.tensor([[11.0, 11.0, 14.0, 14.0]])
    queries = localization_queries(torch.tensor([2.0, 0.0]), torch.tensor([0]), masks, boxes, (1,))
    image = torch.zeros(1, 3, 16, 16)

    def gt_known(**kwargs) -> float:
        metric = ExplainerLocalization(faithfulness=False, top_k=(1,), **kwargs)
        metric.update(image, maps, torch.ones(1, dtype=torch.bool), queries, seconds_per_map=0.0)
        return float(metric.compute()["gt_known_loc"])

    assert gt_known() == 0.0  # the largest component's box misses the object
    assert gt_known(every_component=True, box_connectivity=4) == 1.0
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        ExplainerLocalization(faithfulness=False, box_connectivity=6).update(
            image, maps, torch.ones(1, dtype=torch.bool), queries, seconds_per_map=0.0
        )
