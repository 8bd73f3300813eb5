"""SyntheticDataModule's single-object curriculum: phases in order, pairs kept together, resumable."""

import pytest

from regionembed.backbones.base import PreprocessSpec
from regionembed.data import SyntheticDataModule, WorldConfig
from regionembed.data.synthetic_module import CurriculumDataset

SPEC = PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _module(**kwargs):
    dm = SyntheticDataModule(
        world=WorldConfig(image_size=32, size_range=(0.3, 0.5)),
        train_size=8,
        val_size=0,
        test_size=0,
        batch_size=4,
        preprocess=SPEC,
        **kwargs,
    )
    dm.setup("fit")
    return dm


def test_single_object_phase_comes_first_in_order():
    dm = _module(single_object_images=8, hard_negatives=True)
    dataset = dm.datasets["train"]
    assert isinstance(dataset, CurriculumDataset) and dataset.ordered and dataset.block == 2
    assert len(dataset) == 16
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 4
    first = [c for b in batches[:2] for c in b["caption"]]
    assert all(" and " not in c and "," not in c for c in first)  # one object per caption
    assert first == [dataset[i]["caption"] for i in range(8)]  # read in order: the curriculum is not shuffled
    pairs = [c for b in batches[2:] for c in b["caption"]]
    assert pairs == [dataset[i]["caption"] for i in range(8, 16)]


def test_class_captions():
    dataset = _module(single_object_images=4, single_object_caption="a {}.").datasets["train"]
    item = dataset[0]
    assert item["caption"] == f"a {item['texts'][0]}."
    assert dataset[4]["caption"].endswith("background")  # the second phase keeps scene captions


def test_curriculum_alone():
    dm = SyntheticDataModule(
        world=WorldConfig(image_size=32, size_range=(0.3, 0.5)),
        train_size=0,
        val_size=0,
        test_size=0,
        single_object_images=8,
        batch_size=4,
        preprocess=SPEC,
    )
    assert dm.has_split("train")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and len(list(dm.train_dataloader())) == 2


def test_without_curriculum_nothing_changes():
    dataset = _module().datasets["train"]
    assert not getattr(dataset, "ordered", False) and len(dataset) == 8


def test_bad_curriculum_settings():
    with pytest.raises(ValueError, match="single_object_images"):
        SyntheticDataModule(single_object_images=-1)
    with pytest.raises(ValueError, match="even"):
        SyntheticDataModule(single_object_images=3, hard_negatives=True, batch_size=4, train_size=8)
    with pytest.raises(ValueError, match="placeholder"):
        SyntheticDataModule(single_object_images=4, single_object_caption="a shape")
