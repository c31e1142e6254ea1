"""Sharding of the torchvision source: ranks split every global micro-batch, and a rank's samples are
the unsharded stream's (augmentation seeded by stream position, so the split changes nothing)."""

from __future__ import annotations

import torch

from fastbyol.config_parse import build_config
from fastbyol.data.loader import build_source


def test_torch_source_shards_partition_the_stream() -> None:
    cfg = build_config("smoke", overrides=["data.workers=0", "data.image_size=32", "data.num_images=40"]).data
    source = build_source(cfg, 0, torch.device("cpu"))
    whole = list(source.batches(36, 6, 2))  # crosses the epoch boundary at 40
    for rank in (0, 1, 2):
        part = list(source.batches(36, 2, 2, rank=rank, world=3))
        for step in range(2):
            rows = slice(2 * rank, 2 * rank + 2)
            assert torch.equal(part[step].views.view2, whole[step].views.view2[rows])
            assert torch.equal(part[step].labels, whole[step].labels[rows])  # type: ignore[index,arg-type]
