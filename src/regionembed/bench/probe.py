"""Does a CLIP trained on the synthetic world know colours and shapes, through both of its pooling routes?

Classifies single-object test scenes (whole image) against the 36 class prompts and reports how often the class,
the colour and the shape of the prediction are right, for several templates and two image features:

- ``model``: the model's own pooling and projection (``encode_image``; [CLS] or average-token, per architecture);
- ``mean_tokens``: the mean of *all* output tokens through the head (``legrad_head``), the per-layer score LeGrad
  and MaskInversion differentiate. A model that classifies well only through the first route gives MaskInversion
  gradients with little class information (issue 13, point 4).

    python -m regionembed.bench probe [--weights regionembed:clip_synthetic] [--scenes 300]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..backbones.base import Backbone, TokenGridBackbone, require
from ..data import SyntheticWorld, WorldConfig
from ..io import preprocess_image
from ..text import encode_prompts

__all__ = ["TEST_SIZE", "TEST_START", "probe_synthetic_clip"]

#: the test range of configs/infer/region_cls_synthetic.yaml (after the train and val ranges)
TEST_START, TEST_SIZE = 57600 + 512, 500
TEMPLATES = ("{}", "a {}.", "a {} on a plain background")


def _scores(pred: list[int], labels: list[int], names: Sequence[str]) -> dict[str, float]:
    pairs = [(names[p].split(), names[t].split()) for p, t in zip(pred, labels, strict=True)]
    return {
        "accuracy": sum(p == t for p, t in pairs) / len(pairs),
        "colour": sum(p[0] == t[0] for p, t in pairs) / len(pairs),
        "shape": sum(p[1] == t[1] for p, t in pairs) / len(pairs),
    }


@torch.no_grad()
def probe_synthetic_clip(
    backbone: Backbone, scenes: int = 300, templates: Sequence[str] = TEMPLATES, world_seed: int = 0
) -> dict[str, Any]:
    """Zero-shot classification of the first ``scenes`` single-object scenes from ``TEST_START`` on.

    Returns:
        ``{"single_object_scenes", "test_regions", "templates": {template: {route: {accuracy, colour, shape}}}}``
        with routes ``model`` and ``mean_tokens``; ``test_regions`` counts the regions of the whole test split.
    """
    require(backbone, TokenGridBackbone, "The pooling probe")
    world = SyntheticWorld(WorldConfig(), seed=world_seed)
    names = world.class_names
    regions = sum(len(world.scene(i).objects) for i in range(TEST_START, TEST_START + TEST_SIZE))
    images, labels, index = [], [], TEST_START
    while len(images) < scenes:
        scene = world.scene(index)
        index += 1
        if len(scene.objects) == 1:
            images.append(preprocess_image(Image.fromarray(scene.image), backbone.preprocess))
            labels.append(world.class_index(scene.objects[0].name))
    tokens = backbone.forward_blocks(backbone.embed_tokens(torch.stack(images)))
    features = {
        "model": F.normalize(backbone.pool_tokens(tokens), dim=-1),
        "mean_tokens": F.normalize(backbone.legrad_head(tokens.mean(dim=1)), dim=-1),
    }
    report: dict[str, Any] = {"single_object_scenes": len(images), "test_regions": regions, "templates": {}}
    for template in templates:
        text = encode_prompts(backbone, names, [template])
        report["templates"][template] = {
            route: _scores((f @ text.T).argmax(1).tolist(), labels, names) for route, f in features.items()
        }
    return report


def main(argv: list[str] | None = None) -> None:
    from ..backbones import OpenCLIPBackbone

    parser = argparse.ArgumentParser(prog="python -m regionembed.bench probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="re-synth-vit", help="architecture (open_clip / regionembed config)")
    parser.add_argument("--weights", default="regionembed:clip_synthetic", help="weights file or regionembed:NAME")
    parser.add_argument("--scenes", type=int, default=300, help="single-object scenes to classify")
    args = parser.parse_args(argv)
    backbone = OpenCLIPBackbone(args.model, pretrained=args.weights).eval()
    print(json.dumps(probe_synthetic_clip(backbone, scenes=args.scenes), indent=2))
