import pytest
import torch

from regionembed.data.samplers import ResumableSampler


def test_order_is_a_function_of_seed_and_epoch():
    data = list(range(10))
    a, b = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    assert list(a) == list(b) and sorted(a) == data
    a.set_epoch(1)
    assert list(a) != list(b)


def test_skip_applies_once_and_lazily():
    data = list(range(10))
    full = list(ResumableSampler(data, seed=1))
    calls = []
    sampler = ResumableSampler(data, seed=1, skip_fn=lambda: calls.append(1) or 4)
    assert len(sampler) == 10 and not calls  # asked only when iterating
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the next epoch is whole again
    assert calls == [1]
    with pytest.raises(ValueError):
        sampler.skip(-1)


def test_blocks_stay_together_and_ranks_are_disjoint():
    data = list(range(12))
    order = list(ResumableSampler(data, seed=0, block=2))
    assert sorted(order) == data
    assert all(order[i] // 2 == order[i + 1] // 2 for i in range(0, 12, 2))
    shares = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=0, block=2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == data
    with pytest.raises(ValueError, match="multiple of block"):
        ResumableSampler(list(range(5)), block=2)


def test_uneven_ranks_are_padded_like_distributed_sampler():
    shares = [list(ResumableSampler(list(range(5)), num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 3
    assert set(shares[0]) | set(shares[1]) == set(range(5))


def test_edit_pairs_are_hard_negatives():
    import numpy as np

    from regionembed.data import SyntheticWorld, WorldConfig
    from regionembed.data.synthetic_module import SyntheticEditPairs

    world = SyntheticWorld(WorldConfig(image_size=32, size_range=(0.3, 0.5)), seed=0)
    pairs = SyntheticEditPairs(world, start=100, length=6)
    for k in range(3):
        ref, edit = pairs[2 * k], pairs[2 * k + 1]
        assert ref["caption"] != edit["caption"]
        changed = world.triplet(100 + k).changed_mask.astype(bool)
        assert np.array_equal(ref["image"][~changed], edit["image"][~changed])
    with pytest.raises(ValueError, match="even length"):
        SyntheticEditPairs(world, length=3)
    assert torch.tensor(pairs[0]["labels"]).dtype == torch.int64
