"""The synthetic world: determinism, exact masks, occlusion, verified referring expressions, triplets, datasets."""

from __future__ import annotations

import re

import numpy as np
import pytest

from regionembed.data.synthetic import (
    COLOURS,
    SyntheticCaptions,
    SyntheticReferring,
    SyntheticRegions,
    SyntheticTriplets,
    SyntheticWorld,
    WorldConfig,
)

N_SCENES = 150


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(WorldConfig(), seed=0)


@pytest.fixture(scope="module")
def scenes(world):
    return [world.scene(i) for i in range(N_SCENES)]


# ----------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_scene_in_any_order(world):
    fresh = SyntheticWorld(WorldConfig(), seed=0)
    late = [fresh.scene(i) for i in (7, 3, 0)]  # other order, other instance
    for scene in late:
        ref = world.scene(scene.index)
        np.testing.assert_array_equal(scene.image, ref.image)
        np.testing.assert_array_equal(scene.masks(), ref.masks())
        np.testing.assert_array_equal(scene.boxes(), ref.boxes())
        assert scene.caption == ref.caption and scene.names == ref.names


def test_different_seed_or_index_differs(world):
    other = SyntheticWorld(WorldConfig(), seed=1)
    assert all(not np.array_equal(world.scene(i).image, other.scene(i).image) for i in range(5))
    assert not np.array_equal(world.scene(0).image, world.scene(1).image)


def test_negative_index_rejected(world):
    with pytest.raises(IndexError, match=">= 0"):
        world.scene(-1)


# -------------------------------------------------------------------------------------------------- scene contract


def test_objects_masks_boxes_consistent(world, scenes):
    cfg = world.config
    for scene in scenes:
        h, w = scene.image.shape[:2]
        assert scene.image.dtype == np.uint8 and scene.image.shape == (cfg.image_size, cfg.image_size, 3)
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        masks, boxes = scene.masks(), scene.boxes()
        assert masks.dtype == np.uint8 and masks.shape == (len(scene.objects), h, w)
        assert boxes.dtype == np.float32 and boxes.shape == (len(scene.objects), 4)
        assert masks.sum(0).max() <= 1  # visible masks never overlap
        for obj, mask, box in zip(scene.objects, masks, boxes, strict=True):
            x1, y1, x2, y2 = (int(v) for v in box)
            assert obj.area == mask.sum() > 0
            assert mask[y1:y2, x1:x2].sum() == obj.area  # the mask lies inside its box ...
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()  # ... and the box is tight
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
            assert not (obj.mask & ~obj.silhouette).any()
            np.testing.assert_array_equal(scene.image[obj.mask], np.broadcast_to(obj.rgb, (obj.area, 3)))
            assert np.abs(np.subtract(obj.rgb, COLOURS[obj.colour])).max() <= cfg.colour_jitter
            assert obj.size == cfg.size_name(obj.scale) and obj.name == f"{obj.colour} {obj.shape}"


def test_size_names_are_tertiles():
    cfg = WorldConfig(size_range=(0.15, 0.45))
    assert [cfg.size_name(s) for s in (0.15, 0.24, 0.26, 0.34, 0.36, 0.45)] == ["small"] * 2 + ["medium"] * 2 + [
        "large"
    ] * 2


def test_background_never_resembles_an_object_colour(world, scenes):
    refs = np.asarray([COLOURS[c] for c in world.config.colours], np.float64)
    for scene in scenes[:40]:
        background = scene.image[scene.masks().sum(0) == 0].astype(np.float64)
        dist = np.linalg.norm(background[:, None] - refs[None], axis=-1)
        assert dist.min() > 60, scene


def test_no_overlap_and_a_gap_without_occlusion(scenes):
    for scene in scenes:
        sils = [o.silhouette for o in scene.objects]
        for i, a in enumerate(sils):
            grown = a.copy()
            grown[1:] |= a[:-1]
            grown[:-1] |= a[1:]
            grown[:, 1:] |= a[:, :-1]
            grown[:, :-1] |= a[:, 1:]
            assert all(not (grown & b).any() for b in sils[i + 1 :])
            np.testing.assert_array_equal(scene.objects[i].mask, a)


def test_occlusion_bound_respected():
    world = SyntheticWorld(WorldConfig(occlusion=0.3, min_objects=3, max_objects=4), seed=5)
    overlapped = 0
    for i in range(80):
        for obj in world.scene(i).objects:
            hidden = 1 - obj.area / obj.silhouette.sum()
            assert hidden <= 0.3 + 1e-9
            overlapped += hidden > 0
    assert overlapped > 0  # the bound is exercised, not trivially met


def test_distractors_are_painted_but_not_labelled():
    world = SyntheticWorld(WorldConfig(distractors=3, background="plain"), seed=2)
    found = False
    for i in range(20):
        scene = world.scene(i)
        free = scene.masks().sum(0) == 0
        for colour in world.config.distractor_colours:
            found |= bool((scene.image[free] == COLOURS[colour]).all(-1).any())
        assert not {o.colour for o in scene.objects} & set(world.config.distractor_colours)
    assert found


def test_caption_lists_objects_and_background(scenes):
    words = {"plain": "plain", "gradient": "gradient", "noise": "noisy"}
    for scene in scenes:
        assert scene.caption.endswith(f"{words[scene.background]} background")
        numbers = {2: "two", 3: "three", 4: "four"}
        for name in set(scene.names):
            count = scene.names.count(name)
            phrase = (
                (("an " if name[0] in "aeiou" else "a ") + name) if count == 1 else f"{numbers[count]} {_plural(name)}"
            )
            assert re.search(rf"(^|\s){phrase}( |,)", scene.caption), (phrase, scene.caption)


def test_plain_caption_phrasing():
    world = SyntheticWorld(WorldConfig(caption_variants=False, min_objects=2, max_objects=2), seed=0)
    scene = world.scene(0)
    a, b = (("an " if n[0] in "aeiou" else "a ") + n for n in scene.names)
    expected = f"two {_plural(scene.names[0])}" if scene.names[0] == scene.names[1] else f"{a} and {b}"
    assert scene.caption.startswith(expected) and scene.caption.endswith("background")


# --------------------------------------------------------------------------------------------------------- classes


def test_class_names_stable(world):
    names = world.class_names
    assert len(names) == 36 and names == sorted(names) and len(set(names)) == 36
    assert names[:3] == ["blue circle", "blue cross", "blue hexagon"]
    assert world.class_index("red circle") == 24 and world.class_index("yellow triangle") == 35
    assert SyntheticWorld(seed=9).class_names == names  # independent of the seed
    with pytest.raises(KeyError, match="unknown class"):
        world.class_index("pink circle")


# ------------------------------------------------------------------------------------------- referring expressions


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _matches_head(obj, head: str) -> bool:
    return head in (obj.shape, obj.name)


def _resolve_anchor(objects, text: str) -> int:
    """The object an anchor description ("the star", "the red star") names; it must name exactly one."""
    hits = [k for k, o in enumerate(objects) if text == f"the {o.shape}"] or [
        k for k, o in enumerate(objects) if text == f"the {o.name}"
    ]
    assert len(hits) == 1, f"anchor {text!r} is ambiguous: {hits}"
    return hits[0]


def _clearly_bigger(a, b, ratio: float) -> bool:
    return a.scale >= ratio * b.scale and a.area > b.area


def _independent_referents(objects, text: str, margin: float, ratio: float) -> set[int]:
    """Re-derive which objects ``text`` describes, from the objects alone (a check of the generator)."""
    centers = np.asarray([o.box_center for o in objects])
    n = len(objects)
    if m := re.fullmatch(r"the (larger|smaller) of the two (.+)", text):
        group = [k for k in range(n) if _plural(objects[k].shape) == m[2] or _plural(objects[k].name) == m[2]]
        assert len(group) == 2
        a, b = group
        if m[1] == "larger":
            return {k for k, other in ((a, b), (b, a)) if _clearly_bigger(objects[k], objects[other], ratio)}
        return {k for k, other in ((a, b), (b, a)) if _clearly_bigger(objects[other], objects[k], ratio)}
    if m := re.fullmatch(r"the (largest|smallest) (.+)", text):
        group = [k for k in range(n) if _matches_head(objects[k], m[2])]
        if m[1] == "largest":
            return {k for k in group if all(_clearly_bigger(objects[k], objects[j], ratio) for j in group if j != k)}
        return {k for k in group if all(_clearly_bigger(objects[j], objects[k], ratio) for j in group if j != k)}
    if m := re.fullmatch(r"the (leftmost|rightmost|topmost|bottommost) (.+)", text):
        axis = 0 if m[1] in ("leftmost", "rightmost") else 1
        sign = 1 if m[1] in ("leftmost", "topmost") else -1
        group = [k for k in range(n) if _matches_head(objects[k], m[2])]
        return {
            k for k in group if all(sign * (centers[j, axis] - centers[k, axis]) >= margin for j in group if j != k)
        }
    if m := re.fullmatch(r"the (.+?) (left of|right of|above|below) (the .+)", text):
        a = _resolve_anchor(objects, m[3])
        axis = 0 if m[2] in ("left of", "right of") else 1
        sign = 1 if m[2] in ("left of", "above") else -1
        group = [k for k in range(n) if _matches_head(objects[k], m[1]) and k != a]
        offsets = {k: sign * (centers[a, axis] - centers[k, axis]) for k in group}
        clear = {k for k, off in offsets.items() if off >= margin}
        loose = {k for k, off in offsets.items() if off > 0}
        # Any object satisfying the relation only loosely (within the margin) makes the expression ambiguous.
        return clear if loose == clear else loose | {-1}
    if m := re.fullmatch(r"the (.+)", text):
        return {k for k in range(n) if _matches_head(objects[k], m[1])}
    raise AssertionError(f"unparsed expression {text!r}")


def test_referring_expressions_unique_and_correct(world, scenes):
    cfg = world.config
    margin = cfg.relation_margin * cfg.image_size
    kinds = set()
    for scene in scenes:
        for ambiguous_only in (True, False):
            refs = world.referring_expressions(scene, ambiguous_only=ambiguous_only)
            assert len({r.text for r in refs}) == len(refs)
            for ref in refs:
                kinds.add(ref.kind)
                found = _independent_referents(scene.objects, ref.text, margin, cfg.size_ratio)
                assert found == {ref.target}, (scene, ref, found)
                if ambiguous_only:  # the bare shape noun would not do
                    assert scene.names and sum(o.shape == scene.objects[ref.target].shape for o in scene.objects) >= 2
                if ref.kind == "relation":
                    assert ref.anchor is not None and ref.anchor != ref.target
    assert kinds == {"category", "attribute", "size", "ordinal", "relation"}


def test_referring_expression_examples():
    # A hand-checkable scene: find one with a relation and look at the geometry directly.
    world = SyntheticWorld(WorldConfig(shape_repeat=0.8, min_objects=3, max_objects=4), seed=3)
    for i in range(100):
        scene = world.scene(i)
        rel = [r for r in world.referring_expressions(scene) if r.kind == "relation" and " left of " in r.text]
        if rel:
            target, anchor = scene.objects[rel[0].target], scene.objects[rel[0].anchor]
            assert target.box_center[0] <= anchor.box_center[0] - world.config.relation_margin * 64
            return
    pytest.fail("no 'left of' relation in 100 scenes")


# ------------------------------------------------------------------------------------------------------- triplets


def _check_triplet(world, t) -> None:
    ref, tgt, changed = t.reference, t.target, t.changed_mask.astype(bool)
    assert t.changed_mask.dtype == np.uint8 and t.changed_mask.shape == ref.image.shape[:2]
    np.testing.assert_array_equal(ref.image[~changed], tgt.image[~changed])  # identical outside the change
    assert (ref.image[changed] != tgt.image[changed]).any(-1).any()  # and the change is visible
    np.testing.assert_array_equal(ref.backdrop, tgt.backdrop)
    if t.kind in ("colour", "shape"):
        before, after = ref.objects[t.changed_reference], tgt.objects[t.changed]
        assert t.changed == t.changed_reference and len(ref.objects) == len(tgt.objects)
        if t.kind == "colour":
            assert before.shape == after.shape and before.colour != after.colour and after.colour in t.modifier
            np.testing.assert_array_equal(before.mask, after.mask)
        else:
            assert before.colour == after.colour and before.shape != after.shape
            assert f"{after.colour} {after.shape}" in t.modifier
        others = [k for k in range(len(ref.objects)) if k != t.changed]
        assert [ref.objects[k].name for k in others] == [tgt.objects[k].name for k in others]
    elif t.kind == "remove":
        assert t.changed == -1 and len(tgt.objects) == len(ref.objects) - 1
    else:
        assert t.changed_reference == -1 and t.changed == len(ref.objects) == len(tgt.objects) - 1
        assert tgt.objects[t.changed].name in t.modifier
    if t.changed_reference >= 0:  # the modifier names the edited object uniquely in the reference
        names = world.referring_expressions(ref, ambiguous_only=False)
        assert any(r.target == t.changed_reference and r.text in t.modifier for r in names)


def test_triplets_change_only_the_edited_region(world):
    kinds = set()
    for i in range(60):
        t = world.triplet(i)
        kinds.add(t.kind)
        _check_triplet(world, t)
        ref = world.scene(i)
        np.testing.assert_array_equal(t.reference.image, ref.image)
    assert kinds == {"colour", "shape"}
    again = world.triplet(7)
    np.testing.assert_array_equal(again.target.image, world.triplet(7).target.image)
    assert again.modifier == world.triplet(7).modifier


def test_triplets_all_kinds_with_occlusion():
    world = SyntheticWorld(WorldConfig(triplet_kinds=("colour", "shape", "remove", "add"), occlusion=0.25), seed=4)
    kinds = set()
    for i in range(80):
        t = world.triplet(i)
        kinds.add(t.kind)
        _check_triplet(world, t)
    assert kinds == {"colour", "shape", "remove", "add"}


# ------------------------------------------------------------------------------------------------------- datasets


def test_regions_dataset(world):
    ds = SyntheticRegions(world, start=10, length=5)
    assert len(ds) == 5
    item = ds[0]
    n = len(item["texts"])
    assert item["image"].dtype == np.uint8 and item["image"].shape == (64, 64, 3)
    assert item["masks"].dtype == np.uint8 and item["masks"].shape == (n, 64, 64)
    assert item["boxes"].dtype == np.float32 and item["boxes"].shape == (n, 4)
    assert item["labels"].dtype == np.int64 and item["labels"].shape == (n,)
    assert [world.class_names[k] for k in item["labels"]] == item["texts"]
    assert item["caption"] == world.scene(10).caption and item["image_id"] == "synthetic-s0-00000010"
    np.testing.assert_array_equal(ds[-1]["image"], world.scene(14).image)
    with pytest.raises(IndexError):
        ds[5]


def test_splits_do_not_overlap(world):
    train, val = SyntheticRegions(world, 0, 20), SyntheticRegions(world, 20, 10)
    ids = [train[i]["image_id"] for i in range(len(train))] + [val[i]["image_id"] for i in range(len(val))]
    assert len(set(ids)) == 30
    with pytest.raises(ValueError, match="length"):
        SyntheticRegions(world, 0, 0)


def test_captions_dataset(world):
    item = SyntheticCaptions(world, 0, 3)[1]
    assert set(item) == {"image", "caption", "image_id"}
    ds = SyntheticCaptions(world, 0, 3, region=True)
    item = ds[1]
    assert item["mask"].dtype == np.uint8 and item["mask"].shape == (64, 64) and item["mask"].any()
    assert item["box"].dtype == np.float32 and item["box"].shape == (4,)
    assert item["label"].dtype == np.int64 and world.class_names[item["label"]] == item["text"]
    assert item["text"] in world.scene(1).names
    np.testing.assert_array_equal(ds[1]["mask"], item["mask"])  # the region is deterministic


def test_referring_dataset(world):
    ds = SyntheticReferring(world, 0, 30)
    assert len(ds) > 0
    for k in range(min(len(ds), 5)):
        item = ds[k]
        n = item["masks"].shape[0]
        assert item["masks"].dtype == np.uint8 and item["boxes"].shape == (n, 4) and 0 <= item["target"] < n
        np.testing.assert_array_equal(item["mask"], item["masks"][item["target"]])
        np.testing.assert_array_equal(item["box"], item["boxes"][item["target"]])
        assert item["text"].startswith("the ") and item["image"].shape == (64, 64, 3)


def test_triplets_dataset(world):
    item = SyntheticTriplets(world, 5, 2)[0]
    t = world.triplet(5)
    np.testing.assert_array_equal(item["reference"], t.reference.image)
    np.testing.assert_array_equal(item["target"], t.target.image)
    assert item["changed_mask"].dtype == np.uint8 and item["changed_mask"].shape == (64, 64)
    assert item["modifier"] == t.modifier and item["kind"] in ("colour", "shape")


# ------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_objects": 3, "max_objects": 2}, r"min_objects \(3\) must not exceed max_objects \(2\)"),
        ({"shapes": ("circle", "blob")}, r"unknown shapes \['blob'\]"),
        ({"colours": ("red", "mauve")}, r"unknown colours \['mauve'\]"),
        ({"colours": ("slate", "dark grey")}, "too similar"),
        ({"colours": ("red", "grey")}, "too close to colour 'grey'"),
        ({"occlusion": 1.0}, "occlusion"),
        ({"size_range": (0.5, 0.2)}, "size_range"),
        ({"background": "stripes"}, "unknown background"),
        ({"triplet_kinds": ("colour", "rotate")}, r"unknown triplet_kinds \['rotate'\]"),
        ({"shapes": ("circle", "circle")}, "duplicates"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**kwargs)


def test_config_from_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SyntheticWorld, "world")
    cfg = parser.parse_args(["--world.seed=3", "--world.config.max_objects=2", "--world.config.shapes=[circle, star]"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    world = instantiate(cfg).world
    assert isinstance(world, SyntheticWorld) and world.seed == 3
    assert world.config.shapes == ("circle", "star") and world.config.max_objects == 2
    assert all({o.shape for o in world.scene(i).objects} <= {"circle", "star"} for i in range(5))
