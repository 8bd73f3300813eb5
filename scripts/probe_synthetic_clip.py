"""Why region methods plateau on the synthetic world: does the trained tiny CLIP know colours and shapes?

Classifies single-object test scenes from the whole image against the 36 class prompts and reports how often the
colour and the shape of the prediction are right, for several templates; also counts the regions of the test split
of configs/infer/region_cls_synthetic.yaml.

    python scripts/probe_synthetic_clip.py [--weights outputs/models/clip_synthetic.safetensors]
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image

from regionembed.backbones import OpenCLIPBackbone
from regionembed.data import SyntheticWorld, WorldConfig
from regionembed.io import preprocess_image
from regionembed.text import encode_prompts

TEST_START, TEST_SIZE = 57600 + 512, 500  # the test range of configs/infer/region_cls_synthetic.yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="outputs/models/clip_synthetic.safetensors")
    parser.add_argument("--scenes", type=int, default=300, help="single-object scenes to classify")
    args = parser.parse_args()
    backbone = OpenCLIPBackbone("re-small-vit", pretrained=args.weights).eval()
    world = SyntheticWorld(WorldConfig(), seed=0)
    names = world.class_names
    regions = sum(len(world.scene(i).objects) for i in range(TEST_START, TEST_START + TEST_SIZE))
    images, labels, index = [], [], TEST_START
    while len(images) < args.scenes:
        scene = world.scene(index)
        index += 1
        if len(scene.objects) == 1:
            images.append(preprocess_image(Image.fromarray(scene.image), backbone.preprocess))
            labels.append(world.class_index(scene.objects[0].name))
    report = {"test_regions": regions, "single_object_scenes": len(images), "templates": {}}
    with torch.no_grad():
        features = backbone.encode_image(torch.stack(images), normalize=True)
        for template in ["{}", "a {}.", "a {} on a plain background"]:
            pred = (features @ encode_prompts(backbone, names, [template]).T).argmax(1).tolist()
            pairs = [(names[p].split(), names[t].split()) for p, t in zip(pred, labels, strict=True)]
            report["templates"][template] = {
                "accuracy": sum(p == t for p, t in pairs) / len(pairs),
                "colour": sum(p[0] == t[0] for p, t in pairs) / len(pairs),
                "shape": sum(p[1] == t[1] for p, t in pairs) / len(pairs),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
