"""The pretraining methods, one object each behind ``Method``: what differs between BYOL and SimCLR (the
network, the loss on its outputs, the metrics row, the compiled region) is here, chosen once when the run is
built (``build_method``), so neither the Trainer nor the step asks which method runs. The target follows
the network: the update strategies move the target parameters the network has, none for SimCLR.

- ``Byol``: an online network and a target moved by the EMA; the symmetric BYOL loss (the predictions against
  the other view's target projections, no gradient into the target); the log shows the step's tau; the
  forward and the loss compile as one graph.
- ``Simclr``: one network, no target; NT-Xent at the run's temperature, its negatives gathered from every
  rank inside the loss (an autograd function around ``all_gather`` that dynamo cannot put in a full graph),
  so with several ranks only the network is compiled.

``losses`` holds the loss functions (``step.train_step.REFERENCE_LOSSES`` or the fused Triton kernels,
``fastbyol.kernels.losses.FUSED_LOSSES``), chosen with the kernels setting.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

import numpy as np
import torch
from torch import nn

from fastbyol.config import CUSTOM_PREFIX, Config
from fastbyol.config_traits import METHODS
from fastbyol.errors import FastByolError
from fastbyol.model.byol import ByolOutputs, ByolPair
from fastbyol.model.network import Network, Outputs
from fastbyol.model.simclr import SimclrNet, SimclrOutputs
from fastbyol.step.lars import lars_param_groups
from fastbyol.step.schedules import tau_schedule
from fastbyol.step.simclr import simclr_loss
from fastbyol.step.train_step import REFERENCE_LOSSES, Losses


class Method(Protocol):
    name: str
    """``cfg.method``'s value."""

    def network(self, cfg: Config, seed: int, probe_classes: int = 0, net: nn.Module | None = None) -> Network:
        """The network the run trains, initialised from ``seed``; ``net``: the user's encoder module
        (``model.arch=custom:...``, the Python API's ``model``) instead of the one ``cfg`` describes."""
        ...

    def loss(self, out: Outputs) -> torch.Tensor:
        """The method's loss (a scalar) on the network's outputs; ``step.train_step.forward_loss`` calls it
        inside the compiled region."""
        ...

    def row_fields(self, tau: float) -> dict[str, float]:
        """The method's own fields of a metrics row for a step run at ``tau``."""
        ...

    def compiles_with_loss(self, world: int) -> bool:
        """Whether ``torch.compile`` takes the forward and the loss as one graph with ``world`` ranks."""
        ...

    def param_groups(self, network: Network) -> list[dict[str, object]]:
        """The optimizer's parameter groups over ``network.online_modules()`` (LARS's two; a group with an
        ``lr_mult`` gets that multiple of the schedule's lr)."""
        ...

    def target_schedule(self, cfg: Config, total_steps: int) -> np.ndarray | None:
        """tau at each step 0..total_steps for the target update, or None for a method without a target."""
        ...

    runs_under_zero: bool
    """Whether run.engine=deepspeed can shard its network (``ZeroUpdate`` wraps BYOL's online tower, predictor
    and probe)."""


def _plain_groups(network: Network) -> list[dict[str, object]]:
    return lars_param_groups(named for module in network.online_modules() for named in module.named_modules())


class Byol:
    name = "byol"
    runs_under_zero = METHODS["byol"].zero

    def __init__(self, losses: Losses = REFERENCE_LOSSES, predictor_lr_mult: float = 1.0) -> None:
        self.losses, self.predictor_lr_mult = losses, predictor_lr_mult

    def network(self, cfg: Config, seed: int, probe_classes: int = 0, net: nn.Module | None = None) -> Network:
        return ByolPair(cfg.model, seed=seed, probe_classes=probe_classes, net=net)

    def loss(self, out: Outputs) -> torch.Tensor:
        assert isinstance(out, ByolOutputs)
        return self.losses.byol(out.p1, out.p2, out.z1.detach(), out.z2.detach())

    def row_fields(self, tau: float) -> dict[str, float]:
        return {"tau": tau}

    def compiles_with_loss(self, world: int) -> bool:
        return True

    def param_groups(self, network: Network) -> list[dict[str, object]]:
        """LARS's two groups; with byol.predictor_lr_mult != 1, two more for the predictor carrying it."""
        if self.predictor_lr_mult == 1.0:
            return _plain_groups(network)
        predictor = cast(ByolPair, network).predictor  # the network this method built
        rest = lars_param_groups(named for module in network.online_modules() if module is not predictor
                                 for named in module.named_modules())
        return rest + [dict(group, lr_mult=self.predictor_lr_mult)
                       for group in lars_param_groups(predictor.named_modules())]

    def target_schedule(self, cfg: Config, total_steps: int) -> np.ndarray:
        return tau_schedule(total_steps, cfg.byol.tau_base)


class Simclr:
    name = "simclr"
    runs_under_zero = METHODS["simclr"].zero

    def __init__(self, temperature: float, losses: Losses = REFERENCE_LOSSES) -> None:
        self.temperature, self.losses = temperature, losses

    def network(self, cfg: Config, seed: int, probe_classes: int = 0, net: nn.Module | None = None) -> Network:
        return SimclrNet(cfg.model, cfg.simclr, seed=seed, probe_classes=probe_classes, net=net)

    def loss(self, out: Outputs) -> torch.Tensor:
        assert isinstance(out, SimclrOutputs)
        return simclr_loss(out.h1, out.h2, self.temperature, self.losses.ntxent)

    def row_fields(self, tau: float) -> dict[str, float]:
        return {}  # no target, no tau

    def compiles_with_loss(self, world: int) -> bool:
        return world == 1

    def param_groups(self, network: Network) -> list[dict[str, object]]:
        return _plain_groups(network)

    def target_schedule(self, cfg: Config, total_steps: int) -> None:
        return None  # no target


def build_method(cfg: Config, losses: Losses = REFERENCE_LOSSES) -> Method:
    """The run's method (``cfg.method``), its loss computed with ``losses``; ``custom:<module>.<Class>`` is
    imported and built as ``Class(cfg, losses)``."""
    if cfg.method.startswith(CUSTOM_PREFIX):
        return _custom_method(cfg.method, cfg, losses)
    if cfg.method == "simclr":
        return Simclr(cfg.nt_xent_temperature(), losses)
    return Byol(losses, cfg.byol.predictor_lr_mult)


METHOD_MEMBERS = ("name", "runs_under_zero", "network", "loss", "row_fields", "compiles_with_loss", "param_groups",
                  "target_schedule")
"""What ``Method`` asks of a class (``method=custom:...`` is checked for each before the run starts)."""


def _custom_method(value: str, cfg: Config, losses: Losses) -> Method:
    module_name, _, class_name = value.removeprefix(CUSTOM_PREFIX).rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise FastByolError(f"method={value}: cannot import {module_name!r} ({e}): put its folder on PYTHONPATH, "
                            "or run from the folder that holds it") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise FastByolError(f"method={value}: module {module_name!r} has no {class_name!r}: name a class it defines")
    method = cls(cfg, losses)
    missing = [m for m in METHOD_MEMBERS if not hasattr(method, m)]
    if missing:
        raise FastByolError(f"method={value}: {class_name} lacks {', '.join(missing)} of "
                            "fastbyol.step.methods.Method: add them")
    return cast(Method, method)
