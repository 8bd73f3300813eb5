import pytest
import torch

from regionembed.data.samplers import ResumableSampler


def test_order_is_a_function_of_seed_and_epoch():
    data = list(range(10))
    a, b = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    assert list(a) == list(b) and sorted(a) == data
    a.set_epoch(1)
    assert list(a) != list(b)


def test_skip_applies_once():
    data = list(range(10))
    full = list(ResumableSampler(data, seed=1))
    sampler = ResumableSampler(data, seed=1)
    sampler.skip(4)
    assert len(sampler) == 10  # the epoch's length: Lightning counts from the restored batch index
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the next epoch is whole again
    with pytest.raises(ValueError):
        sampler.skip(-1)


def test_more_ranks_than_samples_still_gives_every_rank_a_share():
    shares = [list(ResumableSampler([0], num_replicas=4, rank=r)) for r in range(4)]
    assert shares == [[0], [0], [0], [0]]


def test_loader_state_round_trip():
    from regionembed.data.samplers import ResumableLoader

    data = list(range(12))
    sampler = ResumableSampler(data, seed=2)
    loader = ResumableLoader(data, batch_size=3, sampler=sampler, progress_fn=lambda: (1, 2))
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    sampler.set_epoch(1)
    expected = [b.tolist() for b in ResumableLoader(data, batch_size=3, sampler=sampler, progress_fn=lambda: (0, 0))]
    fresh = ResumableLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=2), progress_fn=lambda: (0, 0))
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == expected[2:]
    end = ResumableLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=2), progress_fn=lambda: (0, 0))
    end.load_state_dict({"epoch": 0, "batches": 4})  # saved at the end of an epoch: nothing to skip
    assert len(list(end)) == 4
    with pytest.raises(TypeError):
        ResumableLoader(data, batch_size=3, progress_fn=lambda: (0, 0))


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
