"""multi_positive_clip_loss against open_clip's ClipLoss and a direct reference."""

import pytest
import torch
import torch.nn.functional as F
from open_clip import ClipLoss

from regionembed.losses import multi_positive_clip_loss


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_distinct_captions_equal_clip_loss():
    image, text = _features()
    scale = torch.tensor(10.0)
    ours = multi_positive_clip_loss(image, text, scale, torch.arange(6))
    assert torch.allclose(ours, ClipLoss()(image, text, scale), atol=1e-6)


def test_repeated_captions_share_the_target():
    image, text = _features()
    scale = torch.tensor(5.0)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = scale * image @ text.T
    loss = 0.0
    for i in range(6):
        positives = (groups == groups[i]).nonzero()[:, 0]
        loss = loss - logits.log_softmax(1)[i, positives].mean() - logits.T.log_softmax(1)[i, positives].mean()
    assert torch.allclose(multi_positive_clip_loss(image, text, scale, groups), loss / 12, atol=1e-6)


def test_shape_mismatch_is_an_error():
    image, text = _features()
    with pytest.raises(ValueError, match="differ"):
        multi_positive_clip_loss(image, text[:5], torch.tensor(1.0), torch.arange(6))
