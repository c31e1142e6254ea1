"""kernels/ema.py under the Triton interpreter: equal to its reference over shapes and dtypes, tau read
from a tensor, every element written, and traceable by torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from fastbyol.kernels import ema
from fastbyol.kernels.ema import ema_flat_, ema_flat_ref

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
