"""The fused NT-Xent kernel against its plain-PyTorch reference: value and gradients (q, k, and q is k) over a
layout x dtype x input-case grid, poisoned outputs, the custom op under torch.compile and opcheck. On the CPU
the kernels run under TRITON_INTERPRET=1 (set in conftest.py) with 16 x 16 logit tiles and D chunks of 128, so
the shapes below cross tile edges (M, N not multiples of 16) and chunk edges (D = 129, 300)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from fastbyol.kernels.ntxent import ntxent, ntxent_grads, ntxent_ref, ntxent_rows

from fastbyol.step.ntxent import pair_indices


@dataclass(frozen=True)
class Layout:
    """How q, k and the indices are built. ``pair``: one process, q = k = cat(z1, z2) [2b, D], one leaf, so
    its gradient is dq + dk added by autograd. ``ranks``: rank 1 of ``world``'s local rows q [2b, D] (its own
    leaf) against the global k [2bW, D]. ``random``: any pos, any self != pos, N > M."""

    kind: str
    m: int
    n: int
    d: int
    temperature: float

    def __str__(self) -> str:
        return f"{self.kind}-M{self.m}-N{self.n}-D{self.d}-T{self.temperature}"


LAYOUTS = [
    Layout("pair", 2, 2, 5, 0.1),  # B = 1: the only candidate is the positive, loss 0, gradient 0
    Layout("pair", 14, 14, 7, 0.5),
    Layout("pair", 34, 34, 129, 0.1),  # 3 row tiles (the last 2 rows), 2 D chunks (the last 1 wide)
    Layout("ranks", 18, 54, 300, 0.1),  # b = 9, rank 1 of 3; 3 D chunks
    Layout("random", 19, 37, 33, 0.2),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = ["random", "near_zero_rows", "large_scale"]
# Value: the kernel and the reference both take the dots of the same (low-precision) inputs in fp32, so the
# difference is summation order; 1e-4 for bf16/fp16 leaves room for a GPU's MMA accumulation order.
VALUE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# Gradients: |got - want| <= RTOL |want| + FLOOR row_max|want|. Both are rounded to the input dtype at the end
# (RTOL ~ 2 ulp: bf16 2^-7, fp16 2^-10); FLOOR covers entries near zero, where the projection
# dxh - xh (xh . dxh) cancels, and the GPU's TF32 backward products (bf16/fp16 inputs: dS rounded to 2^-11).
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
GRAD_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def _inputs(
    layout: Layout, dtype: torch.dtype, case: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, pos_index, self_index, seeded by the parameters so a failure reproduces; q is k for ``pair``."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{layout}{dtype}{case}".encode()))
    m, n, d = layout.m, layout.n, layout.d
    k = torch.randn(n, d, generator=g) * 2 + 0.3
    q = k if layout.kind == "pair" else torch.randn(m, d, generator=g) * 2 + 0.3
    if layout.kind == "random":
        pos_index = torch.randint(0, n, (m,), generator=g)
        self_index = (pos_index + torch.randint(1, n, (m,), generator=g)) % n
    else:
        pos_index, self_index = pair_indices(m // 2, 0 if layout.kind == "pair" else 1, n // m)
    if case == "near_zero_rows":  # ||x||^2 < eps: n_x is the constant 1e6, the other gradient branch
        q[m // 2] *= 1e-9  # nonzero, so the branches differ (flushed to zero in fp16)
        k[-1] = 0
    elif case == "large_scale":
        q[0] *= 1e3
        k[-1] *= 1e3
        k[n // 2] *= 1e-3
    q, k = q.to(dtype), k.to(dtype)
    return (k if layout.kind == "pair" else q), k, pos_index, self_index


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Elementwise |a - e| <= RTOL |e| + FLOOR row_max|e| (+ 4 of the dtype's smallest subnormals: rows of
    scale 1e-3 reach fp16's subnormal range), printing the mismatched indices. Non-finite entries (fp16
    overflow of the 1e6 eps-branch gradient, in the reference too) must match exactly."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite entries differ at {(~finite).nonzero()}"
    assert torch.equal(a[~finite], e[~finite]), f"{name}: non-finite entries differ"
    a, e = torch.where(finite, a, 0), torch.where(finite, e, 0)
    row_max = e.abs().amax(dim=-1, keepdim=True)
    tiny = 4 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bad = (a - e).abs() > GRAD_RTOL[dtype] * e.abs() + GRAD_FLOOR[dtype] * row_max + tiny
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        detail = [(i, float(a[tuple(i)]), float(e[tuple(i)])) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} mismatched, first (index, got, want): {detail}"
        )


def _leaves(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors to differentiate: one leaf when q is k, else both."""
    return (k.requires_grad_(),) if q is k else (q.requires_grad_(), k.requires_grad_())


# fp16 eps-branch gradients (~1e6 / M) overflow to inf in the kernel's final cast, as in the reference's.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_value_and_gradients_match_reference(layout: Layout, dtype: torch.dtype, case: str) -> None:
    q, k, pos_index, self_index = _inputs(layout, dtype, case)
    leaves = _leaves(q, k)
    t = layout.temperature
    got = ntxent(q, k, pos_index, self_index, t)
    want = ntxent_ref(q, k, pos_index, self_index, t)
    assert got.shape == () and got.dtype == torch.float32
    tol = VALUE_TOL[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)

    grad_out = torch.tensor(1.7)  # not 1, so the grad_out scaling is checked
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    names = ("grad_qk",) if len(leaves) == 1 else ("grad_q", "grad_k")
    for name, g, w in zip(names, got_grads, want_grads):
        _assert_grad_close(g, w, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_outputs_are_all_written(dtype: torch.dtype) -> None:
    layout = LAYOUTS[3]  # q and k of different lengths, several tiles and D chunks
    q, k, pos_index, self_index = _inputs(layout, dtype, "random")
    rows = torch.full((layout.m,), float("nan"))
    lse = torch.full((layout.m,), float("nan"))
    ntxent_rows(q, k, pos_index, self_index, layout.temperature, out=rows, lse=lse)
    for name, t in (("rows", rows), ("lse", lse)):
        assert not t.isnan().any(), f"unwritten {name}: {t.isnan().nonzero().flatten().tolist()}"
    want = ntxent_ref(q, k, pos_index, self_index, layout.temperature)
    torch.testing.assert_close(rows.mean(), want, atol=1e-4, rtol=1e-4)

    grad_q = torch.full(q.shape, float("nan"), dtype=dtype)
    grad_k = torch.full(k.shape, float("nan"), dtype=dtype)
    ntxent_grads(torch.tensor(1.0), q, k, pos_index, self_index, lse, layout.temperature, grad_q, grad_k)
    for name, g in (("grad_q", grad_q), ("grad_k", grad_k)):
        assert not g.isnan().any(), f"{name} unwritten at {g.isnan().nonzero()[:10].tolist()}"


def test_non_contiguous_inputs() -> None:
    q, k, pos_index, self_index = _inputs(LAYOUTS[4], torch.float32, "random")
    q, k = q.t().contiguous().t().requires_grad_(), k.t().contiguous().t().requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    got = ntxent(q, k, pos_index, self_index, 0.2)
    want = ntxent_ref(q, k, pos_index, self_index, 0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("grad_q", "grad_k"), torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
        _assert_grad_close(g, w, torch.float32, name)


def test_rejects_bad_inputs() -> None:
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    pos_index, self_index = torch.arange(4) + 1, torch.arange(4)
    with pytest.raises(ValueError, match="share D"):
        ntxent(q, torch.randn(6, 5), pos_index, self_index, 0.1)
    with pytest.raises(ValueError, match="int64"):
        ntxent(q, k, pos_index.int(), self_index, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        ntxent(q, k, pos_index, self_index, 0.0)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ntxent(q.double(), k.double(), pos_index, self_index, 0.1)


def test_compiles_without_graph_break() -> None:
    torch._dynamo.reset()
    layout = LAYOUTS[2]
    z, _, pos_index, self_index = _inputs(layout, torch.float32, "random")
    z.requires_grad_()

    def step(z: torch.Tensor, pos_index: torch.Tensor, self_index: torch.Tensor) -> torch.Tensor:
        h = z * 2.0
        return ntxent(h, h, pos_index, self_index, 0.1) * 0.5

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph raises on a graph break
    loss = compiled(z, pos_index, self_index)
    loss.backward()
    explanation = torch._dynamo.explain(step)(z, pos_index, self_index)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    ref_z = z.detach().clone().requires_grad_()
    want = ntxent_ref(ref_z * 2.0, ref_z * 2.0, pos_index, self_index, 0.1) * 0.5
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert z.grad is not None and ref_z.grad is not None
    _assert_grad_close(z.grad, ref_z.grad, torch.float32, "grad_z")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype: torch.dtype) -> None:
    q, k, pos_index, self_index = _inputs(LAYOUTS[4], dtype, "random")
    q.requires_grad_()
    k.requires_grad_()
    torch.library.opcheck(torch.ops.fastbyol.ntxent.default, (q, k, pos_index, self_index, 0.2))
    _, lse = ntxent_rows(q.detach(), k.detach(), pos_index, self_index, 0.2)
    args = (torch.tensor(1.0), q.detach(), k.detach(), pos_index, self_index, lse, 0.2)
    torch.library.opcheck(torch.ops.fastbyol.ntxent_backward.default, args)
