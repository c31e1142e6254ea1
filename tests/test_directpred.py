"""``model.predictor=directpred`` (Tian, Chen and Ganguli 2021): the predictor's weight from the eigen-decomposition
of the online projections' running correlation, checked against the formula; a run with it trains, is one graph
under torch.compile, and resumes bit for bit; what it cannot run with is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.engine.trainer import resume_run, start_run
from fastbyol.model.byol import ByolPair
from fastbyol.model.heads import DirectPredictor, directpred_weight
from fastbyol.step.methods import Byol
from fastbyol.step.train_step import REFERENCE_LOSSES, forward_loss

TINY = ["data.num_images=32", "optim.batch_size=8", "model.small_stem=true", "data.image_size=16", "data.workers=0",
        "run.progress=off", "optim.warmup_epochs=0", "run.epochs=2", "run.telemetry=off", "run.log_every=1",
        "run.ckpt_every=2", "model.proj_hidden=32", "model.proj_dim=16", "model.predictor=directpred"]


def test_the_weight_is_the_papers_formula() -> None:
    """W = U diag(sqrt(s / s_max) + eps) U^T, computed in float64 with numpy on a random correlation matrix."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 6, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.01])
    corr = z.T @ z / 40
    s, u = np.linalg.eigh(corr.double().numpy())
    want = u @ np.diag(np.sqrt(np.clip(s, 0, None) / s.max()) + 0.01) @ u.T
    got = directpred_weight(corr, 0.01)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-6)
    assert torch.allclose(got, got.T, atol=1e-6)
    floor = directpred_weight(torch.diag(torch.tensor([1.0, 0.0])), -0.5)  # eps may be negative: floor 1e-4
    assert torch.allclose(floor, torch.diag(torch.tensor([0.5, 1e-4])))


def test_the_correlation_decays_by_rho_from_the_first_batch() -> None:
    pred = DirectPredictor(4, rho=0.3, eps=0.1)
    assert torch.equal(pred(torch.ones(2, 4)), torch.ones(2, 4))  # starts as the identity
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)) for _ in range(2)]
    corrs = [torch.cat(b).T @ torch.cat(b) / 10 for b in batches]
    pred.update_(*batches[0])
    torch.testing.assert_close(pred.corr, corrs[0])
    pred.update_(*batches[1])
    torch.testing.assert_close(pred.corr, 0.3 * corrs[0] + 0.7 * corrs[1])
    torch.testing.assert_close(pred.weight, directpred_weight(0.3 * corrs[0] + 0.7 * corrs[1], 0.1))
    assert int(pred.updates) == 2 and not list(pred.parameters())


def test_a_directpred_run_trains_compiles_whole_and_resumes_bitwise(tmp_path: Path) -> None:
    def cfg(name: str, steps: int) -> object:
        return build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={name}", *TINY,
                                                f"run.max_steps={steps}"])

    straight = start_run(cfg("straight", 4))  # type: ignore[arg-type]
    assert isinstance(straight.pair, ByolPair) and isinstance(straight.pair.predictor, DirectPredictor)
    trained = {id(p) for group in straight.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trained for p in straight.pair.predictor.buffers())
    straight.train()
    start_run(cfg("resumed", 2)).train()  # type: ignore[arg-type]
    resumed = resume_run(str(tmp_path / "resumed"), ["run.max_steps=4"])
    resumed.train()
    a, b = straight.pair.state_dict(), resumed.pair.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["predictor.updates"]) == 4 and not torch.equal(a["predictor.weight"], torch.eye(16))
    pair = straight.pair.train()
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    explanation = torch._dynamo.explain(forward_loss)(pair, *views, None, False, Byol(REFERENCE_LOSSES).loss)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_what_directpred_cannot_run_with_is_refused() -> None:
    base = ["model.predictor=directpred"]
    with pytest.raises(ConfigError, match="model.predictor=directpred is BYOL's predictor; method=simclr has none"):
        build_config("smoke", overrides=[*base, "method=simclr"])
    for extra in ("byol.predictor_lr_mult=10", "run.engine=deepspeed"):
        with pytest.raises(ConfigError, match="is set, not trained: it runs without run.engine=deepspeed"):
            build_config("smoke", overrides=[*base, extra])
    with pytest.raises(ConfigError, match="model.directpred_rho=1.0 is out of range"):
        build_config("smoke", overrides=[*base, "model.directpred_rho=1"])
