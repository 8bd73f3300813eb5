"""ContrastiveDeletionGap over 2 gloo processes (plain ``torch.distributed``, no Lightning) equals one process:
uneven shares (6 + 3) and a rank without samples (9 + 0)."""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regionembed.metrics import ContrastiveDeletionGap

N = 9


def make_curves(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 7, generator=g, dtype=torch.float64), torch.rand(N, 7, generator=g, dtype=torch.float64)


def _worker(rank: int, port: int, out_file: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        a, b = make_curves()
        results = {}
        for split, cut in {"6+3": 6, "9+0": N}.items():
            metric = ContrastiveDeletionGap()
            sl = slice(0, cut) if rank == 0 else slice(cut, N)
            if sl.stop > sl.start:
                metric.update(a[sl], b[sl])
            results[split] = metric.compute()
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_processes_equal_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out_file = tmp_path / "gap.pt"
    # fork, as DataLoader workers do on Linux: the children need no re-import (spawn costs ~10 s per process on a
    # busy 2-core machine); they use no CUDA and set one thread before any work
    mp.start_processes(_worker, args=(_free_port(), str(out_file)), nprocs=2, join=True, start_method="fork")
    ddp = torch.load(out_file)
    single = ContrastiveDeletionGap()
    single.update(*make_curves())
    expected = single.compute()
    for split, result in ddp.items():
        assert result.keys() == expected.keys(), split
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, rtol=0, atol=0, msg=f"{split}: {key}")
