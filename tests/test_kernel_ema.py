"""kernels/ema.py under the Triton interpreter: equal to its reference over shapes and dtypes, tau read
from a tensor, every element written, and traceable by torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from fastbyol.kernels import ema
from fastbyol.kernels.ema import ema_flat_, ema_flat_ref, ema_multi_, ema_multi_ref

from fastbyol.step.ema import ema_ref

TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}


@pytest.mark.parametrize("n", [1, 7, 4096, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau_value", [0.0, 0.9, 0.996, 1.0])
def test_kernel_equals_reference(n: int, dtype: torch.dtype, tau_value: float) -> None:
    g = torch.Generator().manual_seed(n)
    target = torch.randn(n, generator=g).to(dtype)
    online = torch.randn(n, generator=g).to(dtype)
    tau = torch.tensor([tau_value])
    want = target.clone()
    ema_flat_ref(want, online, tau)
    got = target.clone()
    ema_flat_(got, online, tau)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # The rule itself, and the step's multi-tensor EMA, agree with the kernel.
    torch.testing.assert_close(got.float(), ema_ref(target.float(), online.float(), tau_value), atol=atol, rtol=rtol)


def test_every_element_is_written() -> None:
    """Poisoned target: +1e30 everywhere, online -1e30, tau 0.5 -> 0; an element left unwritten stays 1e30."""
    n = 2 * ema.BLOCK + 3
    target = torch.full((n,), 1e30)
    ema_flat_(target, torch.full((n,), -1e30), torch.tensor([0.5]))
    assert torch.count_nonzero(target) == 0


def test_tau_is_read_from_the_tensor_each_call() -> None:
    target, online = torch.zeros(10), torch.ones(10)
    tau = torch.tensor([0.5])
    ema_flat_(target, online, tau)
    tau.fill_(0.75)  # a new tau without a new Python value: what a compiled step does
    ema_flat_(target, online, tau)
    torch.testing.assert_close(target, torch.full((10,), 0.75 * 0.5 + 0.25))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="contiguous buffers of one shape"):
        ema_flat_(torch.zeros(4), torch.zeros(5), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="1-element"):
        ema_flat_(torch.zeros(4), torch.zeros(4), torch.tensor([0.5, 0.5]))


def test_compiles_without_graph_break() -> None:
    target, online, tau = torch.randn(33), torch.randn(33), torch.tensor([0.9])
    want = target.clone()
    ema_flat_ref(want, online, tau)

    def step(t: torch.Tensor, o: torch.Tensor, tau: torch.Tensor) -> None:
        ema_flat_(t, o, tau)

    explanation = torch._dynamo.explain(step)(target.clone(), online, tau)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.compile(step, fullgraph=True, backend="aot_eager")(target, online, tau)
    torch.testing.assert_close(target, want)


def test_opcheck() -> None:
    torch.library.opcheck(ema_flat_, (torch.randn(9), torch.randn(9), torch.tensor([0.3])))


# -- the multi-tensor list form ----------------------------------------------------------------------------

def _pairs(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], seed: int
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    onlines = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    return targets, onlines


# Many small tensors (BatchNorm vectors, biases), odd sizes, a single element, an empty one, and a few
# large ones shaped like ResNet-50 layers (scaled down in count, not in shape, where it matters).
MULTI_SHAPES = [(1,), (7,), (64,), (256,), (0,), (4097,), (64, 3, 7, 7), (512, 2048), (2048, 512, 1, 1),
                (3, 5, 11), (1000,)] + [(c,) for c in (64, 128, 256, 512, 1024, 2048)] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_equals_reference(dtype: torch.dtype) -> None:
    targets, onlines = _pairs(MULTI_SHAPES, [dtype] * len(MULTI_SHAPES), seed=3)
    tau = torch.tensor([0.99])
    want = [t.clone() for t in targets]
    ema_multi_ref(want, onlines, tau)
    ema_multi_(targets, onlines, tau)
    atol, rtol = TOL[dtype]
    for got, exp in zip(targets, want):
        torch.testing.assert_close(got, exp, atol=atol, rtol=rtol)


def test_multi_mixed_dtypes_one_launch_per_dtype_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    shapes = [(5,), (33,), (4097,), (2, 3), (1,)]
    targets, onlines = _pairs(shapes, dtypes, seed=4)
    tau = torch.tensor([0.5])
    want = [t.clone() for t in targets]
    ema_multi_ref(want, onlines, tau)
    launches: list[int] = []
    kernel = ema._ema_multi_kernel
    monkeypatch.setattr(ema, "_ema_multi_kernel", _Counting(kernel, launches))
    ema_multi_(targets, onlines, tau)
    assert len(launches) == 3  # fp32, bf16, fp16 pairs
    for got, exp, d in zip(targets, want, dtypes):
        torch.testing.assert_close(got, exp, atol=TOL[d][0], rtol=TOL[d][1])


class _Counting:
    """Wraps a jitted kernel: counts launches, forwards them."""

    def __init__(self, kernel: object, launches: list[int]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        self.launches.append(grid[0])
        return self.kernel[grid]  # type: ignore[index]


def test_multi_every_element_written_and_table_reused() -> None:
    shapes = [(3,), (ema.INTERPRETER_BLOCK + 5,), (17,)]
    targets = [torch.full(s, 1e30) for s in shapes]
    onlines = [torch.full(s, -1e30) for s in shapes]
    tau = torch.tensor([0.5])
    ema_multi_(targets, onlines, tau)
    assert all(torch.count_nonzero(t) == 0 for t in targets)
    tables = len(ema._TABLES)
    ema_multi_(targets, onlines, tau)  # same tensors: the cached pointer table, no new host-to-device copy
    assert len(ema._TABLES) == tables


def test_multi_bad_arguments() -> None:
    tau = torch.tensor([0.5])
    with pytest.raises(ValueError, match="as many targets"):
        ema_multi_([torch.zeros(2)], [], tau)
    with pytest.raises(ValueError, match="contiguous pairs of one shape"):
        ema_multi_([torch.zeros(2)], [torch.zeros(3)], tau)
    with pytest.raises(ValueError, match="supports float32"):
        ema_multi_([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)], tau)


def test_multi_compiles_without_graph_break() -> None:
    targets, onlines = _pairs([(5,), (9, 2)], [torch.float32] * 2, seed=5)
    tau = torch.tensor([0.7])
    want = [t.clone() for t in targets]
    ema_multi_ref(want, onlines, tau)

    def step(ts: list[torch.Tensor], os_: list[torch.Tensor], tau: torch.Tensor) -> None:
        ema_multi_(ts, os_, tau)

    explanation = torch._dynamo.explain(step)([t.clone() for t in targets], onlines, tau)
    assert explanation.graph_break_count == 0
    torch.compile(step, fullgraph=True, backend="aot_eager")(targets, onlines, tau)
    for got, exp in zip(targets, want):
        torch.testing.assert_close(got, exp)


def test_multi_opcheck() -> None:
    torch.library.opcheck(ema_multi_, ([torch.randn(9), torch.randn(4)], [torch.randn(9), torch.randn(4)],
                                       torch.tensor([0.3])))
