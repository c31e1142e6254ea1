"""GlobalBatchNorm over 2 gloo ranks on the CPU: each rank holding half the batch gets the outputs, input
gradients, running statistics and (summed) affine gradients of one BatchNorm over the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastbyol.model.syncbn import GlobalBatchNorm, convert_global_batchnorm


def _case(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 6),
                          nn.BatchNorm1d(6))
    with torch.no_grad():  # non-trivial affine parameters and a mean far from 0 (the variance's hard case)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(8, 3, 6, 6) * 3 + 5
    target = torch.randn(8, 6)
    return model, x, target


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model, x, target = _case()
    convert_global_batchnorm(model)
    rows = slice(rank * 4, rank * 4 + 4)
    xs = x[rows].clone().requires_grad_(True)
    y = model(xs)
    # The global loss is the mean over all 8 rows; this rank's share is its rows' sum / 8.
    ((y - target[rows]).square().sum() / 8).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save({"y": y.detach(), "dx": xs.grad, "grads": grads, "state": model.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_one_batchnorm_over_the_whole_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    model, x, target = _case()
    x = x.clone().requires_grad_(True)
    y = model(x)
    ((y - target).square().sum() / 8).backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():  # data parallelism sums (DDP: averages) the ranks' grads
        torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], p.grad, atol=1e-5,
                                   rtol=1e-4, msg=name)
    for name, value in model.state_dict().items():  # running statistics of the global batch, on every rank
        for r in ranks:
            torch.testing.assert_close(r["state"][name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_single_process_and_eval_are_plain_batchnorm() -> None:
    model, x, _ = _case()
    twin, _, _ = _case()
    convert_global_batchnorm(twin)
    assert isinstance(twin[1], GlobalBatchNorm) and isinstance(twin[5], GlobalBatchNorm)
    assert twin[1].weight is not model[1].weight  # different modules, same values
    torch.testing.assert_close(twin(x), model(x))
    twin.eval()
    model.eval()
    torch.testing.assert_close(twin(x), model(x))


def test_conversion_keeps_the_parameter_tensors() -> None:
    bn = nn.BatchNorm2d(3)
    holder = nn.Sequential(bn)
    weight, running_mean = bn.weight, bn.running_mean
    convert_global_batchnorm(holder)
    assert holder[0].weight is weight and holder[0].running_mean is running_mean
