import typing

import pytest
import torch
import torch.nn.functional as F

from conftest import make_masks
from regionembed.explainers import Explainer, GradCAM, LeGrad
from regionembed.inversion import STRATEGIES, MaskInversion, check_masks
from regionembed.inversion.solver import Strategy
from regionembed.losses import dice_loss


def test_result_shapes_and_loss_decreases(tiny_backbone):
    torch.manual_seed(0)
    masks = make_masks(3, 40, 30)
    res = MaskInversion(iterations=15)(tiny_backbone, torch.randn(1, 3, 32, 32), masks)
    assert res.embeddings.shape == (3, tiny_backbone.embed_dim)
    assert res.maps.shape == (3, 40, 30)
    assert res.loss_history.shape == (16,)
    assert res.mask_loss.shape == (3,)
    assert res.loss_history[-1] < res.loss_history[0]
    torch.testing.assert_close(res.loss_history[-1], res.mask_loss.mean())


def test_defaults_reproduce_the_official_hyper_parameters():
    solver = MaskInversion()
    assert type(solver.explainer) is LeGrad
    legrad = solver.explainer
    assert (legrad.layers, legrad.eps, legrad.pooling) == ((-1,), 1e-12, "mean")
    assert (solver.lr, solver.iterations, solver.alpha, solver.weight_decay) == (0.5, 10, 0.0, 0.0)
    assert (solver.strategy, solver.memory_budget_mb) == ("auto", 2048.0)
    with pytest.raises(ValueError, match="unknown strategy"):
        MaskInversion(strategy="fast")
    with pytest.raises(ValueError, match="lr=0"):
        MaskInversion(lr=0)
    with pytest.raises(ValueError, match="memory_budget_mb=-1"):
        MaskInversion(memory_budget_mb=-1)


def test_strategy_type_lists_every_strategy():
    """The ``Literal`` jsonargparse validates YAML with and the strategy table cannot drift apart."""
    assert set(typing.get_args(Strategy)) == {"auto", *STRATEGIES}


def test_the_old_signature_says_what_changed(tiny_backbone):
    with pytest.raises(TypeError, match=r"MaskInversion\(\*\*settings\)\(backbone, image, masks\)"):
        MaskInversion(tiny_backbone)
    with pytest.raises(TypeError, match=r"solver\(backbone, image, masks\), got a Tensor first"):
        MaskInversion()(torch.randn(1, 3, 32, 32), make_masks(1, 8, 8), tiny_backbone)


def test_no_state_between_calls(tiny_backbone):
    solver = MaskInversion(iterations=3)
    image, masks = torch.randn(1, 3, 32, 32), make_masks(2, 32, 32)
    a, b = solver(tiny_backbone, image, masks), solver(tiny_backbone, image, masks)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    other = solver(tiny_backbone, image, make_masks(5, 20, 20, seed=3))
    assert other.embeddings.shape[0] == 5


def test_soft_masks_are_targets(tiny_backbone):
    masks = make_masks(2, 32, 32) * 0.6 + 0.1
    res = MaskInversion(iterations=2)(tiny_backbone, torch.randn(1, 3, 32, 32), masks)
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
    solver = MaskInversion(iterations=1)
    masks = make_masks(1, 8, 8)
    nan_image = torch.randn(1, 3, 32, 32)
    nan_image[..., 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solver(tiny_backbone, nan_image, masks)
    with pytest.raises(ValueError, match="one image"):
        solver(tiny_backbone, torch.randn(2, 3, 32, 32), masks)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        solver(tiny_backbone, torch.randn(1, 3, 30, 30), masks)


def test_runs_under_no_grad(tiny_backbone):
    with torch.no_grad():
        res = MaskInversion(iterations=2)(tiny_backbone, torch.randn(1, 3, 32, 32), make_masks(1, 8, 8))
    assert res.loss_history.numel() == 3


class _Detached(Explainer):
    differentiable = False

    def explain(self, backbone, image, targets, **kwargs):
        return torch.zeros(targets.shape[0], *image.shape[-2:])


def test_explainer_choice(tiny_backbone):
    with pytest.raises(ValueError, match="not differentiable"):
        MaskInversion(explainer=_Detached())
    legrad = LeGrad([0])
    assert MaskInversion(legrad).explainer is legrad  # used as given, never replaced
    with pytest.raises(ValueError, match=r"layers=\[5\]: layer index 5 is out of range"):
        MaskInversion(LeGrad([5]))(tiny_backbone, torch.randn(1, 3, 32, 32), make_masks(1, 8, 8))


@pytest.mark.parametrize("strategy", ["naive", "naive_lean", "per_step", "precomputed"])
def test_legrad_settings_are_honoured_by_every_strategy(tiny_backbone, strategy):
    """The solver's maps are exactly its LeGrad's, ``eps`` and ``layers`` included (they were once replaced)."""
    torch.manual_seed(0)
    image, masks = torch.randn(1, 3, 32, 32), make_masks(2, 32, 32)
    legrad = LeGrad(layers=[0, 1], eps=0.05)
    res = MaskInversion(legrad, strategy=strategy, iterations=2)(tiny_backbone, image, masks)
    assert res.strategy == strategy
    expected = legrad(tiny_backbone, image, F.normalize(res.embeddings, dim=-1))
    torch.testing.assert_close(res.maps, expected, atol=1e-5, rtol=0)
    # the same tokens under the default eps give other maps: the comparison above can fail
    default = LeGrad(layers=[0, 1])(tiny_backbone, image, F.normalize(res.embeddings, dim=-1))
    assert (default - expected).abs().max() > 1e-2


def test_fixed_strategies_need_the_official_legrad():
    for explainer in (GradCAM(normalize=False), LeGrad(pooling="model")):
        assert MaskInversion(explainer).strategy == "auto"
        with pytest.raises(ValueError, match=r"strategy 'per_step' computes the official LeGrad .*use strategy 'auto'"):
            MaskInversion(explainer, strategy="per_step")


def test_explainer_maps_drive_the_generic_path(tiny_backbone):
    torch.manual_seed(0)
    image, masks = torch.randn(1, 3, 32, 32), make_masks(2, 32, 32)
    gradcam = GradCAM(normalize=False)
    solver = MaskInversion(gradcam, iterations=2)
    assert solver.plan(tiny_backbone, 32, 2) == "explainer"
    res = solver(tiny_backbone, image, masks)
    assert res.strategy == "explainer"
    expected = gradcam(tiny_backbone, image, F.normalize(res.embeddings, dim=-1))
    torch.testing.assert_close(res.maps, expected, atol=1e-5, rtol=0)


def test_dice_loss_values():
    p = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    # 1 - (2*1 + 1) / (2 + 1 + 1)
    torch.testing.assert_close(dice_loss(p, t), torch.tensor(0.25))
    torch.testing.assert_close(dice_loss(p, t, reduction="none"), torch.tensor([0.25]))
    with pytest.raises(ValueError, match="differ in shape"):
        dice_loss(p, t[:, :2])
