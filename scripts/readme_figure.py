"""Make README's first picture, and the example image and masks its commands use, with `infer.py single`.

    python scripts/readme_figure.py                # embedded project-trained CLIP (--model synthetic)
    python scripts/readme_figure.py --model tiny   # pipeline check with a random model (meaningless maps)

Run from the repository root. Writes ``docs/example/scene.png`` and one mask per object in
``docs/example/masks/`` (a synthetic test scene the model never saw in training), runs the command README shows::

    python infer.py single docs/example/scene.png docs/example/masks/*.png --model synthetic \
        --prompts <the 36 class names> --templates "a {}." --model.init_args.solver.init_args.lr=0.1 \
        --output outputs/example

(``a {}.`` is the caption form the synthetic CLIP was trained on, and lr 0.1 the MaskInversion step that works best
on it: ``scripts/inversion_settings.py``; the official defaults are tuned for ViT-B/16 at 224 px.)

and draws ``docs/overview.png``: the scene, then per region the final MaskInversion map over the image with the
mask outlined, titled with the mask's true class and the best prompt (its probability).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from regionembed.cli import infer_main  # noqa: E402
from regionembed.data import SyntheticWorld, WorldConfig  # noqa: E402

SCENE_INDEX = 58_200  # in the test range of configs/infer/region_cls_synthetic.yaml (never trained on)
SCALE = 4  # 64 px scenes drawn at 256 px (nearest neighbour: the pixels the model saw)


def write_example(folder: Path, min_objects: int = 3) -> tuple[Path, list[Path], list[str]]:
    """The first test scene from SCENE_INDEX with at least ``min_objects`` objects; returns image, masks, classes."""
    world = SyntheticWorld(WorldConfig(), seed=0)
    index = SCENE_INDEX
    while len((scene := world.scene(index)).objects) < min_objects:
        index += 1
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for old in (folder / "masks").glob("*.png"):
        old.unlink()
    image = folder / "scene.png"
    Image.fromarray(scene.image).save(image)
    masks = []
    for i, obj in enumerate(scene.objects):
        path = folder / "masks" / f"{i}_{obj.colour}_{obj.shape}.png"
        Image.fromarray(obj.mask.astype(np.uint8) * 255).save(path)
        masks.append(path)
    return image, masks, world.class_names


def draw_figure(image: Path, out_dir: Path, target: Path) -> None:
    """Scene + one overlay per region with its best prompt; saved as PNG."""
    manifest = json.loads(next(out_dir.rglob("manifest.json")).read_text())
    folder = next(out_dir.rglob("manifest.json")).parent
    scene = Image.open(image).convert("RGB")
    side = scene.width * SCALE
    tiles = [("image\n(a test scene)", scene)]
    for region in manifest["regions"]:
        overlay = Image.open(folder / manifest["files"]["overlays"][region["name"]]).convert("RGB")
        p = region["prompt_probabilities"][region["best_prompt"]]
        truth = region["name"].split("_", 1)[-1].replace("_", " ")  # masks are named <index>_<colour>_<shape>
        tiles.append((f"mask: {truth}\nbest prompt: {region['best_prompt']} ({p:.2f})", overlay))
    canvas = Image.new("RGB", (len(tiles) * (side + 20) + 8, side + 58), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=17)
    for i, (title, tile) in enumerate(tiles):
        x = 8 + i * (side + 20)
        canvas.paste(tile.resize((side, side), Image.NEAREST), (x, 50))
        draw.multiline_text((x, 4), title, fill="black", font=font, spacing=4)
    target.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="synthetic", help="infer.py single --model (default: synthetic)")
    parser.add_argument("--example", type=Path, default=Path("docs/example"), help="where the example goes")
    parser.add_argument("--output", type=Path, default=Path("outputs/example"), help="infer.py single --output")
    parser.add_argument("--figure", type=Path, default=Path("docs/overview.png"), help="the picture")
    args = parser.parse_args()
    image, masks, classes = write_example(args.example)
    infer_main(
        [
            "single",
            str(image),
            *map(str, masks),
            "--model",
            args.model,
            "--prompts",
            *classes,
            "--templates",
            "a {}.",
            "--model.init_args.solver.init_args.lr=0.1",
            "--output",
            str(args.output),
            "--trainer.enable_progress_bar=false",
        ]
    )
    draw_figure(image, args.output, args.figure)
    print(f"wrote {args.figure} and the example in {args.example}")


if __name__ == "__main__":
    main()
