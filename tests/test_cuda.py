"""The checks that need a CUDA GPU, run by ``scripts/gpu_check.sh`` (``pytest -m cuda``; skipped with a reason
elsewhere): every Triton kernel compiled for the GPU against its plain-PyTorch reference, fp32/bf16/fp16, values
and gradients, at the sizes training uses as well as odd ones; the compiled training step (``run.compile=default``,
kernels off and on) and the CUDA-graph step (``reduce-overhead``) against eager; the DALI GPU-decode pipeline
against the torchvision one.

Each comparison is one function taking the device. The CUDA tests call it on the GPU; a few unmarked tests call
the same function on the CPU (kernels under TRITON_INTERPRET=1, tiny shapes, seconds), so the comparison code
itself is exercised here even though no GPU is. The input builders, tolerances and gradient checks are the
interpreter tests' (``tests/test_kernel_*.py``), imported, not copied.

Every GPU comparison prints one ``MEASURED <check> key=value ...`` line: gpu_check.sh keeps the captured output
in its junit XML and collects those lines, so the margins to the tolerances are on record after a run.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_kernel_byol_loss as byol_tests
import test_kernel_ema as ema_tests
import test_kernel_lars as lars_tests
import test_kernel_ntxent as ntxent_tests
import torch
from fastbyol.kernels import lars
from fastbyol.kernels.byol_loss import byol_loss, byol_loss_grad_p, byol_loss_ref, byol_loss_rows
from fastbyol.kernels.ema import ema_flat_, ema_flat_ref
from fastbyol.kernels.lars import build_layout, lars_ema_flat, lars_ema_flat_ref, lars_flat, lars_flat_ref
from fastbyol.kernels.ntxent import ntxent, ntxent_grads, ntxent_ref, ntxent_rows
from torch._dynamo.utils import counters

from fastbyol.config_parse import build_config
from fastbyol.data.views import Batch
from fastbyol.engine.trainer import Trainer, start_run

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def measured(check: str, **values: object) -> None:
    """One line of what a comparison measured (gpu_check.sh collects them from the junit XML)."""
    text = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"MEASURED {check.replace(' ', '')} {text}")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _err_vs_max(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over the entries finite in both (scale-free, for the record)."""
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(a) & torch.isfinite(e)
    if not finite.any():
        return 0.0
    return float((a[finite] - e[finite]).abs().max() / e[finite].abs().max().clamp_min(1e-30))


@pytest.fixture
def gpu() -> Iterator[torch.device]:
    """The GPU, with the kernels compiled for it: conftest.py sets TRITON_INTERPRET=1 unless the environment
    already holds a value (the interpreter would run them on the host), so a GPU run must export
    TRITON_INTERPRET=0 first. TF32 stays off for fp32 matmuls: the references' fp32 logits are IEEE fp32."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1: the Triton kernels would run in the interpreter, not compiled for the "
                    "GPU; export TRITON_INTERPRET=0 before pytest (scripts/gpu_check.sh does)")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# -- fused BYOL loss ------------------------------------------------------------------------------------

def check_byol_loss(shape: tuple[int, int], dtype: torch.dtype, case: str, device: torch.device) -> None:
    """Loss and both gradients (grad_out 1.7) of the kernel against ``byol_loss_ref`` on ``device``, with
    tests/test_kernel_byol_loss.py's inputs, tolerances and elementwise gradient check."""
    p1, p2, z1, z2 = (t.to(device) for t in byol_tests._inputs(shape, dtype, case))
    p1.requires_grad_()
    p2.requires_grad_()
    got = byol_loss(p1, p2, z1, z2)
    want = byol_loss_ref(p1, p2, z1, z2)
    assert got.device.type == device.type and got.shape == () and got.dtype == torch.float32
    tol = byol_tests.VALUE_TOL[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    grad_out = torch.tensor(1.7, device=device)
    got_grads = torch.autograd.grad(got, (p1, p2), grad_out)
    want_grads = torch.autograd.grad(want, (p1, p2), grad_out)
    for name, p, g, w in zip(("grad_p1", "grad_p2"), (p1, p2), got_grads, want_grads):
        byol_tests._assert_grad_close(g, w, p, 1.7, byol_tests.GRAD_RTOL[dtype], name)
    measured(f"byol_loss[{shape},{dtype},{case}]", value_rel_err=_err_vs_max(got, want),
             grad_err_vs_max=max(_err_vs_max(g, w) for g, w in zip(got_grads, want_grads)))


def check_byol_loss_writes_every_row(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
    """NaN-poisoned outputs of the raw launchers: every row of the loss and every gradient entry is written."""
    p1, p2, z1, z2 = (t.to(device) for t in byol_tests._inputs(shape, dtype, "random"))
    rows = torch.full((shape[0],), float("nan"), device=device)
    byol_loss_rows(p1, p2, z1, z2, out=rows)
    assert not rows.isnan().any(), f"unwritten rows: {rows.isnan().nonzero().flatten().tolist()}"
    grads = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(2)]
    byol_loss_grad_p(torch.tensor(1.0, device=device), p1, p2, z1, z2, *grads)
    for name, g in zip(("grad_p1", "grad_p2"), grads):
        assert not g.isnan().any(), f"{name} unwritten at {g.isnan().nonzero()[:10].tolist()}"


# B = 1, odd D, the training sizes (batch 256 and 4096 per GPU, projection 256), D above one block (1024).
GPU_LOSS_SHAPES = [(1, 1), (33, 300), (256, 256), (4096, 256), (7, 2500)]


@pytest.mark.cuda
@pytest.mark.parametrize("case", byol_tests.CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_LOSS_SHAPES, ids=str)
def test_byol_loss_kernel_on_gpu(gpu: torch.device, shape: tuple[int, int], dtype: torch.dtype, case: str) -> None:
    check_byol_loss(shape, dtype, case, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_byol_loss_kernel_writes_every_row_on_gpu(gpu: torch.device, dtype: torch.dtype) -> None:
    check_byol_loss_writes_every_row((4099, 300), dtype, gpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_byol_loss_check_runs_on_cpu(dtype: torch.dtype) -> None:
    check_byol_loss((5, 129), dtype, "zero_rows", CPU)
    check_byol_loss_writes_every_row((5, 129), dtype, CPU)


# -- fused NT-Xent -------------------------------------------------------------------------------------

def check_ntxent(layout: ntxent_tests.Layout, dtype: torch.dtype, case: str, device: torch.device) -> None:
    """Loss and gradients (grad_out 1.7; q is k for one process, so autograd adds dq + dk) of the kernel
    against ``ntxent_ref``, with tests/test_kernel_ntxent.py's inputs, tolerances and gradient check."""
    q, k, pos_index, self_index = ntxent_tests._inputs(layout, dtype, case)
    k = k.to(device)
    q = k if layout.kind == "pair" else q.to(device)
    pos_index, self_index = pos_index.to(device), self_index.to(device)
    leaves = ntxent_tests._leaves(q, k)
    got = ntxent(q, k, pos_index, self_index, layout.temperature)
    want = ntxent_ref(q, k, pos_index, self_index, layout.temperature)
    assert got.device.type == device.type and got.shape == () and got.dtype == torch.float32
    tol = ntxent_tests.VALUE_TOL[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    grad_out = torch.tensor(1.7, device=device)
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    names = ("grad_qk",) if len(leaves) == 1 else ("grad_q", "grad_k")
    for name, g, w in zip(names, got_grads, want_grads):
        ntxent_tests._assert_grad_close(g, w, dtype, name)
    measured(f"ntxent[{layout},{dtype},{case}]", value_rel_err=_err_vs_max(got, want),
             grad_err_vs_max=max(_err_vs_max(g, w) for g, w in zip(got_grads, want_grads)))


def check_ntxent_writes_every_row(layout: ntxent_tests.Layout, dtype: torch.dtype, device: torch.device) -> None:
    q, k, pos_index, self_index = (t.to(device) for t in ntxent_tests._inputs(layout, dtype, "random"))
    rows, lse = (torch.full((layout.m,), float("nan"), device=device) for _ in range(2))
    ntxent_rows(q, k, pos_index, self_index, layout.temperature, out=rows, lse=lse)
    for name, t in (("rows", rows), ("lse", lse)):
        assert not t.isnan().any(), f"unwritten {name}: {t.isnan().nonzero().flatten().tolist()}"
    grad_q = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    grad_k = torch.full(k.shape, float("nan"), dtype=dtype, device=device)
    ntxent_grads(torch.tensor(1.0, device=device), q, k, pos_index, self_index, lse, layout.temperature, grad_q,
                 grad_k)
    for name, g in (("grad_q", grad_q), ("grad_k", grad_k)):
        assert not g.isnan().any(), f"{name} unwritten at {g.isnan().nonzero()[:10].tolist()}"


Layout = ntxent_tests.Layout
# SimCLR's single-GPU shape (batch 256: 2B = 512 rows of the 128-wide projection) at the official ImageNet
# temperature 0.1 and the small-batch 0.5; then the interpreter tests' odd layouts: tile and D-chunk edges
# (M = 34, D = 129), rank 1 of 3 against the gathered keys, arbitrary positives.
GPU_NTXENT_LAYOUTS = [Layout("pair", 512, 512, 128, 0.1), Layout("pair", 512, 512, 128, 0.5),
                      *ntxent_tests.LAYOUTS[2:]]


@pytest.mark.cuda
@pytest.mark.parametrize("case", ntxent_tests.CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", GPU_NTXENT_LAYOUTS, ids=str)
def test_ntxent_kernel_on_gpu(gpu: torch.device, layout: ntxent_tests.Layout, dtype: torch.dtype, case: str) -> None:
    check_ntxent(layout, dtype, case, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ntxent_kernel_writes_every_row_on_gpu(gpu: torch.device, dtype: torch.dtype) -> None:
    check_ntxent_writes_every_row(Layout("ranks", 130, 390, 300, 0.1), dtype, gpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ntxent_check_runs_on_cpu(dtype: torch.dtype) -> None:
    check_ntxent(Layout("pair", 14, 14, 7, 0.5), dtype, "random", CPU)
    check_ntxent(Layout("ranks", 18, 54, 33, 0.1), dtype, "large_scale", CPU)
    check_ntxent_writes_every_row(Layout("ranks", 18, 54, 33, 0.1), dtype, CPU)


# -- LARS over flat buffers, fused with the EMA, and sharded ---------------------------------------------

HYPER = lars_tests.HYPER


def _lars_state(name: str, dtype: torch.dtype, device: torch.device, gap: int = 0, seed: int | None = None
                ) -> tuple[list[tuple[int, int, bool]], int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tests/test_kernel_lars.py's layout ``name`` (tensors separated by ``gap`` untouched elements) and its random
    flat param, grad and momentum buffers, on ``device``."""
    segments, n = lars_tests._segments(lars_tests.LAYOUTS[name], gap=gap)
    seed = len(segments) if seed is None else seed
    param, grad, momentum_buf = (t.to(device) for t in lars_tests._buffers(n, dtype, seed))
    return segments, n, param, grad, momentum_buf


def check_lars(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """``lars_flat`` against ``lars_flat_ref`` (tests/test_kernel_lars.py's layouts, buffers and tolerances;
    gaps between tensors must stay untouched)."""
    segments, n, param, grad, momentum_buf = _lars_state(name, dtype, device, gap=3)
    layout = build_layout(segments, device)
    lr = torch.tensor([0.4], device=device)
    start, want_p, want_m = param.clone(), param.clone(), momentum_buf.clone()
    lars_flat_ref(want_p, grad, want_m, layout, lr, **HYPER)
    lars_flat(param, grad, momentum_buf, layout, lr, **HYPER)
    atol, rtol = lars_tests.TOL[dtype]
    torch.testing.assert_close(param, want_p, atol=atol, rtol=rtol)
    torch.testing.assert_close(momentum_buf, want_m, atol=atol, rtol=rtol)
    if dtype == torch.float32:  # the momentum (the trust-scaled update) and the step itself, tightly
        torch.testing.assert_close(momentum_buf, want_m, atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(param - start, want_p - start, atol=1e-6, rtol=1e-4)
    measured(f"lars[{name},{dtype}]", param_abs_err=_max_abs(param, want_p),
             momentum_abs_err=_max_abs(momentum_buf, want_m))


def check_lars_ema_fused(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """``lars_ema_flat`` (LARS and the EMA in one pass) against ``lars_ema_flat_ref`` and against the unfused
    kernels (``lars_flat`` then ``ema_flat_``)."""
    segments, n, param, grad, momentum_buf = _lars_state(name, dtype, device, seed=7)
    layout = build_layout(segments, device)
    n_paired = max(1, (2 * n) // 3)  # the online tower; predictor parameters follow it unpaired
    target = torch.randn(n_paired, generator=torch.Generator().manual_seed(8)).to(dtype).to(device)
    lr, tau = torch.tensor([0.2], device=device), torch.tensor([0.99], device=device)
    unfused = [t.clone() for t in (param, momentum_buf, target)]
    ref = [t.clone() for t in (param, momentum_buf, target)]
    lars_ema_flat(param, grad, momentum_buf, layout, lr, **HYPER, target=target, tau=tau)
    lars_flat(unfused[0], grad, unfused[1], layout, lr, **HYPER)
    ema_flat_(unfused[2], unfused[0][:n_paired], tau)
    lars_ema_flat_ref(ref[0], grad, ref[1], layout, lr, **HYPER, target=ref[2], tau=tau)
    atol, rtol = lars_tests.TOL[dtype]
    for got, exp in (*zip((param, momentum_buf, target), ref), *zip((param, momentum_buf, target), unfused)):
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol)
    measured(f"lars_ema_fused[{name},{dtype}]", target_abs_err=_max_abs(target, ref[2]),
             bitwise_as_unfused=all(torch.equal(a, b) for a, b in zip((param, momentum_buf, target), unfused)))


def check_lars_sharded(name: str, device: torch.device) -> None:
    """Three shards cut mid-tensor: ``lars_shard_sums`` per shard, summed (what ZeroLARS's all-reduce does),
    then ``lars_shard_apply`` per shard, equals the unsharded ``lars_flat``; each shard's own sums alone
    (a naive LARS under ZeRO) do not."""
    segments, n, param, grad, momentum_buf = _lars_state(name, torch.float32, device, seed=11)
    bounds = [0, n // 3 + 1, (2 * n) // 3 + 7, n]
    lr = torch.tensor([0.4], device=device)
    whole = [param.clone(), momentum_buf.clone()]
    lars_flat(whole[0], grad, whole[1], build_layout(segments, device), lr, **HYPER)

    def sharded(reduce: bool) -> list[torch.Tensor]:
        p, m = param.clone(), momentum_buf.clone()
        layouts = [lars.shard_layout(segments, a, b, device) for a, b in zip(bounds, bounds[1:])]
        sums = [lars.lars_shard_sums(p[a:b], grad[a:b], layout, HYPER["weight_decay"])
                for layout, a, b in zip(layouts, bounds, bounds[1:])]
        total = torch.stack(sums).sum(0)
        for layout, part, a, b in zip(layouts, sums, bounds, bounds[1:]):
            lars.lars_shard_apply(p[a:b], grad[a:b], m[a:b], layout, total if reduce else part, lr, **HYPER)
        return [p, m]

    exact = sharded(reduce=True)
    torch.testing.assert_close(exact[0], whole[0], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(exact[1], whole[1], atol=1e-8, rtol=1e-5)
    naive = sharded(reduce=False)
    assert float((naive[1] - whole[1]).abs().max()) > 1e-5  # per-shard trust ratios: another optimizer
    measured(f"lars_sharded[{name}]", param_abs_err=_max_abs(exact[0], whole[0]),
             momentum_abs_err=_max_abs(exact[1], whole[1]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(lars_tests.LAYOUTS))
def test_lars_kernel_on_gpu(gpu: torch.device, name: str, dtype: torch.dtype) -> None:
    check_lars(name, dtype, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(lars_tests.LAYOUTS))
def test_lars_ema_fused_kernel_on_gpu(gpu: torch.device, name: str, dtype: torch.dtype) -> None:
    check_lars_ema_fused(name, dtype, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["odd", "resnet50-like"])
def test_lars_sharded_kernels_on_gpu(gpu: torch.device, name: str) -> None:
    check_lars_sharded(name, gpu)


def test_lars_checks_run_on_cpu() -> None:
    check_lars("odd", torch.bfloat16, CPU)
    check_lars_ema_fused("one-element", torch.float32, CPU)
    check_lars_sharded("odd", CPU)


# -- target EMA: flat buffer and tensor lists ------------------------------------------------------------

def check_ema_flat(n: int, dtype: torch.dtype, tau_value: float, device: torch.device) -> None:
    """``ema_flat_`` against ``ema_flat_ref`` (tau read from a device tensor), and every element written."""
    g = torch.Generator().manual_seed(n)
    target = torch.randn(n, generator=g).to(dtype).to(device)
    online = torch.randn(n, generator=g).to(dtype).to(device)
    tau = torch.tensor([tau_value], device=device)
    want = target.clone()
    ema_flat_ref(want, online, tau)
    got = target.clone()
    ema_flat_(got, online, tau)
    atol, rtol = ema_tests.TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    poisoned = torch.full((n,), 1e30, device=device)  # +1e30 towards -1e30 at tau 0.5 -> 0 where written
    ema_flat_(poisoned, torch.full((n,), -1e30, device=device), torch.tensor([0.5], device=device))
    assert torch.count_nonzero(poisoned) == 0, "unwritten elements"
    measured(f"ema_flat[{n},{dtype},{tau_value}]", abs_err=_max_abs(got, want))


@pytest.mark.cuda
@pytest.mark.parametrize("tau_value", [0.0, 0.996, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4097, 3 * 4096 + 5, (1 << 22) + 3])
def test_ema_flat_kernel_on_gpu(gpu: torch.device, n: int, dtype: torch.dtype, tau_value: float) -> None:
    check_ema_flat(n, dtype, tau_value, gpu)


def test_ema_checks_run_on_cpu() -> None:
    check_ema_flat(4097, torch.float16, 0.996, CPU)


# -- the training step: compiled (and CUDA graphs) against eager ----------------------------------------

# A ResNet-18 with the small stem at 32 px and narrow heads, with the online probe (labelled procedural
# images): the whole compiled region of the real step, compiled in tens of seconds. warmup_epochs=0: the
# first steps apply the full learning rate, so parameter updates are large enough to compare.
STEP_OVERRIDES = ["model.arch=resnet18", "model.small_stem=true", "model.proj_hidden=128", "model.proj_dim=64",
                  "model.online_probe=true", "data.image_size=32", "data.num_images=512", "data.workers=0",
                  "optim.batch_size=32", "optim.warmup_epochs=0", "run.progress=off", "run.telemetry=off",
                  "run.ckpt_every=1000000", "run.log_every=1000000"]


@dataclass
class StepTolerance:
    """Bounds on the differences ``step_differences`` reports (all relative, see there)."""

    loss: float
    online: float
    target: float
    bn_stats: float


# bf16 autocast (the GPU default): eager and inductor round the same values to bf16 at different points (fused
# elementwise chains, conv epilogues), so a step differs from eager by bf16 noise (8 mantissa bits), not by fp32
# rounding, and LARS passes the gradients' noise on: each layer's update is its gradient's direction. Measured on
# the CPU (inductor's C++ against eager, this model in bf16, 3 steps from the same state; the CPU cannot compile
# for a GPU): loss 3e-4, online update 0.072, target update 9e-5, BatchNorm statistics 4e-4 (bf16 eager against
# fp32 eager: online 0.12). The bounds leave 4x room or more over those; what they must catch is 100% off: an
# update lost on a copy of the flat buffers, doubled, a missed EMA or BatchNorm-statistics write, a stale
# CUDA-graph output. The first GPU run records what it measured (MEASURED lines in gpu_check.sh's output).
BF16_STEP_TOL = StepTolerance(loss=5e-3, online=0.3, target=0.05, bn_stats=0.05)
EXACT = StepTolerance(loss=0.0, online=0.0, target=0.0, bn_stats=0.0)


def build_trainer(out_dir: Path, name: str, device: torch.device, compile_mode: str, kernels: str,
                  extra: tuple[str, ...] = ()) -> Trainer:
    overrides = [*STEP_OVERRIDES, f"run.out_dir={out_dir}", f"run.name={name}", f"run.device={device.type}",
                 f"run.compile={compile_mode}", f"run.kernels={kernels}", *extra]
    return start_run(build_config("smoke", overrides=overrides))


def _state_groups(trainer: Trainer) -> dict[str, list[str]]:
    """State-dict names by what a step writes: online parameters (tower, predictor, probe; LARS), target
    parameters (the EMA), BatchNorm running statistics (the forward passes of both networks)."""
    target = {id(p) for p in trainer.updater.target_params}
    groups: dict[str, list[str]] = {"online": [], "target": [], "bn_stats": []}
    for name, p in trainer.pair.named_parameters():
        groups["target" if id(p) in target else "online"].append(name)
    groups["bn_stats"] = [name for name, b in trainer.pair.named_buffers() if b.is_floating_point()]
    return groups


def _relative_change_error(names: list[str], before: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                           cand: dict[str, torch.Tensor]) -> float:
    """|| (cand - before) - (ref - before) || / || ref - before || over all tensors of a group."""
    d_ref = torch.cat([(ref[n].float() - before[n].float()).flatten() for n in names])
    d_cand = torch.cat([(cand[n].float() - before[n].float()).flatten() for n in names])
    moved = float(d_ref.norm())
    assert moved > 0, f"the reference step left {names[0]}... unchanged: nothing to compare"
    return float((d_cand - d_ref).norm()) / moved


def step_differences(reference: Trainer, candidate: Trainer, batches: list[Batch]) -> dict[str, float]:
    """Both trainers take ``train_step`` (the trainer's own step: fetch, forward/backward, LARS, EMA) on each
    batch from the same state: before every step the candidate is given the reference's weights, BatchNorm
    statistics and optimizer state, so differences cannot compound. Per group, the worst relative error of the
    candidate's change over the reference's change; the worst relative loss difference; and the relative
    difference of the meters' means over all steps (the log row's loss, summed on the device across steps)."""
    groups = _state_groups(reference)
    worst = {"loss": 0.0, **{g: 0.0 for g in groups}, "meter_loss": 0.0}
    for batch in batches:
        before = {k: v.detach().clone() for k, v in reference.pair.state_dict().items()}
        candidate.pair.load_state_dict(before)
        candidate.optimizer.load_state_dict(copy.deepcopy(reference.optimizer.state_dict()))
        for trainer in (reference, candidate):
            trainer.train_step(iter([batch]))
        loss_ref, loss_cand = float(reference._last_out.loss), float(candidate._last_out.loss)
        worst["loss"] = max(worst["loss"], abs(loss_cand - loss_ref) / max(abs(loss_ref), 1.0))
        after_ref, after_cand = reference.pair.state_dict(), candidate.pair.state_dict()
        for group, names in groups.items():
            worst[group] = max(worst[group], _relative_change_error(names, before, after_ref, after_cand))
    assert reference.step == candidate.step
    mean_ref, mean_cand = reference.meter.means()["loss"], candidate.meter.means()["loss"]
    worst["meter_loss"] = abs(mean_cand - mean_ref) / max(abs(mean_ref), 1.0)
    return worst


def assert_within(diffs: dict[str, float], tol: StepTolerance, what: str) -> None:
    bounds = {"loss": tol.loss, "meter_loss": tol.loss, "online": tol.online, "target": tol.target,
              "bn_stats": tol.bn_stats}
    over = {k: (diffs[k], bounds[k]) for k in bounds if not diffs[k] <= bounds[k]}
    assert not over, f"{what}: (measured, bound) over the bound: {over}; all measured: {diffs}"


def compare_to_eager(out_dir: Path, device: torch.device, compile_mode: str, kernels: str, steps: int,
                     tol: StepTolerance, extra: tuple[str, ...] = ()) -> tuple[dict[str, float], Trainer, Trainer]:
    """``steps`` steps of ``run.compile=<compile_mode>`` against ``run.compile=off``, same kernels setting, same
    batches (the procedural images of the reference's stream); raises when a difference is over ``tol``.
    ``extra``: overrides for both. Returns the differences and the two trainers (reference, candidate)."""
    torch._dynamo.reset()  # every compiled trainer compiles afresh: no cache entries or recompile counts carried
    reference = build_trainer(out_dir, f"eager-kernels{kernels}", device, "off", kernels, extra)
    candidate = build_trainer(out_dir, f"{compile_mode}-kernels{kernels}", device, compile_mode, kernels, extra)
    assert candidate.compile_mode == compile_mode and candidate.kernels == reference.kernels == (kernels == "on")
    batches = list(reference.source.batches(0, reference.batch_size, steps))
    skips = counters["inductor"]["cudagraph_skips"]
    diffs = step_differences(reference, candidate, batches)
    # For the record: a reduce-overhead step that inductor ran without CUDA graphs (it logs why) counts here.
    measured(f"step[{compile_mode},kernels={kernels},{device.type}]", **diffs,
             cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips)
    assert_within(diffs, tol, f"run.compile={compile_mode} run.kernels={kernels} vs eager")
    return diffs, reference, candidate


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["off", "on"])
def test_compiled_step_matches_eager_on_gpu(gpu: torch.device, tmp_path: Path, kernels: str) -> None:
    compare_to_eager(tmp_path, gpu, "default", kernels, steps=3, tol=BF16_STEP_TOL)


@pytest.mark.cuda
def test_cuda_graph_step_matches_eager_on_gpu(gpu: torch.device, tmp_path: Path) -> None:
    """reduce-overhead: CUDA graphs warm up, record, then replay from step 3; 5 steps include replays, and the
    meter sums graph outputs across steps (an output overwritten by the next replay would fail here)."""
    compare_to_eager(tmp_path, gpu, "reduce-overhead", "on", steps=5, tol=BF16_STEP_TOL)


CPU_SMALL = ("optim.batch_size=8", "data.image_size=16", "data.num_images=64")


def test_step_comparison_runs_on_cpu(tmp_path: Path) -> None:
    """The comparison on the CPU, eager against eager: equal bitwise. And it is not vacuous: the same candidate
    at twice the learning rate (same loss, twice the update) is caught."""
    diffs, reference, candidate = compare_to_eager(tmp_path, CPU, "off", "off", steps=2, tol=EXACT, extra=CPU_SMALL)
    assert all(v == 0.0 for v in diffs.values()), diffs
    candidate.lr = 2 * candidate.lr  # the schedule, as the loop reads it
    batch = next(reference.source.batches(reference.position, reference.batch_size, 1))
    wrong = step_differences(reference, candidate, [batch])
    assert wrong["loss"] == 0.0 and wrong["online"] > 0.9, wrong
    with pytest.raises(AssertionError, match="online"):
        assert_within(wrong, BF16_STEP_TOL, "twice the learning rate")


# -- DALI: GPU decode against the torchvision pipeline ----------------------------------------------------

DALI_SIZE = 32


def compare_dali_to_torchvision(folder: Path, device: torch.device, mean_bound: float, max_bound: float
                                ) -> dict[str, Any]:
    """One batch of 64 from the start of the stream through both pipelines (same seed, so the same images,
    labels and random decisions; tests/test_dali.py does the same with DALI's CPU operators): DALI's views
    on ``device``, channels-last fp32, and within ``mean_bound`` / ``max_bound`` of torchvision's in mean
    |difference| per view (normalised units), channel means within 0.01."""
    from fastbyol.data.dali import DaliSource
    from fastbyol.data.folder import ImageFiles, scan_image_folder
    from fastbyol.data.loader import TorchVisionSource

    paths, labels, classes = scan_image_folder(str(folder))
    files = [str(p) for p in paths]
    cfg = build_config("digits", overrides=[f"data.path={folder}", "data.workers=0", f"data.image_size={DALI_SIZE}"])
    torch_batch = next(TorchVisionSource(ImageFiles(files, labels), len(classes), cfg.data, 0, False).batches(0, 64, 1))
    dali_batch = next(DaliSource(files, labels, len(classes), DALI_SIZE, 0, device, num_threads=2).batches(0, 64, 1))
    assert torch_batch.labels is not None and dali_batch.labels is not None
    assert torch.equal(torch_batch.labels, dali_batch.labels.cpu())
    worst: dict[str, Any] = {"mean_abs_diff": 0.0, "max_view_abs_diff": 0.0}
    for a, b in zip(torch_batch.views, dali_batch.views):
        assert b.device.type == device.type and b.dtype == torch.float32 and b.shape == a.shape
        assert b.is_contiguous(memory_format=torch.channels_last)
        per_view = (a - b.cpu()).abs().mean(dim=(1, 2, 3))
        worst["mean_abs_diff"] = max(worst["mean_abs_diff"], float(per_view.mean()))
        worst["max_view_abs_diff"] = max(worst["max_view_abs_diff"], float(per_view.max()))
        torch.testing.assert_close(a.mean(dim=(0, 2, 3)), b.cpu().mean(dim=(0, 2, 3)), atol=0.01, rtol=0)
    measured(f"dali_vs_torchvision[{device.type}]", **worst)
    assert worst["mean_abs_diff"] < mean_bound and worst["max_view_abs_diff"] < max_bound, worst
    return worst


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastbyol.data.builders import make_synthetic

    root = tmp_path_factory.mktemp("dali") / "synthetic"
    make_synthetic(str(root), num_classes=4, train_per_class=32, val_per_class=0, size=48)
    return root / "train"


@pytest.mark.cuda
@pytest.mark.dali
def test_dali_gpu_decode_matches_torchvision(gpu: torch.device, image_folder: Path) -> None:
    """device="mixed": nvJPEG (and the hardware decoder) against PIL's libjpeg, the GPU operators against the
    torchvision ops. Bounds 2x the CPU operators' (tests/test_dali.py: 0.006 / 0.02; measured 0.003 mean
    there): a GPU IDCT may round a level or two differently from libjpeg's."""
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed here (not carried to this machine)")
    compare_dali_to_torchvision(image_folder, gpu, mean_bound=0.012, max_bound=0.04)


@pytest.mark.dali
def test_dali_comparison_runs_on_cpu(image_folder: Path) -> None:
    pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed: pip install 'fastbyol[gpu]'")
    compare_dali_to_torchvision(image_folder, CPU, mean_bound=0.006, max_bound=0.02)
