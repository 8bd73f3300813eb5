"""ContrastiveDeletionGap: against a numpy loop reference, on a contrastive map with a known answer, and bad input
(the 2-process test is tests/integration/test_faithfulness_ddp.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regionembed.metrics import ContrastiveDeletionGap, contrastive_deletion_gap, deletion_insertion_curves

N = 9


def reference_gap(curve_a: np.ndarray, curve_b: np.ndarray) -> tuple[float, float, float]:
    """Mean gap, mean drop of A, mean drop of B with an explicit trapezoid loop."""

    def drop(curve: np.ndarray) -> float:
        s = len(curve) - 1
        area = sum((curve[i] + curve[i + 1]) / 2 / s for i in range(s))
        return float(curve[0] - area)

    da = [drop(c) for c in curve_a]
    db = [drop(c) for c in curve_b]
    return float(np.mean(np.subtract(da, db))), float(np.mean(da)), float(np.mean(db))


def make_curves(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 7, generator=g, dtype=torch.float64), torch.rand(N, 7, generator=g, dtype=torch.float64)


def test_matches_a_numpy_loop_reference_over_several_updates():
    a, b = make_curves()
    metric = ContrastiveDeletionGap().set_dtype(
        torch.float64
    )  # keep float64 states; the result is in the default dtype
    for sl in (slice(0, 4), slice(4, 5), slice(5, N)):
        metric.update(a[sl], b[sl])
    out = metric.compute()
    gap, drop_a, drop_b = reference_gap(a.numpy(), b.numpy())
    assert out["contrastive_gap"].item() == pytest.approx(gap, abs=1e-6)
    assert out["target_drop"].item() == pytest.approx(drop_a, abs=1e-6)
    assert out["contrast_drop"].item() == pytest.approx(drop_b, abs=1e-6)
    torch.testing.assert_close(
        out["contrastive_gap"].double(), contrastive_deletion_gap(a, b).mean(), rtol=0, atol=1e-6
    )


def test_a_map_that_separates_the_classes_has_a_positive_gap():
    # class A's score is the mean of the left half of the image, class B's of the right half; the map A - B is
    # positive on the left, so deleting along it removes A's evidence first
    h = w = 8
    image = torch.rand(4, 3, h, w, generator=torch.Generator().manual_seed(1)) + 0.5
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    contrast = (left - (1 - left)).expand(4, h, w)
    score_a = lambda x, i: (x * left).mean((1, 2, 3))  # noqa: E731
    score_b = lambda x, i: (x * (1 - left)).mean((1, 2, 3))  # noqa: E731
    metric = ContrastiveDeletionGap()
    curve_a = deletion_insertion_curves(score_a, image, contrast, steps=8)
    curve_b = deletion_insertion_curves(score_b, image, contrast, steps=8)
    metric.update(curve_a, curve_b)
    assert metric.compute()["contrastive_gap"] > 0
    reverse = ContrastiveDeletionGap()
    reverse.update(
        deletion_insertion_curves(score_a, image, -contrast, steps=8),
        deletion_insertion_curves(score_b, image, -contrast, steps=8),
    )
    assert reverse.compute()["contrastive_gap"] < 0


def test_nan_before_update_and_bad_input():
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(ContrastiveDeletionGap().compute()["contrastive_gap"])
    metric = ContrastiveDeletionGap()
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((2, 5), float("nan")), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2 points"):
        metric.update(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"\[B, S \+ 1\]"):
        metric.update(torch.zeros(5), torch.zeros(5))
