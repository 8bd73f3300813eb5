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


def test_identical_caption_embeddings_give_clip_loss_and_its_gradient():
    """When equal captions embed identically (a deterministic text tower: open_clip's has no dropout by default), the
    multi-positive target changes neither the loss nor its gradient: ``log p`` is the same for every positive of a
    group. Only the in-batch accuracy (ties between identical captions) differs."""
    image, words = _features(n=6, d=8, seed=1)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    scale = torch.tensor(5.0)
    grads = []
    for loss_fn in (lambda i, t: multi_positive_clip_loss(i, t, scale, groups), lambda i, t: ClipLoss()(i, t, scale)):
        img, word = image.clone().requires_grad_(True), words.clone().requires_grad_(True)
        loss = loss_fn(img, word[groups])  # one embedding per caption, repeated for its images
        loss.backward()
        grads.append((loss.detach(), img.grad, word.grad))
    for ours, clip in zip(*grads, strict=True):
        torch.testing.assert_close(ours, clip, atol=1e-6, rtol=1e-5)
    # with different embeddings for equal captions (dropout, templates) the two losses differ
    assert not torch.allclose(multi_positive_clip_loss(image, words, scale, groups), ClipLoss()(image, words, scale))


def test_shape_mismatch_is_an_error():
    image, text = _features()
    with pytest.raises(ValueError, match="differ"):
        multi_positive_clip_loss(image, text[:5], torch.tensor(1.0), torch.arange(6))
