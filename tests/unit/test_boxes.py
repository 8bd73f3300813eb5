"""maps_to_boxes against hand-built maps: exact coordinates, threshold semantics, min_area, modes, bad input."""

import pytest
import torch

from regionembed.boxes import MapBoxes, empty_box, maps_to_boxes
from regionembed.metrics.functional import best_box_iou


def two_blobs() -> torch.Tensor:
    """A 20 x 30 map: a 4 x 6 blob of 1.0 (rows 2-5, cols 3-8) and a 3 x 3 blob of 0.8 (rows 10-12, cols 20-22)."""
    m = torch.zeros(20, 30)
    m[2:6, 3:9] = 1.0
    m[10:13, 20:23] = 0.8
    return m


def test_two_blobs_give_two_exact_boxes():
    out = maps_to_boxes(two_blobs(), threshold=0.5, mode="all")
    assert isinstance(out, MapBoxes)
    # xyxy with exclusive right/bottom edges; ordered by mass (24 > 7.2)
    torch.testing.assert_close(out.boxes, torch.tensor([[3.0, 2.0, 9.0, 6.0], [20.0, 10.0, 23.0, 13.0]]))
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.8]))
    assert out.areas.tolist() == [24, 9]


def test_largest_and_merge_modes():
    largest = maps_to_boxes(two_blobs(), threshold=0.5, mode="largest")
    torch.testing.assert_close(largest.boxes, torch.tensor([[3.0, 2.0, 9.0, 6.0]]))
    merged = maps_to_boxes(two_blobs(), threshold=0.5, mode="merge")
    torch.testing.assert_close(merged.boxes, torch.tensor([[3.0, 2.0, 23.0, 13.0]]))  # union box
    assert merged.areas.tolist() == [33]
    torch.testing.assert_close(merged.scores, torch.tensor([(24 + 9 * 0.8) / 33]))


def test_largest_is_by_pixel_count_not_by_value():
    m = torch.zeros(10, 10)
    m[0, 0] = 1.0  # the peak, one pixel
    m[5:9, 5:9] = 0.9  # 16 pixels
    torch.testing.assert_close(maps_to_boxes(m, 0.5).boxes, torch.tensor([[5.0, 5.0, 9.0, 9.0]]))


def test_threshold_is_a_fraction_of_each_maps_maximum():
    m = two_blobs()
    # 0.8 / 1.0 = 0.8: the second blob is kept at threshold 0.8, dropped just above
    assert len(maps_to_boxes(m, threshold=0.8, mode="all").boxes) == 2
    assert len(maps_to_boxes(m, threshold=0.81, mode="all").boxes) == 1
    # scaling the map changes nothing: the threshold is relative to the maximum
    scaled = maps_to_boxes(m * 0.01, threshold=0.81, mode="all")
    assert len(scaled.boxes) == 1
    # threshold 0 keeps every pixel whose value is >= 0: one component covering the map
    torch.testing.assert_close(maps_to_boxes(m, threshold=0.0).boxes, torch.tensor([[0.0, 0.0, 30.0, 20.0]]))


def test_min_area_in_pixels_and_as_a_fraction():
    m = two_blobs()
    assert len(maps_to_boxes(m, 0.5, min_area=9, mode="all").boxes) == 2
    assert len(maps_to_boxes(m, 0.5, min_area=10, mode="all").boxes) == 1
    # 600 pixels: 9 / 600 = 0.015
    assert len(maps_to_boxes(m, 0.5, min_area=0.015, mode="all").boxes) == 2
    assert len(maps_to_boxes(m, 0.5, min_area=0.016, mode="all").boxes) == 1
    assert len(maps_to_boxes(m, 0.5, min_area=25, mode="all").boxes) == 0
    merged = maps_to_boxes(m, 0.5, min_area=10, mode="merge")
    torch.testing.assert_close(merged.boxes, torch.tensor([[3.0, 2.0, 9.0, 6.0]]))  # only kept components merge


def test_diagonal_neighbours_are_one_component():
    m = torch.zeros(6, 6)
    m[1, 1] = m[2, 2] = m[3, 3] = 1.0
    out = maps_to_boxes(m, 0.5, mode="all")
    torch.testing.assert_close(out.boxes, torch.tensor([[1.0, 1.0, 4.0, 4.0]]))


def test_batch_gives_one_result_per_map_and_empty_maps_give_no_box():
    maps = torch.stack([two_blobs(), torch.zeros(20, 30), -two_blobs()])
    out = maps_to_boxes(maps, 0.5, mode="all")
    assert [len(o.boxes) for o in out] == [2, 0, 0]
    assert out[1].boxes.shape == (0, 4) and out[1].scores.shape == (0,)


def test_nms_drops_overlapping_boxes():
    m = torch.zeros(20, 20)
    m[2:12, 2:4] = 1.0  # a vertical bar and a wider bar right next to it, separated by a zero column
    m[2:12, 5:8] = 0.9
    assert len(maps_to_boxes(m, 0.5, mode="all").boxes) == 2
    # IoU of the two boxes is 0: NMS at 0.5 keeps both; two nested components overlap
    ring = torch.zeros(20, 20)
    ring[2:18, 2:18] = 1.0
    ring[4:16, 4:16] = 0.0
    ring[8:12, 8:12] = 0.9  # inside the ring: its box lies within the ring's box
    assert len(maps_to_boxes(ring, 0.5, mode="all").boxes) == 2
    kept = maps_to_boxes(ring, 0.5, mode="all", nms_iou=0.0)
    torch.testing.assert_close(kept.boxes, torch.tensor([[2.0, 2.0, 18.0, 18.0]]))


def test_boxes_score_against_ground_truth_with_the_shared_iou():
    box = maps_to_boxes(two_blobs(), 0.5).boxes
    assert float(best_box_iou(box, [torch.tensor([[3.0, 2.0, 9.0, 6.0]])])) == 1.0
    assert float(best_box_iou(empty_box(), [torch.tensor([[3.0, 2.0, 9.0, 6.0]])])) == 0.0


@pytest.mark.parametrize(
    ("maps", "kwargs", "match"),
    [
        (torch.zeros(4), {}, "shape"),
        (torch.zeros(1, 2, 4, 4), {}, "shape"),
        (torch.zeros(0, 5), {}, "at least one pixel"),
        (torch.tensor([[0.0, float("nan")]]), {}, "NaN"),
        (torch.tensor([[0.0, float("inf")]]), {}, "NaN"),
        (torch.ones(3, 3), {"threshold": 1.5}, "threshold"),
        (torch.ones(3, 3), {"min_area": -1}, "min_area"),
        (torch.ones(3, 3), {"mode": "biggest"}, "mode"),
        (torch.ones(3, 3), {"nms_iou": 2.0}, "nms_iou"),
    ],
)
def test_bad_input_raises(maps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        maps_to_boxes(maps, **kwargs)


def test_component_boxes_is_the_one_boxing_of_maps_and_maxboxacc():
    """One connected-component boxing serves maps_to_boxes and MaxBoxAccV2: boxes = masks_to_boxes + 1, 8-connected."""
    from torchvision.ops import masks_to_boxes

    from regionembed.boxes import component_boxes
    from regionembed.metrics.functional import cam_threshold_box_ious

    fg = torch.zeros(10, 12, dtype=torch.bool)
    fg[1:3, 1:4] = True
    fg[3, 4] = True  # touches the first component only diagonally: 8-connected, one component
    fg[6:9, 7:11] = True
    labels, boxes, areas = component_boxes(fg)
    assert boxes.dtype == torch.float64 and areas.tolist() == [7, 12]
    comps = torch.stack([torch.from_numpy(labels == k + 1) for k in range(2)])
    expected = masks_to_boxes(comps).double()
    expected[:, 2:] += 1
    torch.testing.assert_close(boxes, expected)
    empty_labels, empty_boxes, empty_areas = component_boxes(torch.zeros(4, 4, dtype=torch.bool))
    assert empty_boxes.shape == (0, 4) and empty_areas.numel() == 0 and not empty_labels.any()
    # the same components, seen through both users
    cam = fg.float()
    merged = maps_to_boxes(cam, threshold=0.5, mode="merge")
    torch.testing.assert_close(merged.boxes, torch.tensor([[1.0, 1, 11, 9]]))
    best = cam_threshold_box_ious(cam, expected[1:].float(), [0.5], multi_contour=True, normalize=False)
    assert best.tolist() == [1.0]
