"""Every metric over 2 gloo processes (plain ``torch.distributed``, no Lightning) equals the single-process result.

Each rank updates with its share of one fixed dataset (an uneven 7 + 4 split, and 11 + 0 where rank 1 sees nothing),
``compute()`` syncs the states, and rank 0 saves the results for the test process to compare, exactly.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric

from regionembed.metrics import (
    BoxLocalization,
    DeletionInsertionAUC,
    MapMaskAgreement,
    MaxBoxAccV2,
    RecallAtK,
    ReferringAccuracy,
    RegionAccuracy,
    deletion_insertion_curves,
)

N = 11  # samples in the dataset
SPLITS = {"7+4": 7, "11+0": 11}  # samples on rank 0; rank 1 gets the rest
WORLD_SIZE = 2


def make_data() -> dict[str, object]:
    """A fixed dataset of ``N`` samples for every metric, identical in every process."""
    g = torch.Generator().manual_seed(0)
    h = w = 12
    boxes = torch.rand(N, 2, generator=g) * 8
    gt_boxes = torch.cat([boxes, boxes + 2 + torch.rand(N, 2, generator=g) * 4], 1)
    pred_boxes = (gt_boxes + torch.randn(N, 4, generator=g)).clamp_min(0)
    pred_boxes[:, 2:] = torch.maximum(pred_boxes[:, 2:], pred_boxes[:, :2])
    maps = torch.rand(N, h, w, generator=g) ** 2
    return {
        "logits": torch.randn(N, 6, generator=g),
        "labels": torch.randint(0, 6, (N,), generator=g),
        "labels_topk": torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(N)]),
        "pred_boxes": pred_boxes,
        "gt_boxes": [torch.cat([b[None], torch.tensor([[0.0, 0.0, 1.0, 1.0]])]) for b in gt_boxes],
        "pred_masks": torch.rand(N, h, w, generator=g) > 0.5,
        "gt_masks": torch.rand(N, h, w, generator=g) > 0.6,
        "maps": maps,
        "images": torch.rand(N, 3, h, w, generator=g),
        "weights": torch.randn(N, 3, h, w, generator=g),
        "scores": torch.randn(N, 20, generator=g),
        "target": torch.randint(0, 10, (N,), generator=g),
        "exclude": torch.where(torch.arange(N) % 2 == 0, torch.randint(10, 20, (N,), generator=g), -1),
    }


def build_metrics() -> dict[str, Metric]:
    return {
        "region": RegionAccuracy(6, top_k=(1, 5)),
        "ref_box": ReferringAccuracy(0.5),
        "ref_mask": ReferringAccuracy(0.3),
        "ref_index": ReferringAccuracy(),
        "agreement": MapMaskAgreement(0.5),
        "boxloc": BoxLocalization(0.5),
        "maxboxacc": MaxBoxAccV2(cam_thresholds=torch.linspace(0, 1, 11)),
        "recall": RecallAtK(k=(1, 5, 10)),
        "deletion": DeletionInsertionAUC(),
    }


def update_all(metrics: dict[str, Metric], data: dict, sl: slice) -> None:
    d = {k: v[sl] for k, v in data.items()}
    weights = d["weights"]
    metrics["region"].update(d["logits"], d["labels"])
    metrics["ref_box"].update(d["pred_boxes"], torch.stack([b[0] for b in d["gt_boxes"]]))
    metrics["ref_mask"].update(d["pred_masks"], d["gt_masks"])
    metrics["ref_index"].update(d["labels_topk"][:, 0], d["labels"] % 3)
    metrics["agreement"].update(d["maps"], d["gt_masks"])
    metrics["boxloc"].update(d["pred_boxes"], d["gt_boxes"], d["labels_topk"], d["labels"])
    metrics["maxboxacc"].update(d["maps"], d["gt_boxes"])
    metrics["recall"].update(d["scores"], d["target"], d["exclude"])
    curves = deletion_insertion_curves(
        lambda x, i: (x * weights[i]).sum((1, 2, 3)), d["images"], d["maps"], steps=6, batch_size=5
    )
    metrics["deletion"].update(curves)


def compute_all(metrics: dict[str, Metric]) -> dict[str, torch.Tensor]:
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        items = value.items() if isinstance(value, dict) else [("value", value)]
        out.update({f"{name}/{key}": v for key, v in items})
    return out


def _worker(rank: int, port: int, out_file: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        data = make_data()
        results = {}
        for split, cut in SPLITS.items():
            metrics = build_metrics()
            sl = slice(0, cut) if rank == 0 else slice(cut, N)
            if sl.stop > sl.start:  # a rank without data never calls update
                update_all(metrics, data, sl)
            results[split] = compute_all(metrics)
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_metrics_two_processes_equal_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out_file = tmp_path / "ddp_results.pt"
    mp.spawn(_worker, args=(_free_port(), str(out_file)), nprocs=WORLD_SIZE, join=True)
    ddp = torch.load(out_file)

    metrics = build_metrics()
    update_all(metrics, make_data(), slice(0, N))
    single = compute_all(metrics)
    assert not torch.isnan(single["ref_box/ref_acc"])
    assert torch.isnan(single["ref_index/ref_miou"])  # NaN by design: compared with equal_nan

    for split, results in ddp.items():
        assert results.keys() == single.keys(), split
        for key, value in single.items():
            torch.testing.assert_close(results[key], value, rtol=0, atol=0, equal_nan=True, msg=f"{split}: {key}")
