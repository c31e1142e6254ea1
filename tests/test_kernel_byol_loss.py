"""The fused BYOL loss kernel against its plain-PyTorch reference: value and gradients over a shape x dtype x
input-case grid, poisoned outputs, the chunked loop over D, the custom op under torch.compile and opcheck.
On the CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py)."""

from __future__ import annotations

import zlib

import pytest
import torch
from fastbyol.kernels import byol_loss as byol_loss_module
from fastbyol.kernels.byol_loss import byol_loss, byol_loss_grad_p, byol_loss_ref, byol_loss_rows

SHAPES = [(1, 1), (3, 7), (8, 256), (33, 300), (5, 129)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = ["random", "zero_rows", "large_scale"]
# Value: the kernel and the reference both accumulate in fp32 from the same (low-precision) inputs, so the
# tolerance is about summation order. Gradients are rounded to the input dtype at the end: allow ~1 ulp there.
VALUE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _inputs(shape: tuple[int, int], dtype: torch.dtype, case: str) -> list[torch.Tensor]:
    """p1, p2, z1, z2: fresh random rows (seeded by the parameters, so a failure reproduces), never all zero
    unless the case asks for the eps branch."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}{case}".encode()))
    p1, p2, z1, z2 = (torch.randn(shape, generator=g) * 2 + 0.3 for _ in range(4))
    b = shape[0]
    if case == "zero_rows":  # ||x||^2 < eps: n_x is the constant 1e6, the other gradient branch
        p1[b // 2] *= 1e-9  # 0 < ||p||^2 < eps: the branches differ only here (p = 0 zeroes the p term of both)
        z1[0] = 0
        p2[-1] = 0
        z2[-1] = 0  # p2[-1] and z1[-1] are both zero when b == 1: loss 0 for that direction
    elif case == "large_scale":
        p1[0] *= 1e3
        z2[-1] *= 1e3
        p2[b // 2] *= 1e3
        z1[b // 2] *= 1e-3
    return [t.to(dtype) for t in (p1, p2, z1, z2)]


def _assert_grad_close(
    actual: torch.Tensor, expected: torch.Tensor, p: torch.Tensor, grad_out: float, rtol: float, name: str
) -> None:
    """Elementwise |a - e| <= rtol * (|e| + 1e-2 * row_scale), printing the mismatched indices. row_scale is
    the larger of the row's largest |e| and the gradient's natural size 2 |grad_out| / (B max(||p||, 1e-6)),
    so entries that are zero up to rounding (D == 1, p parallel to z) do not fail while rows of very
    different scales (x1e3, the 1e6 eps branch) are each held to their own magnitude. Non-finite entries
    (fp16 overflow in the eps branch, also in the reference) must match exactly."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite entries differ"
    assert torch.equal(a[~finite], e[~finite]), f"{name}: non-finite entries differ"
    a, e = torch.where(finite, a, 0), torch.where(finite, e, 0)
    p_norm = p.detach().double().norm(dim=-1, keepdim=True).clamp(min=1e-6)
    row_scale = torch.maximum(e.abs().amax(dim=-1, keepdim=True), 2 * abs(grad_out) / (p.shape[0] * p_norm))
    bad = (a - e).abs() > rtol * (e.abs() + 1e-2 * row_scale)
    if bad.any():
        idx = bad.nonzero()[:10].tolist()
        detail = [(i, float(a[tuple(i)]), float(e[tuple(i)])) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} mismatched, first (index, got, want): {detail}"
        )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_value_matches_reference(shape: tuple[int, int], dtype: torch.dtype, case: str) -> None:
    p1, p2, z1, z2 = _inputs(shape, dtype, case)
    got = byol_loss(p1, p2, z1, z2)
    want = byol_loss_ref(p1, p2, z1, z2)
    assert got.shape == () and got.dtype == torch.float32
    tol = VALUE_TOL[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# fp16 eps-branch gradients (~1e6 / B) overflow to inf in the kernel's final cast, as in the reference's.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_match_reference(shape: tuple[int, int], dtype: torch.dtype, case: str) -> None:
    p1, p2, z1, z2 = _inputs(shape, dtype, case)
    p1.requires_grad_()
    p2.requires_grad_()
    grad_out = torch.tensor(1.7)  # not 1, so the grad_out scaling is checked
    got = torch.autograd.grad(byol_loss(p1, p2, z1, z2), (p1, p2), grad_out)
    want = torch.autograd.grad(byol_loss_ref(p1, p2, z1, z2), (p1, p2), grad_out)
    for name, p, g, w in zip(("grad_p1", "grad_p2"), (p1, p2), got, want):
        _assert_grad_close(g, w, p, 1.7, GRAD_RTOL[dtype], name)


def test_targets_get_no_gradient() -> None:
    p1, p2, z1, z2 = (t.requires_grad_() for t in _inputs((4, 9), torch.float32, "random"))
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 129), (33, 300)], ids=str)
def test_poisoned_outputs_are_all_written(shape: tuple[int, int], dtype: torch.dtype) -> None:
    p1, p2, z1, z2 = _inputs(shape, dtype, "zero_rows" if dtype == torch.float32 else "random")
    rows = torch.full((shape[0],), float("nan"))
    byol_loss_rows(p1, p2, z1, z2, out=rows)
    assert not rows.isnan().any(), f"unwritten rows: {rows.isnan().nonzero().flatten().tolist()}"
    torch.testing.assert_close(rows.mean(), byol_loss_ref(p1, p2, z1, z2), atol=1e-3, rtol=1e-3)

    grad_p1 = torch.full(shape, float("nan"), dtype=dtype)
    grad_p2 = torch.full(shape, float("nan"), dtype=dtype)
    byol_loss_grad_p(torch.tensor(1.0), p1, p2, z1, z2, grad_p1, grad_p2)
    for name, g in (("grad_p1", grad_p1), ("grad_p2", grad_p2)):
        assert not g.isnan().any(), f"{name} unwritten at {g.isnan().nonzero()[:10].tolist()}"


@pytest.mark.parametrize("shape", [(3, 7), (5, 129), (4, 300)], ids=str)
def test_chunked_loop_over_d(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """D larger than one block (several iterations, a masked tail) without a D > 1024 input."""
    monkeypatch.setattr(byol_loss_module, "_MAX_BLOCK_D", 4)
    p1, p2, z1, z2 = _inputs(shape, torch.float32, "zero_rows")
    p1.requires_grad_()
    p2.requires_grad_()
    got_value = byol_loss(p1, p2, z1, z2)
    want_value = byol_loss_ref(p1, p2, z1, z2)
    torch.testing.assert_close(got_value, want_value, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(got_value, (p1, p2))
    want = torch.autograd.grad(want_value, (p1, p2))
    for name, p, g, w in zip(("grad_p1", "grad_p2"), (p1, p2), got, want):
        _assert_grad_close(g, w, p, 1.0, GRAD_RTOL[torch.float32], name)


def test_non_contiguous_inputs() -> None:
    p1, p2, z1, z2 = (t.t() for t in _inputs((7, 5), torch.float32, "random"))
    p1.requires_grad_()
    torch.testing.assert_close(byol_loss(p1, p2, z1, z2), byol_loss_ref(p1, p2, z1, z2), atol=1e-5, rtol=1e-5)
    (got,) = torch.autograd.grad(byol_loss(p1, p2, z1, z2), (p1,))
    (want,) = torch.autograd.grad(byol_loss_ref(p1, p2, z1, z2), (p1,))
    _assert_grad_close(got, want, p1, 1.0, GRAD_RTOL[torch.float32], "grad_p1")


def test_rejects_mismatched_shapes() -> None:
    p = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        byol_loss(p, p, p, torch.randn(3, 5))


def test_compiles_without_graph_break() -> None:
    torch._dynamo.reset()
    p1, p2, z1, z2 = _inputs((6, 33), torch.float32, "random")
    p1.requires_grad_()
    p2.requires_grad_()

    def step(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return byol_loss(p1 * 2.0, p2, z1, z2) * 0.5

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph raises on a graph break
    loss = compiled(p1, p2, z1, z2)
    loss.backward()
    explanation = torch._dynamo.explain(step)(p1, p2, z1, z2)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    ref_p1, ref_p2 = p1.detach().clone().requires_grad_(), p2.detach().clone().requires_grad_()
    want = byol_loss_ref(ref_p1 * 2.0, ref_p2, z1, z2) * 0.5
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert p1.grad is not None and p2.grad is not None and ref_p1.grad is not None and ref_p2.grad is not None
    _assert_grad_close(p1.grad, ref_p1.grad, p1 * 2.0, 1.0, GRAD_RTOL[torch.float32], "grad_p1")
    _assert_grad_close(p2.grad, ref_p2.grad, p2, 1.0, GRAD_RTOL[torch.float32], "grad_p2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype: torch.dtype) -> None:
    p1, p2, z1, z2 = _inputs((3, 7), dtype, "random")
    p1.requires_grad_()
    p2.requires_grad_()
    torch.library.opcheck(torch.ops.fastbyol.byol_loss.default, (p1, p2, z1, z2))
    grad_out = torch.tensor(1.0)
    torch.library.opcheck(torch.ops.fastbyol.byol_loss_backward.default, (grad_out, p1.detach(), p2.detach(), z1, z2))
