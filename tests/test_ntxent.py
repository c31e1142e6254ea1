"""The NT-Xent reference against a hand-written copy of the official SimCLR loss (``simclr/objective.py``,
``add_contrastive_loss``), values and gradients; the multi-rank index layout simulated in one process; input
errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastbyol.step.ntxent import nt_xent, pair_indices

LARGE_NUM = 1e9  # objective.py's mask constant


def _official(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """add_contrastive_loss(hidden = cat(z1, z2), hidden_norm=True) on one replica, in fp64, halved: the
    official code returns loss_a + loss_b, each a mean over the B rows of one view."""
    # tf.math.l2_normalize: x * rsqrt(max(sum x^2, 1e-12))
    h1, h2 = (z.double() * torch.rsqrt(torch.clamp((z.double() ** 2).sum(-1, keepdim=True), min=1e-12))
              for z in (z1, z2))
    b = h1.shape[0]
    labels = torch.arange(b)  # one_hot(range(b), 2b) against cat([logits_ab, logits_aa])
    masks = torch.eye(b, dtype=torch.float64)
    logits_aa = h1 @ h1.T / temperature - masks * LARGE_NUM
    logits_bb = h2 @ h2.T / temperature - masks * LARGE_NUM
    logits_ab = h1 @ h2.T / temperature
    logits_ba = h2 @ h1.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return (loss_a + loss_b) / 2


def _views(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g) * 2 + 0.3
    z2 = z1 + torch.randn(b, d, generator=g)  # correlated views: the positives stand out, as in training
    return z1.requires_grad_(), z2.requires_grad_()


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("b, d", [(1, 3), (4, 7), (16, 128), (9, 300)])
def test_matches_official_simclr_loss(b: int, d: int, temperature: float) -> None:
    z1, z2 = _views(b, d, seed=1000 * b + d)
    z = torch.cat([z1, z2])
    pos_index, self_index = pair_indices(b, 0, 1)
    got = nt_xent(z, z, pos_index, self_index, temperature)
    want = _official(z1, z2, temperature)
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(got, (z1, z2))
    want_grads = torch.autograd.grad(want, (z1, z2))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)


def test_single_process_indices() -> None:
    pos_index, self_index = pair_indices(3, 0, 1)
    assert pos_index.tolist() == [3, 4, 5, 0, 1, 2]
    assert self_index.tolist() == list(range(6))
    # rank 1 of 2, b = 2: k = [z1 of rank 0, z1 of rank 1, z2 of rank 0, z2 of rank 1]
    pos_index, self_index = pair_indices(2, 1, 2)
    assert self_index.tolist() == [2, 3, 6, 7] and pos_index.tolist() == [6, 7, 2, 3]
    assert pos_index.dtype == self_index.dtype == torch.int64


@pytest.mark.parametrize("world, b", [(2, 3), (3, 4)])
def test_ranks_average_to_the_single_process_loss(world: int, b: int) -> None:
    """Each simulated rank takes its own 2b rows as q against the gathered k; the mean of the ranks' losses
    is the global loss, and the ranks' gradients (each of loss_r / W, as DDP averages) add up to its gradient:
    no torch.distributed, the gather is a cat in rank order."""
    temperature = 0.1
    z1, z2 = _views(world * b, 24, seed=world)
    k = torch.cat([z1, z2])
    single = nt_xent(k, k, *pair_indices(world * b, 0, 1), temperature)
    want_grads = torch.autograd.grad(single, (z1, z2))

    losses = []
    for rank in range(world):
        own = slice(rank * b, (rank + 1) * b)
        q = torch.cat([z1[own], z2[own]])
        losses.append(nt_xent(q, k, *pair_indices(b, rank, world), temperature))
    total = torch.stack(losses).mean()
    torch.testing.assert_close(total, single, atol=1e-6, rtol=1e-6)
    for g, w in zip(torch.autograd.grad(total, (z1, z2)), want_grads):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype: torch.dtype) -> None:
    z1, z2 = (z.detach().to(dtype) for z in _views(8, 64, seed=5))
    z = torch.cat([z1, z2])
    got = nt_xent(z, z, *pair_indices(8, 0, 1), 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, nt_xent(z.float(), z.float(), *pair_indices(8, 0, 1), 0.1))


def test_zero_row_is_finite() -> None:
    z1, z2 = (z.detach() for z in _views(4, 8, seed=6))
    z1[1] = 0
    z = torch.cat([z1, z2]).requires_grad_()
    loss = nt_xent(z, z, *pair_indices(4, 0, 1), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and z.grad is not None and torch.isfinite(z.grad).all()


def test_rejects_bad_inputs() -> None:
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    pos_index, self_index = torch.arange(4) + 1, torch.arange(4)
    bad = [
        ((q[0], k, pos_index, self_index, 0.1), r"q \[M, D\] and k \[N, D\]"),
        ((q, torch.randn(6, 5), pos_index, self_index, 0.1), "share D"),
        ((q, k[:1], pos_index, self_index, 0.1), "N >= 2"),
        ((q, k.double(), pos_index, self_index, 0.1), "one floating dtype"),
        ((q, k, pos_index.int(), self_index, 0.1), r"pos_index must be int64 \[M\] = \[4\]"),
        ((q, k, pos_index, self_index[:3], 0.1), r"self_index must be int64 \[M\] = \[4\]"),
        ((q, k, pos_index, self_index, 0.0), "temperature > 0"),
        ((q, k, pos_index, self_index, -0.1), "temperature > 0"),
        ((q, k, pos_index, self_index, float("nan")), "temperature > 0"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            nt_xent(*args)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        pair_indices(4, 2, 2)
