import dataclasses

import pytest
import torch

from conftest import make_masks
from regionembed.explainers import Explainer, LeGrad
from regionembed.inversion import MaskInversion, MaskInversionConfig, check_masks
from regionembed.losses import dice_loss


def test_result_shapes_and_loss_decreases(tiny_backbone):
    torch.manual_seed(0)
    masks = make_masks(3, 40, 30)
    res = MaskInversion(tiny_backbone, iterations=15)(torch.randn(1, 3, 32, 32), masks)
    assert res.embeddings.shape == (3, tiny_backbone.embed_dim)
    assert res.maps.shape == (3, 40, 30)
    assert res.loss_history.shape == (16,)
    assert res.mask_loss.shape == (3,)
    assert res.loss_history[-1] < res.loss_history[0]
    torch.testing.assert_close(res.loss_history[-1], res.mask_loss.mean())


def test_defaults_reproduce_the_official_hyper_parameters():
    cfg = MaskInversionConfig()
    assert (cfg.layers, cfg.lr, cfg.iterations, cfg.alpha, cfg.weight_decay) == ((-1,), 0.5, 10, 0.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    with pytest.raises(ValueError, match="unknown strategy"):
        MaskInversionConfig(strategy="fast")
    with pytest.raises(ValueError):
        MaskInversionConfig(lr=0)


def test_no_state_between_calls(tiny_backbone):
    solver = MaskInversion(tiny_backbone, iterations=3)
    image, masks = torch.randn(1, 3, 32, 32), make_masks(2, 32, 32)
    a, b = solver(image, masks), solver(image, masks)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    other = solver(image, make_masks(5, 20, 20, seed=3))
    assert other.embeddings.shape[0] == 5


def test_soft_masks_are_targets(tiny_backbone):
    masks = make_masks(2, 32, 32) * 0.6 + 0.1
    res = MaskInversion(tiny_backbone, iterations=2)(torch.randn(1, 3, 32, 32), masks)
    assert torch.isfinite(res.embeddings).all()


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        (torch.ones(32, 32), "rank 2"),
        (torch.ones(1, 1, 32, 32), "rank 4"),
        (torch.ones(0, 32, 32), "non-empty"),
        (torch.stack([torch.ones(8, 8), torch.zeros(8, 8)]), r"masks \[1\] are empty"),
        (torch.full((1, 8, 8), 255.0), "divide 0/255 masks by 255"),
        (torch.full((1, 8, 8), -0.5), r"\[0, 1\]"),
        (torch.tensor([[[float("nan"), 1.0]]]), "NaN"),
    ],
)
def test_bad_masks(masks, match):
    with pytest.raises(ValueError, match=match):
        check_masks(masks)


def test_bool_and_uint8_masks_accepted():
    assert check_masks(torch.ones(1, 4, 4, dtype=torch.bool)).dtype == torch.float32
    assert check_masks(torch.ones(1, 4, 4, dtype=torch.uint8)).max() == 1


def test_bad_images(tiny_backbone):
    solver = MaskInversion(tiny_backbone, iterations=1)
    masks = make_masks(1, 8, 8)
    nan_image = torch.randn(1, 3, 32, 32)
    nan_image[..., 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solver(nan_image, masks)
    with pytest.raises(ValueError, match="one image"):
        solver(torch.randn(2, 3, 32, 32), masks)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        solver(torch.randn(1, 3, 30, 30), masks)


def test_inference_mode_names_the_trainer_flag(tiny_backbone):
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"trainer\.inference_mode: false"):
        MaskInversion(tiny_backbone)(torch.randn(1, 3, 32, 32), make_masks(1, 8, 8))


def test_runs_under_no_grad(tiny_backbone):
    with torch.no_grad():
        res = MaskInversion(tiny_backbone, iterations=2)(torch.randn(1, 3, 32, 32), make_masks(1, 8, 8))
    assert res.loss_history.numel() == 3


class _Detached(Explainer):
    differentiable = False

    def explain(self, backbone, image, targets, **kwargs):
        return torch.zeros(targets.shape[0], *image.shape[-2:])


def test_explainer_choice(tiny_backbone):
    with pytest.raises(ValueError, match="not differentiable"):
        MaskInversion(tiny_backbone, explainer=_Detached())
    solver = MaskInversion(tiny_backbone, explainer=LeGrad([0]))
    assert solver.config.layers == (0,)


def test_dice_loss_values():
    p = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # 1 - (2*1 + 1) / (2 + 1 + 1)
    torch.testing.assert_close(dice_loss(p, t), torch.tensor(0.25))
    torch.testing.assert_close(dice_loss(p, t, reduction="none"), torch.tensor([0.25]))
    with pytest.raises(ValueError, match="differ in shape"):
        dice_loss(p, t[:, :2])
