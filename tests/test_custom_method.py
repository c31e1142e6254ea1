"""Issue 31's method seam: a pretraining method defined here alone (its network, outputs and loss), with no edit
to the package, trains through the real Trainer as ``method=custom:test_custom_method.ToyMethod``, checkpoints,
and resumes bit for bit; its mistakes are one line each."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastbyol.cli import main
from fastbyol.config import Config
from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.engine.trainer import resume_run, start_run
from fastbyol.errors import FastByolError
from fastbyol.model.backbone import Encoder
from fastbyol.model.network import Network
from fastbyol.step.lars import lars_param_groups
from fastbyol.step.train_step import Losses
from fastbyol.telemetry.sinks import read_metrics

TINY = ["data.num_images=32", "optim.batch_size=8", "model.small_stem=true", "data.image_size=16", "data.workers=0",
        "run.progress=off", "optim.warmup_epochs=0", "run.epochs=2", "run.telemetry=off", "run.log_every=1",
        "run.ckpt_every=2", "model.proj_dim=16"]
TOY = "custom:test_custom_method.ToyMethod"


class ToyOutputs(NamedTuple):
    z1: torch.Tensor
    z2: torch.Tensor
    online_proj1: torch.Tensor
    probe_logits: torch.Tensor | None


class ToyNet(Network):
    """One encoder and a linear projection; no target."""

    def __init__(self, cfg: Config, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = Encoder.from_config(cfg.model)
            self.proj = nn.Linear(self.net.feature_dim, cfg.model.proj_dim)

    @property
    def encoder(self) -> Encoder:
        return self.net

    def online_modules(self) -> list[nn.Module]:
        return [self.net, self.proj]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> ToyOutputs:
        z = self.proj(self.net(torch.cat([view1, view2])))
        z1, z2 = z.chunk(2)
        return ToyOutputs(z1, z2, z1.detach(), None)


class ToyMethod:
    """Align the two views' projections and keep each dimension's spread near 1 (a VICReg-like toy)."""

    name = "toy"
    runs_under_zero = False

    def __init__(self, cfg: Config, losses: Losses) -> None:
        self.cfg = cfg

    def network(self, cfg: Config, seed: int, probe_classes: int = 0, net: nn.Module | None = None) -> Network:
        return ToyNet(cfg, seed)

    def loss(self, out: ToyOutputs) -> torch.Tensor:
        spread = F.relu(1 - out.z1.std(dim=0)).mean() + F.relu(1 - out.z2.std(dim=0)).mean()
        return F.mse_loss(out.z1, out.z2) + spread

    def row_fields(self, tau: float) -> dict[str, float]:
        return {}

    def compiles_with_loss(self, world: int) -> bool:
        return True

    def param_groups(self, network: Network) -> list[dict[str, object]]:
        return lars_param_groups(named for module in network.online_modules() for named in module.named_modules())

    def target_schedule(self, cfg: Config, total_steps: int) -> np.ndarray | None:
        return None


class NotAMethod:
    def __init__(self, cfg: Config, losses: Losses) -> None:
        pass


def _cfg(tmp_path: Path, name: str, *extra: str) -> Config:
    return build_config("smoke", overrides=[f"run.out_dir={tmp_path}", f"run.name={name}", f"method={TOY}", *TINY,
                                            *extra])


def test_a_method_defined_in_a_test_trains_and_resumes_bitwise(tmp_path: Path) -> None:
    straight = start_run(_cfg(tmp_path, "straight", "run.max_steps=4"))
    assert isinstance(straight.pair, ToyNet) and straight.tau is None
    straight.train()
    start_run(_cfg(tmp_path, "resumed", "run.max_steps=2")).train()
    resumed = resume_run(str(tmp_path / "resumed"), ["run.max_steps=4"])
    assert resumed.step == 2 and isinstance(resumed.pair, ToyNet)
    resumed.train()
    a, b = straight.pair.state_dict(), resumed.pair.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj.weight"], ToyNet(straight.cfg, seed=0).proj.weight)  # it trained
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "tau" not in rows[0]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_a_custom_method_is_named_or_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert build_config("smoke", overrides=[f"method={TOY}"]).method == TOY
    with pytest.raises(ConfigError, match=r"method='moco' is not allowed: use one of byol, simclr, "
                                          r"custom:<module>.<Class>"):
        build_config("smoke", overrides=["method=moco"])
    with pytest.raises(ConfigError, match="does not name a class: use custom:<module>.<Class>"):
        build_config("smoke", overrides=["method=custom:ToyMethod"])
    with pytest.raises(FastByolError, match="cannot import 'no_such_module'"):
        start_run(_cfg(tmp_path, "a", "method=custom:no_such_module.Toy"))
    with pytest.raises(FastByolError, match="module 'test_custom_method' has no 'Toy'"):
        start_run(_cfg(tmp_path, "b", "method=custom:test_custom_method.Toy"))
    with pytest.raises(FastByolError, match="NotAMethod lacks name, runs_under_zero, network, loss"):
        start_run(_cfg(tmp_path, "c", "method=custom:test_custom_method.NotAMethod"))
    assert main(["train", "--preset", "smoke", f"run.out_dir={tmp_path}", "method=custom:no_such_module.Toy"]) == 2
    assert "fastbyol: error: method=custom:no_such_module.Toy: cannot import" in capsys.readouterr().err


def test_each_builtin_method_is_one_row_of_the_traits_table(tmp_path: Path) -> None:
    """The config reads ``config_traits.METHODS`` where it once asked ``method == 'simclr'``: each row's views,
    projection, predictor, ZeRO and accumulation rules reach the config, and the method classes agree with it."""
    from fastbyol.config_traits import CUSTOM_METHOD, METHODS, method_traits
    from fastbyol.engine import checkpoint
    from fastbyol.engine.preflight import checkpoint_bytes
    from fastbyol.step.methods import build_method

    overrides = ["byol.predictor_lr_mult=10", "model.proj_dim=64", "simclr.proj_dim=32", "data.views=auto"]
    for name, traits in METHODS.items():
        cfg = build_config("smoke", overrides=[*overrides, f"method={name}"])
        method = build_method(cfg)
        assert method.name == name and method.runs_under_zero == traits.zero
        assert cfg.data.views == traits.views and cfg.proj_dim() == (64 if traits.head == "model" else 32)
        assert cfg.predictor_lr_mult() == (10.0 if traits.predictor else 1.0)
        assert (method.target_schedule(cfg, 10) is not None) == traits.target
        if not traits.accum:
            with pytest.raises(ConfigError, match=f"method={name} needs optim.accum_steps=1"):
                build_config("smoke", overrides=[f"method={name}", "optim.accum_steps=2"])
    simclr = start_run(_cfg(tmp_path, "simclr", "method=simclr", "run.max_steps=2"))
    simclr.train()  # BYOL's estimate is held to a real checkpoint in test_guardrails; SimCLR's (no target) here
    (_, path), = checkpoint.list_checkpoints(tmp_path / "simclr" / "checkpoints")
    estimate = checkpoint_bytes(simclr.cfg)
    assert estimate is not None and abs(path.stat().st_size - estimate) < 0.01 * estimate
    toy = build_config("smoke", overrides=[f"method={TOY}", "data.views=auto", "byol.predictor_lr_mult=10"])
    assert method_traits(TOY) is CUSTOM_METHOD and toy.data.views == "byol" and toy.predictor_lr_mult() == 1.0
    assert checkpoint_bytes(toy) is None  # its heads are the user's
    with pytest.raises(ConfigError, match="method=simclr does not run under run.engine=deepspeed"):
        build_config("smoke", overrides=["method=simclr", "run.engine=deepspeed"])
