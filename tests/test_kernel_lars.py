"""kernels/lars.py under the Triton interpreter: LARS over a flat buffer equals its reference and the
per-tensor optimizer over a grid of layouts and dtypes; LARS+EMA fused equals LARS then EMA; lr and tau
are read from tensors; the ops trace with no graph break."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastbyol.kernels import lars
from fastbyol.kernels.ema import ema_flat_
from fastbyol.kernels.lars import build_layout, lars_ema_flat, lars_ema_flat_ref, lars_flat, lars_flat_ref
from torch import nn

from fastbyol.model.flat import flatten_params_
from fastbyol.step.lars import LARS, lars_param_groups

TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
HYPER = dict(weight_decay=1.5e-6, momentum=0.9, eta=1e-3)

# (numel, excluded) per tensor, in flat order. Odd sizes, one element, an empty tensor, tensors spanning
# several chunks (the interpreter's chunk is 65,536 elements), and ResNet-50-like shapes: many BatchNorm
# vectors and biases (excluded) around a few large convolution / projector weights.
LAYOUTS = {
    "one-element": [(1, False)],
    "odd": [(7, False), (1, True), (4097, False), (0, False), (33, True), (65537, False)],
    "resnet50-like": ([(64 * 3 * 7 * 7, False), (64, True), (64, True)]
                      + [(c, True) for c in (256, 512, 1024, 2048) for _ in range(6)]
                      + [(512 * 2048, False), (2048 * 512, False), (2048 * 4096 // 16, False), (4096, True),
                         (4096, True), (256 * 4096 // 16, False), (256, True)]),
}


def _segments(spec: list[tuple[int, bool]], gap: int = 0) -> tuple[list[tuple[int, int, bool]], int]:
    segments, offset = [], 0
    for numel, excluded in spec:
        segments.append((offset, numel, excluded))
        offset += numel + gap
    return segments, offset


def _buffers(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=g).to(dtype)
    grad = (torch.randn(n, generator=g) * 1e-2).to(dtype)
    momentum_buf = (torch.randn(n, generator=g) * 1e-3).to(dtype)  # not zeros: the momentum term counts
    return param, grad, momentum_buf


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lars_equals_reference(name: str, dtype: torch.dtype) -> None:
    segments, n = _segments(LAYOUTS[name], gap=3)  # gaps: elements no tensor owns must stay untouched
    layout = build_layout(segments, "cpu")
    param, grad, momentum_buf = _buffers(n, dtype, seed=len(segments))
    lr = torch.tensor([0.4])
    start, want_p, want_m = param.clone(), param.clone(), momentum_buf.clone()
    lars_flat_ref(want_p, grad, want_m, layout, lr, **HYPER)
    lars_flat(param, grad, momentum_buf, layout, lr, **HYPER)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(param, want_p, atol=atol, rtol=rtol)
    torch.testing.assert_close(momentum_buf, want_m, atol=atol, rtol=rtol)
    if dtype == torch.float32:  # the momentum (the trust-scaled update) and the step itself, tightly
        torch.testing.assert_close(momentum_buf, want_m, atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(param - start, want_p - start, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ema_equals_lars_then_ema(name: str, dtype: torch.dtype) -> None:
    segments, n = _segments(LAYOUTS[name])
    layout = build_layout(segments, "cpu")
    param, grad, momentum_buf = _buffers(n, dtype, seed=7)
    n_paired = max(1, (2 * n) // 3)  # the online tower; predictor parameters follow it unpaired
    target = torch.randn(n_paired, generator=torch.Generator().manual_seed(8)).to(dtype)
    lr, tau = torch.tensor([0.2]), torch.tensor([0.99])
    unfused = [t.clone() for t in (param, momentum_buf, target)]
    ref = [t.clone() for t in (param, momentum_buf, target)]

    lars_ema_flat(param, grad, momentum_buf, layout, lr, **HYPER, target=target, tau=tau)
    lars_flat(unfused[0], grad, unfused[1], layout, lr, **HYPER)  # the unfused kernels: LARS, then EMA
    ema_flat_(unfused[2], unfused[0][:n_paired], tau)
    lars_ema_flat_ref(ref[0], grad, ref[1], layout, lr, **HYPER, target=ref[2], tau=tau)

    # Same arithmetic in the same order: fused and unfused kernels agree bit for bit.
    for got, exp in zip((param, momentum_buf, target), unfused):
        assert torch.equal(got, exp)
    atol, rtol = TOL[dtype]
    for got, exp in zip((param, momentum_buf, target), ref):
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol)


def test_flat_lars_equals_the_per_tensor_optimizer() -> None:
    """Three steps on a real module: the flat kernel and ``fastbyol.step.lars.LARS`` (foreach) agree."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    twin = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    twin.load_state_dict(model.state_dict())
    optimizer = LARS(lars_param_groups(twin.named_modules()), **HYPER)

    groups = lars_param_groups(model.named_modules())
    params = list(model.parameters())
    flat = flatten_params_(params)
    excluded = {id(p) for p in groups[1]["params"]}  # type: ignore[attr-defined]
    offsets = [p.data_ptr() // p.element_size() - flat.data_ptr() // flat.element_size() for p in params]
    layout = build_layout([(o, p.numel(), id(p) in excluded) for o, p in zip(offsets, params)], "cpu")
    grad_flat, momentum_flat = torch.zeros_like(flat), torch.zeros_like(flat)

    x = torch.randn(4, 3, 8, 8)
    for step in range(3):
        lr = 0.1 * (step + 1)
        model(x).square().mean().backward()
        twin(x).square().mean().backward()
        for p, o in zip(params, offsets):
            grad_flat[o:o + p.numel()] = p.grad.reshape(-1)  # type: ignore[union-attr]
            p.grad = None
        lars_flat(flat, grad_flat, momentum_flat, layout, torch.tensor([lr]), **HYPER)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_zero_norms_give_trust_one() -> None:
    """A zero parameter (trust would be 0/x) and a zero update (x/0) both fall back to r = 1, as lars_ref."""
    layout = build_layout([(0, 5, False), (5, 5, False)], "cpu")
    param = torch.cat([torch.zeros(5), torch.ones(5)])
    grad = torch.cat([torch.full((5,), 0.5), torch.zeros(5)])
    momentum_buf = torch.zeros(10)
    lars_flat(param, grad, momentum_buf, layout, torch.tensor([1.0]), weight_decay=0.0, momentum=0.9, eta=1e-3)
    torch.testing.assert_close(param, torch.cat([torch.full((5,), -0.5), torch.ones(5)]))


def test_lr_and_tau_are_read_from_tensors() -> None:
    layout = build_layout([(0, 4, True)], "cpu")
    param, grad, momentum_buf = torch.zeros(4), torch.ones(4), torch.zeros(4)
    target, lr, tau = torch.zeros(4), torch.tensor([1.0]), torch.tensor([0.5])
    lars_ema_flat(param, grad, momentum_buf, layout, lr, **HYPER, target=target, tau=tau)
    lr.fill_(2.0)
    tau.fill_(0.0)  # new values, same tensors: what the compiled step sees
    lars_ema_flat(param, grad, momentum_buf, layout, lr, **HYPER, target=target, tau=tau)
    # m: 1 then 1.9; p: -1 then -1 - 2 * 1.9 = -4.8; target: 0.5 * -1 = -0.5, then tau 0 -> p
    torch.testing.assert_close(param, torch.full((4,), -4.8))
    torch.testing.assert_close(target, torch.full((4,), -4.8))


def test_bad_arguments() -> None:
    layout = build_layout([(0, 4, False)], "cpu")
    lr = torch.tensor([0.1])
    with pytest.raises(ValueError, match="one length"):
        lars_flat(torch.zeros(4), torch.zeros(5), torch.zeros(4), layout, lr, **HYPER)
    with pytest.raises(ValueError, match="1-element"):
        lars_flat(torch.zeros(4), torch.zeros(4), torch.zeros(4), layout, torch.zeros(2), **HYPER)
    with pytest.raises(ValueError, match="no longer than"):
        lars_ema_flat(torch.zeros(4), torch.zeros(4), torch.zeros(4), layout, lr, **HYPER,
                      target=torch.zeros(5), tau=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="overlap"):
        build_layout([(0, 4, False), (2, 4, False)], "cpu")
    with pytest.raises(ValueError, match="exceed"):
        build_layout([(0, 4, False)], "cpu", chunk=lars.chunk_size("cpu") * 2)


def test_compiles_without_graph_break() -> None:
    segments, n = _segments(LAYOUTS["odd"])
    layout = build_layout(segments, "cpu")
    param, grad, momentum_buf = _buffers(n, torch.float32, seed=1)
    target, lr, tau = torch.randn(n // 2), torch.tensor([0.3]), torch.tensor([0.9])
    want = [t.clone() for t in (param, momentum_buf, target)]
    lars_ema_flat_ref(want[0], grad, want[1], layout, lr, **HYPER, target=want[2], tau=tau)

    def step(param: torch.Tensor, momentum_buf: torch.Tensor, target: torch.Tensor) -> None:
        lars_ema_flat(param, grad, momentum_buf, layout, lr, **HYPER, target=target, tau=tau)

    explanation = torch._dynamo.explain(step)(param.clone(), momentum_buf.clone(), target.clone())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.compile(step, fullgraph=True, backend="aot_eager")(param, momentum_buf, target)
    for got, exp in zip((param, momentum_buf, target), want):
        torch.testing.assert_close(got, exp, atol=2e-6, rtol=2e-6)


def test_opcheck() -> None:
    layout = build_layout([(0, 5, False), (6, 3, True)], "cpu")
    args = (torch.randn(9), torch.randn(9), torch.randn(9), *layout, torch.tensor([0.1]), 1e-6, 0.9, 1e-3)
    torch.library.opcheck(lars.lars_flat_, args)
    torch.library.opcheck(lars.lars_ema_flat_, (*args, torch.randn(4), torch.tensor([0.9])))


# -- sharded LARS (ZeRO partitions) ---------------------------------------------------------------------

def _sharded_step(segments: list[tuple[int, int, bool]], bounds: list[int], param: torch.Tensor,
                  grad: torch.Tensor, momentum_buf: torch.Tensor, lr: torch.Tensor, reduce: bool) -> None:
    """In place: each shard [bounds[i], bounds[i + 1]) computes its partial sums, they are summed (what
    the all-reduce does) unless ``reduce`` is False, and each shard applies the step."""
    layouts = [lars.shard_layout(segments, a, b, "cpu") for a, b in zip(bounds, bounds[1:])]
    sums = [lars.lars_shard_sums(param[a:b], grad[a:b], layout, HYPER["weight_decay"])
            for layout, a, b in zip(layouts, bounds, bounds[1:])]
    total = torch.stack(sums).sum(0)
    for layout, part, a, b in zip(layouts, sums, bounds, bounds[1:]):
        lars.lars_shard_apply(param[a:b], grad[a:b], momentum_buf[a:b], layout, total if reduce else part, lr,
                              **HYPER)


@pytest.mark.parametrize("name", ["odd", "resnet50-like"])
def test_sharded_lars_equals_unsharded(name: str) -> None:
    """Three shards cut mid-tensor: with the per-tensor sums all-reduced, the step equals the unsharded
    one; with each shard's own sums (what a naive LARS under ZeRO does), it does not."""
    segments, n = _segments(LAYOUTS[name])
    bounds = [0, n // 3 + 1, (2 * n) // 3 + 7, n]
    param, grad, momentum_buf = _buffers(n, torch.float32, seed=11)
    lr = torch.tensor([0.4])
    whole = [param.clone(), momentum_buf.clone()]
    lars_flat(whole[0], grad, whole[1], build_layout(segments, "cpu"), lr, **HYPER)
    sharded = [param.clone(), momentum_buf.clone()]
    _sharded_step(segments, bounds, sharded[0], grad, sharded[1], lr, reduce=True)
    torch.testing.assert_close(sharded[0], whole[0], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(sharded[1], whole[1], atol=1e-8, rtol=1e-5)
    naive = [param.clone(), momentum_buf.clone()]
    _sharded_step(segments, bounds, naive[0], grad, naive[1], lr, reduce=False)
    # Per-shard trust ratios: a different optimizer (even on iid data, where shard norms track the whole
    # tensor's: measured 6.8e-5 here, ~1000x the tolerance above).
    assert float((naive[1] - whole[1]).abs().max()) > 1e-5


def _gloo_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    segments, n = _segments(LAYOUTS["odd"])
    bounds = [0, n // 2 + 3, n]
    param, grad, momentum_buf = _buffers(n, torch.float32, seed=11)
    a, b = bounds[rank], bounds[rank + 1]
    layout = lars.shard_layout(segments, a, b, "cpu")
    shard = param[a:b].clone()
    sums = lars.lars_shard_sums(shard, grad[a:b], layout, HYPER["weight_decay"])
    dist.all_reduce(sums)  # T x 2 floats: the only communication the exact trust ratios need
    lars.lars_shard_apply(shard, grad[a:b], momentum_buf[a:b].clone(), layout, sums, torch.tensor([0.4]), **HYPER)
    torch.save(shard, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_lars_over_two_gloo_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    segments, n = _segments(LAYOUTS["odd"])
    param, grad, momentum_buf = _buffers(n, torch.float32, seed=11)
    lars_flat(param, grad, momentum_buf, build_layout(segments, "cpu"), torch.tensor([0.4]), **HYPER)
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)])
    torch.testing.assert_close(got, param, atol=2e-6, rtol=2e-6)
