"""One MaskInversion solver, configured once in YAML, drives the module, the region method and the localization.

jsonargparse builds everything here from the same YAML text LightningCLI would read.
"""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser

from conftest import make_masks
from regionembed.explainers import GradCAM, LeGrad
from regionembed.explainers.mask_inversion import MaskInversionMaps
from regionembed.inversion import MaskInversion
from regionembed.modules import LocalizationModule, MaskInversionModule, RegionClassificationModule
from regionembed.regions import MaskInversionEmbedding

BACKBONE = {"class_path": "regionembed.backbones.OpenCLIPBackbone", "init_args": {"model_name": "re-tiny-vit"}}
SOLVER_YAML = """
class_path: regionembed.inversion.MaskInversion
init_args:
  explainer:
    class_path: regionembed.explainers.GradCAM
    init_args: {normalize: false}
  lr: 0.3
  iterations: 3
"""


def _build(config: dict):
    """Instantiate a LightningModule config (``class_path``/``init_args``) as LightningCLI does."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    return parser.instantiate(parser.parse_object({"model": config})).model


@pytest.fixture(scope="module")
def built():
    solver = yaml.safe_load(SOLVER_YAML)
    region_method = {"class_path": "regionembed.regions.MaskInversionEmbedding", "init_args": {"solver": solver}}
    maps = {"class_path": "regionembed.explainers.MaskInversionMaps", "init_args": {"solver": solver}}
    return {
        "module": _build(
            {
                "class_path": "regionembed.modules.MaskInversionModule",
                "init_args": {"backbone": BACKBONE, "solver": solver},
            }
        ),
        "regions": _build(
            {
                "class_path": "regionembed.modules.RegionClassificationModule",
                "init_args": {"backbone": BACKBONE, "methods": [region_method], "class_names": ["a", "b"]},
            }
        ),
        "localization": _build(
            {
                "class_path": "regionembed.modules.LocalizationModule",
                "init_args": {"backbone": BACKBONE, "mask_inversion": maps, "class_names": ["a", "b"]},
            }
        ),
    }


def test_yaml_explainer_reaches_every_solver(built):
    module, regions, localization = built["module"], built["regions"], built["localization"]
    assert isinstance(module, MaskInversionModule)
    assert isinstance(regions, RegionClassificationModule) and isinstance(regions.methods[0], MaskInversionEmbedding)
    assert isinstance(localization, LocalizationModule) and isinstance(localization.mask_inversion, MaskInversionMaps)
    solvers = [module.solver, regions.methods[0].solver, localization.mask_inversion.solver]
    for solver in solvers:
        assert isinstance(solver, MaskInversion)
        assert type(solver.explainer) is GradCAM and solver.explainer.normalize is False
        assert (solver.lr, solver.iterations) == (0.3, 3)
    assert solvers[0].settings() == solvers[1].settings() == solvers[2].settings()


def test_the_three_users_run_the_same_solver(built):
    """Same settings, same numbers: module, region method and localization maps; the maps are Grad-CAM's."""
    module, regions, localization = built["module"], built["regions"], built["localization"]
    backbone = module.backbone
    torch.manual_seed(0)
    image, masks = torch.randn(3, 32, 32), make_masks(2, 32, 32)
    out = module.invert({"image": image, "masks": masks, "image_id": "x", "region_names": ["m0", "m1"]})
    assert out["strategy"] == "explainer"
    embeddings = regions.methods[0](backbone, image, masks)
    maps = localization.mask_inversion(backbone, image[None], masks)
    torch.testing.assert_close(embeddings, out["embeddings"])
    torch.testing.assert_close(maps, out["maps"])
    gradcam = GradCAM(normalize=False)(backbone, image[None], F.normalize(out["embeddings"], dim=-1))
    torch.testing.assert_close(maps, gradcam, atol=1e-5, rtol=0)
    legrad = LeGrad()(backbone, image[None], F.normalize(out["embeddings"], dim=-1))
    assert (legrad - gradcam).abs().max() > 1e-2  # LeGrad's maps differ: the check above can fail


def test_a_python_solver_is_used_as_given(tiny_backbone):
    solver = MaskInversion(LeGrad(eps=0.05), iterations=1)
    assert MaskInversionModule(tiny_backbone, solver).solver is solver
    assert MaskInversionEmbedding(solver).solver is solver
    assert MaskInversionMaps(solver).solver is solver
    assert LocalizationModule(tiny_backbone, mask_inversion=MaskInversionMaps(solver)).mask_inversion.solver is solver
    assert MaskInversionModule(tiny_backbone).solver.settings() == MaskInversion().settings()  # the official one


def test_the_solver_is_part_of_the_run_fingerprint(tiny_backbone):
    """Outputs written with one explainer are not taken as up to date for another (the writer compares this)."""
    a = MaskInversionModule(tiny_backbone, MaskInversion(LeGrad(eps=0.05)))
    b = MaskInversionModule(tiny_backbone, MaskInversion(LeGrad(eps=0.01)))
    assert a.settings_fingerprint() != b.settings_fingerprint()
    same = MaskInversionModule(tiny_backbone, MaskInversion(LeGrad(eps=0.05)))
    assert a.settings_fingerprint() == same.settings_fingerprint()
