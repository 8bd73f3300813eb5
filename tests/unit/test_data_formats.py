"""Readers of on-disk dataset formats (COCO, RefCOCO, VOC XML), written here in their exact formats."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers.formats import REFS, VOC_XML, H, W, box_mask, write_coco, write_refcoco, write_voc
from regionembed.backbones.base import PreprocessSpec
from regionembed.data.coco import CocoRegions
from regionembed.data.modules import CocoRegionDataModule, RefCocoDataModule, VocBoxDataModule
from regionembed.data.refcoco import RefCocoExpressions, load_refs, safe_pickle_load
from regionembed.data.voc import VocBoxes

# pycocotools 2.0.x calls np.array(copy=False) internally under numpy 2: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPEC = PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")


# ---------------------------------------------------------------- fixtures in the exact on-disk formats


@pytest.fixture
def coco(tmp_path):
    """Images 1 (four annotations), 2 (one), 3 (none); categories with non-contiguous ids."""
    return write_coco(tmp_path)


# ---------------------------------------------------------------- COCO


def test_coco_masks_boxes_labels(coco):
    ds = CocoRegions(coco["images"], coco["ann_file"])
    assert len(ds) == 2  # image 3 has no annotation: skipped
    assert ds.class_names == ["person", "cat", "dog"]  # sorted category ids 1, 3, 5
    s = ds[0]
    assert s["image"].dtype == np.uint8 and s["image"].shape == (H, W, 3)
    assert s["image_id"] == "1" and s["ann_ids"].tolist() == [11, 12, 13]  # crowd 14 excluded
    assert s["labels"].tolist() == [2, 0, 1] and s["labels"].dtype == np.int64
    assert s["texts"] == ["dog", "person", "cat"]
    assert s["masks"].dtype == np.uint8 and s["masks"].shape == (3, H, W)
    np.testing.assert_array_equal(s["masks"][1], coco["masks"][12])  # compressed RLE, exact
    np.testing.assert_array_equal(s["masks"][2], coco["masks"][13])  # uncompressed RLE, exact
    polygon = s["masks"][0].astype(bool)  # rasterised polygon: the square up to its boundary pixels
    assert polygon[6:15, 11:20].all() and not polygon[:4].any() and not polygon[:, 22:].any()
    np.testing.assert_allclose(s["boxes"], [[10, 5, 20, 15], [5, 20, 25, 35], [30, 2, 48, 12]])
    assert s["boxes"].dtype == np.float32


def test_coco_options(coco):
    crowd = CocoRegions(coco["images"], coco["ann_file"], include_crowd=True)[0]
    assert crowd["ann_ids"].tolist() == [11, 12, 13, 14] and crowd["iscrowd"].tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(crowd["masks"][3], coco["masks"][14])
    cats = CocoRegions(coco["images"], coco["ann_file"], categories=["cat"])
    assert cats.class_names == ["cat"] and len(cats) == 2
    assert cats[0]["labels"].tolist() == [0] and cats[0]["ann_ids"].tolist() == [13]
    big = CocoRegions(coco["images"], coco["ann_file"], min_area=150)
    assert len(big) == 1 and big[0]["ann_ids"].tolist() == [12, 13]
    with pytest.raises(ValueError, match="horse"):
        CocoRegions(coco["images"], coco["ann_file"], categories=["horse"])


def test_coco_with_transform(coco):
    from regionembed.data.transforms import build_transform

    s = CocoRegions(coco["images"], coco["ann_file"], transform=build_transform(SPEC))[0]
    assert s["image"].shape == (3, 32, 32) and s["masks"].shape == (3, 32, 32)
    np.testing.assert_allclose(s["boxes"][1].numpy(), [5 * 32 / W, 20 * 32 / H, 25 * 32 / W, 35 * 32 / H], atol=1e-4)


def test_coco_errors_name_the_file(coco, tmp_path):
    (coco["images"] / "000000000002.png").unlink()
    ds = CocoRegions(coco["images"], coco["ann_file"])
    with pytest.raises(FileNotFoundError, match=r"000000000002\.png"):
        ds[1]
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"broken\.json"):
        CocoRegions(coco["images"], bad)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"broken\.json.*categories"):
        CocoRegions(coco["images"], bad)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        CocoRegions(coco["images"], tmp_path / "nowhere.json")
    data = json.loads(coco["ann_file"].read_text())
    data["images"][0]["width"] = W + 1
    wrong = tmp_path / "wrong_size.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"wrong_size\.json"):
        CocoRegions(coco["images"], wrong)[0]


# ---------------------------------------------------------------- RefCOCO


@pytest.fixture
def refcoco(coco, tmp_path):
    return write_refcoco(coco, tmp_path)


def test_refcoco_items(refcoco):
    ds = RefCocoExpressions(refcoco["images"], refcoco["ann_file"], refcoco["refs_file"], split="val")
    assert len(ds) == 3  # one item per (ref, sentence)
    s = ds[1]
    assert s["text"] == "person bottom left" and s["ref_id"] == 0 and s["sent_id"] == 101
    assert s["ann_ids"].tolist() == [11, 12, 13, 14]  # every annotation of the image is a candidate
    assert s["target_index"] == 1
    np.testing.assert_array_equal(s["masks"][s["target_index"]], refcoco["masks"][12])
    np.testing.assert_allclose(s["boxes"][s["target_index"]], [5, 20, 25, 35])
    assert s["texts"] == ["dog", "person", "cat", "person"] and s["labels"].tolist() == [2, 0, 1, 0]
    assert ds[2]["target_index"] == 2 and ds[2]["text"] == "cat top right"
    train = RefCocoExpressions(refcoco["images"], refcoco["ann_file"], refcoco["refs_file"], split="train")
    assert len(train) == 1 and train[0]["sent_id"] == -1 and train[0]["image_id"] == "2"


def test_refcoco_json_refs_and_errors(refcoco, tmp_path):
    as_json = tmp_path / "refs.json"
    as_json.write_text(json.dumps(REFS))
    assert load_refs(as_json) == REFS
    with pytest.raises(ValueError, match=r"testA.*\['train', 'val'\]"):
        RefCocoExpressions(refcoco["images"], refcoco["ann_file"], refcoco["refs_file"], split="testA")
    dangling = tmp_path / "dangling.p"
    dangling.write_bytes(pickle.dumps([{**REFS[0], "ann_id": 999}], protocol=2))
    with pytest.raises(ValueError, match=r"dangling\.p.*instances\.json"):
        RefCocoExpressions(refcoco["images"], refcoco["ann_file"], dangling)
    missing = tmp_path / "missing_field.p"
    missing.write_bytes(pickle.dumps([{"ref_id": 0}], protocol=2))
    with pytest.raises(ValueError, match=r"missing_field\.p"):
        load_refs(missing)
    truncated = tmp_path / "truncated.p"
    truncated.write_bytes(pickle.dumps(REFS, protocol=2)[:50])
    with pytest.raises(ValueError, match=r"truncated\.p"):
        load_refs(truncated)
    with pytest.raises(FileNotFoundError, match=r"absent\.p"):
        load_refs(tmp_path / "absent.p")


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0, "payload": Evil()}], protocol=2))
    with pytest.raises(ValueError, match=r"evil\.p.*refusing.*open"):
        load_refs(evil)
    assert not marker.exists()
    # Python 2 style protocol-0 pickle calling os.system
    shell = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        safe_pickle_load(shell)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        safe_pickle_load(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="OrderedDict"):
        safe_pickle_load(pickle.dumps(__import__("collections").OrderedDict(a=1)))
    plain = {"a": [1, 2.5, "x", None, True, (3, 4)], "n": {"k": -(2**70)}, "s": {1, 2}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert safe_pickle_load(pickle.dumps(plain, protocol=protocol)) == plain


# ---------------------------------------------------------------- VOC XML


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path)


def test_voc_boxes(voc):
    ds = VocBoxes(voc["images"], voc["anns"])
    assert ds.class_names == ["bird", "person", "tench"]
    s = ds[0]
    assert s["image_id"] == "2007_000001" and s["texts"] == ["person", "bird"]
    assert s["labels"].tolist() == [1, 0] and s["difficult"].tolist() == [0, 1]
    np.testing.assert_allclose(s["boxes"], [[10, 5, 20, 15], [29.5, 20, 45, 40]])  # 1-based inclusive -> xyxy
    np.testing.assert_array_equal(s["masks"][0], box_mask(10, 5, 20, 15))  # masks are the filled boxes
    np.testing.assert_array_equal(s["masks"][1], box_mask(29, 20, 45, 40))
    imagenet = ds[1]
    assert imagenet["image"].shape == (30, 36, 3) and imagenet["texts"] == ["tench", "bird"]
    np.testing.assert_allclose(imagenet["boxes"][1], [29.5, 20, 36, 30])  # clipped to the image
    zero_based = VocBoxes(voc["images"], voc["anns"], one_based=False)[0]
    np.testing.assert_allclose(zero_based["boxes"][0], [11, 6, 20, 15])


def test_voc_given_classes_skip_others(voc):
    ds = VocBoxes(voc["images"], voc["anns"], classes=["tench", "person"])
    assert len(ds) == 2
    assert ds[0]["labels"].tolist() == [1] and ds[0]["texts"] == ["person"]
    assert ds[1]["labels"].tolist() == [0]
    assert len(VocBoxes(voc["images"], voc["anns"], classes=["tench"])) == 1  # images without objects skipped


def test_voc_errors_name_the_file(voc, tmp_path):
    bomb = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<annotation><filename>&lol2;</filename></annotation>"""
    (voc["anns"] / "bomb.xml").write_text(bomb)
    with pytest.raises(ValueError, match=r"bomb\.xml.*DOCTYPE"):
        VocBoxes(voc["images"], voc["anns"])
    (voc["anns"] / "bomb.xml").write_text("<annotation><filename>x.png</filename><object>")
    with pytest.raises(ValueError, match=r"bomb\.xml.*well-formed"):
        VocBoxes(voc["images"], voc["anns"])
    no_box = "<annotation><filename>x.png</filename><object><name>a</name></object></annotation>"
    (voc["anns"] / "bomb.xml").write_text(no_box)
    with pytest.raises(ValueError, match=r"bomb\.xml.*bndbox"):
        VocBoxes(voc["images"], voc["anns"])
    (voc["anns"] / "bomb.xml").unlink()
    (voc["images"] / "2007_000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2007_000001\.xml.*2007_000001\.png"):
        VocBoxes(voc["images"], voc["anns"])[0]
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        VocBoxes(voc["images"], tmp_path / "no_such_dir")


# ---------------------------------------------------------------- DataModules


def test_coco_datamodule_fit_batches(coco):
    dm = CocoRegionDataModule(
        val_images=str(coco["images"]),
        val_ann_file=str(coco["ann_file"]),
        train_images=str(coco["images"]),
        train_ann_file=str(coco["ann_file"]),
        preprocess=SPEC,
        batch_size=2,
        seed=0,
    )
    dm.setup("fit")
    assert dm.class_names == ["person", "cat", "dog"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["num_regions"].tolist() == [3, 1] and batch["region_batch_index"].tolist() == [0, 0, 0, 1]
    assert batch["masks"].shape == (4, 32, 32) and batch["image_ids"] == ["1", "2"]

    def train_epochs(module):
        loader = module.train_dataloader()
        return [b["image"] for _ in range(2) for b in loader]

    first = train_epochs(dm)
    dm2 = CocoRegionDataModule(
        train_images=str(coco["images"]), train_ann_file=str(coco["ann_file"]), preprocess=SPEC, batch_size=2, seed=0
    )
    dm2.setup("fit")
    for a, b in zip(first, train_epochs(dm2), strict=True):
        torch.testing.assert_close(a, b)  # same seed, same augmentations and order
    assert not torch.equal(first[0], first[1])  # but a new crop every epoch


def test_datamodule_workers_get_distinct_seeds(voc):
    # two copies of one image, one per worker: identical crops would mean identical worker seeds
    for name in ("copy_a", "copy_b"):
        xml = VOC_XML.format(filename="2007_000001.png", w=W, h=H)
        (voc["anns"] / f"{name}.xml").write_text(xml)
    (voc["anns"] / "n01440764_18.xml").unlink()
    (voc["anns"] / "2007_000001.xml").unlink()
    dm = VocBoxDataModule(
        train_images=str(voc["images"]),
        train_annotations=str(voc["anns"]),
        preprocess=SPEC,
        batch_size=1,
        num_workers=2,
        seed=0,
    )
    dm.setup("fit")
    images = [b["image"] for b in dm.train_dataloader()]
    assert len(images) == 2 and not torch.equal(images[0], images[1])


def test_refcoco_and_voc_datamodules(refcoco, voc):
    dm = RefCocoDataModule(
        images=str(refcoco["images"]),
        instances_file=str(refcoco["ann_file"]),
        refs_file=str(refcoco["refs_file"]),
        preprocess=SPEC,
        batch_size=3,
    )
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["text"] == ["man on the left", "person bottom left", "cat top right"]
    assert batch["target_index"].tolist() == [1, 1, 2] and batch["num_regions"].tolist() == [4, 4, 4]
    vdm = VocBoxDataModule(val_images=str(voc["images"]), val_annotations=str(voc["anns"]), preprocess=SPEC)
    vdm.setup("validate")
    assert vdm.class_names == ["bird", "person", "tench"]
    assert next(iter(vdm.val_dataloader()))["difficult"].tolist() == [0, 1, 0, 1]
    # no reaching into the LightningModule: without `preprocess` (the CLIs link it) setup says how to give it
    no_spec = VocBoxDataModule(val_images=str(voc["images"]), val_annotations=str(voc["anns"]))
    backbone = SimpleNamespace(preprocess=PreprocessSpec(48, SPEC.mean, SPEC.std))
    no_spec.trainer = SimpleNamespace(lightning_module=SimpleNamespace(backbone=backbone), global_rank=0)
    with pytest.raises(ValueError, match=r"VocBoxDataModule has no `preprocess`.*preprocess=backbone\.preprocess"):
        no_spec.setup("validate")
    with pytest.raises(ValueError, match="train_annotations"):
        VocBoxDataModule(train_images=str(voc["images"]))
