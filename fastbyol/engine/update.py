"""The update strategies: how a run applies its optimizer step and moves its target, chosen once when the
run is built (``build_update``), so the Trainer calls ``update.apply(lr, tau)`` and asks the strategy for
its checkpoint state instead of branching on the engine.

- ``ParamUpdate``: the optimizer (LARS, AdamW or SGD: ``build_optimizer``) over the parameters, then the EMA as
  one ``_foreach_lerp_`` (the reference path); in one process or under DDP.
- ``FlatUpdate``: the online and target parameters live in flat buffers; the fused Triton LARS writes the
  EMA from the same registers (``FlatLARS.step_with_ema``): one pass over memory. One process or DDP.
- ``FlatEmaUpdate``: flat buffers with an optimizer that has no fused pass (AdamW: torch's, fused on a GPU,
  over the parameters' views), then the Triton EMA over the whole target buffer in one launch.
- ``ZeroUpdate``: DeepSpeed ZeRO owns the online half and the sharded LARS state (``ZeroLARS``); the EMA
  reads the gathered full fp32 online weights. Its shards live in DeepSpeed's own checkpoint files.

With no target (SimCLR) the LARS and flat strategies skip the EMA: the pair has no target parameters.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastbyol.config import Config, OptimConfig
from fastbyol.config_traits import OPTIMIZERS
from fastbyol.engine.distributed import DistContext
from fastbyol.errors import FastByolError
from fastbyol.kernels.ema import ema_flat_
from fastbyol.kernels.flat_lars import FlatLARS, optimizer_ema_step_fused
from fastbyol.lr import set_lr
from fastbyol.model.byol import ByolPair
from fastbyol.step.lars import LARS
from fastbyol.step.train_step import optimizer_step, target_step
from fastbyol.telemetry.phases import PhaseTimer


class Update(Protocol):
    """What the Trainer asks of its update strategy."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """LARS, FlatLARS or ZeroLARS."""
        ...

    @property
    def network(self) -> nn.Module:
        """What the forward calls: the pair itself, DDP around it, or DeepSpeed's wrapper."""
        ...

    @property
    def backward(self) -> Callable[[torch.Tensor], object] | None:
        """Replaces ``Tensor.backward`` (DeepSpeed's engine scales by 1 / accum itself); None: the tensor's own."""
        ...

    def loss_scale(self, scale: float) -> float:
        """The factor the micro-batch loss is multiplied by before ``backward``."""
        ...

    def micro_step_done(self, last: bool) -> None:
        """After a micro-batch's backward (DeepSpeed counts the non-boundary ones)."""
        ...

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[object]:
        """Around a micro-batch: DDP all-reduces the gradients in the last micro-batch's backward only."""
        ...

    def apply(self, lr: float, tau: float, phases: PhaseTimer) -> None:
        """The optimizer step at ``lr``, then the target EMA at ``tau``, once per optimizer step."""
        ...

    def protected(self, online: list[torch.Tensor], buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Everything a step writes (for run.nonfinite=skip): weights, momentum, target, BatchNorm statistics."""
        ...

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole pair's state dict, every tensor complete."""
        ...

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer state the fastbyol checkpoint holds ({} where the engine keeps its own)."""
        ...

    def load(self, state: dict[str, Any]) -> None:
        """Model and optimizer from a checkpoint (a DeepSpeed run loaded its own when it was built)."""
        ...

    def save_shards(self, ckpt_dir: Path, step: int) -> str | None:
        """Write the engine's own checkpoint files first, returning their tag (None: nothing to write)."""
        ...

    def prune_shards(self, ckpt_dir: Path, kept_tags: set[str]) -> None:
        """Delete the engine's files of checkpoints no longer kept (rank 0, after the fastbyol file)."""
        ...


def state_mismatch(error: RuntimeError) -> str:
    """The first line of ``load_state_dict``'s error that names tensors (its first line names the module only),
    cut to 300 characters: a missing-keys line lists every key."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 else lines[0] if lines else "load_state_dict failed"
    return line if len(line) <= 300 else line[:297] + "..."


def load_model(pair: nn.Module, model_state: dict[str, torch.Tensor], arch: str) -> None:
    try:
        pair.load_state_dict(model_state)
    except RuntimeError as e:
        raise FastByolError(f"checkpoint does not fit model.arch={arch}: {state_mismatch(e)}") from None


def _no_buffer_sync() -> dict[str, Any]:
    """DDP's switch for not broadcasting buffers every forward (renamed after torch 2.11)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _local_network(pair: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The pair, or DDP around it (the target's parameters need no gradient, so DDP leaves them alone; the
    BatchNorm buffers are global already: no broadcast)."""
    if ctx.engine != "ddp":
        return pair
    return DistributedDataParallel(pair, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=False, **_no_buffer_sync())


def _torch_groups(o: OptimConfig, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LARS's groups for a torch optimizer: the excluded ones without weight decay, ``lr_mult`` kept."""
    return [{"params": g["params"], "weight_decay": 0.0 if g["excluded"] else o.weight_decay,
             "lr_mult": g.get("lr_mult", 1.0)} for g in groups]


OPTIMIZER_BUILDERS: dict[str, Callable[[OptimConfig, list[dict[str, Any]], torch.device], torch.optim.Optimizer]] = {
    "lars": lambda o, groups, device: LARS(groups, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.eta),
    "adamw": lambda o, groups, device: torch.optim.AdamW(
        _torch_groups(o, groups), lr=0.0, betas=(o.adamw_beta1, o.adamw_beta2), eps=o.adamw_eps,
        fused=device.type == "cuda"),
    "sgd": lambda o, groups, device: torch.optim.SGD(_torch_groups(o, groups), lr=0.0, momentum=o.momentum,
                                                     foreach=True),
}
"""How each ``optim.name`` (the config's ``OPTIMIZERS`` table, same keys) is built over the method's
parameter groups; the lr is set every step from the schedule (``set_lr``)."""


def build_optimizer(cfg: Config, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZER_BUILDERS[cfg.optim.name](cfg.optim, groups, device)


class ParamUpdate:
    """The optimizer (LARS or AdamW), then the foreach EMA (the plain-PyTorch reference path)."""

    backward = None

    def __init__(self, pair: nn.Module, optimizer: torch.optim.Optimizer, arch: str, ctx: DistContext,
                 device: torch.device) -> None:
        self.pair, self.arch = pair, arch
        self.online_params, self.target_params = pair.param_pairs()  # type: ignore[operator]
        self.optimizer = optimizer
        self.network = _local_network(pair, ctx, device)

    def loss_scale(self, scale: float) -> float:
        return scale

    def micro_step_done(self, last: bool) -> None:
        pass

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[object]:
        if isinstance(self.network, DistributedDataParallel) and not last:
            return self.network.no_sync()
        return contextlib.nullcontext()

    def apply(self, lr: float, tau: float, phases: PhaseTimer) -> None:
        optimizer_step(self.optimizer, lr)
        if self.target_params:  # SimCLR has no target
            phases.start("ema")
            target_step(self.online_params, self.target_params, tau)

    def protected(self, online: list[torch.Tensor], buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        # LARS only: Config.validate refuses run.nonfinite=skip with AdamW (its state is made at the first step)
        for p in online:  # created here, not at the first step, so the snapshot covers them
            self.optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        return [*online, *self.target_params, *[self.optimizer.state[p]["momentum_buffer"] for p in online],
                *buffers]

    def model_state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = self.pair.state_dict()
        return out

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load(self, state: dict[str, Any]) -> None:
        load_model(self.pair, state["model"], self.arch)
        self.optimizer.load_state_dict(state["optimizer"])

    def save_shards(self, ckpt_dir: Path, step: int) -> str | None:
        return None

    def prune_shards(self, ckpt_dir: Path, kept_tags: set[str]) -> None:
        pass


class FlatEmaUpdate(ParamUpdate):
    """Flat buffers; the optimizer (AdamW) over the parameters' views, then the Triton EMA over the whole
    target buffer in one launch (the online buffer's first part is laid out as the target's).

    ``make_optimizer`` is called with the online flat buffer once the parameters are its views (before DDP
    wraps the pair): FlatLARS works on the buffer itself, a torch optimizer on the Parameter objects, which
    stay the same as their storage moves."""

    def __init__(self, pair: nn.Module, make_optimizer: Callable[[torch.Tensor], torch.optim.Optimizer], arch: str,
                 ctx: DistContext, device: torch.device) -> None:
        self.pair, self.arch = pair, arch
        self.online_params, self.target_params = pair.param_pairs()  # type: ignore[operator]
        self.online_flat, self.target_flat = pair.flatten_pairs_()  # type: ignore[operator]
        self.tau_buf = torch.zeros(1, dtype=torch.float32, device=device)
        self.optimizer = make_optimizer(self.online_flat)
        self.network = _local_network(pair, ctx, device)

    def tau_on_device(self, tau: float) -> torch.Tensor:
        """This step's tau in the device buffer the kernels read: an async write of a host float, no sync."""
        self.tau_buf.fill_(tau)
        return self.tau_buf

    def apply(self, lr: float, tau: float, phases: PhaseTimer) -> None:
        optimizer_step(self.optimizer, lr)
        if self.target_flat is not None:  # SimCLR has no target
            phases.start("ema")
            ema_flat_(self.target_flat, self.online_flat[:self.target_flat.numel()], self.tau_on_device(tau))


class FlatUpdate(FlatEmaUpdate):
    """Flat buffers and the fused Triton LARS (``FlatLARS``), with the EMA written in the same pass."""

    optimizer: FlatLARS

    def apply(self, lr: float, tau: float, phases: PhaseTimer) -> None:
        if self.target_flat is None:  # SimCLR: no target
            optimizer_step(self.optimizer, lr)
        else:
            optimizer_ema_step_fused(self.optimizer, lr, self.target_flat, self.tau_on_device(tau))

    def protected(self, online: list[torch.Tensor], buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        target = [] if self.target_flat is None else [self.target_flat]
        return [self.online_flat, self.optimizer.momentum_flat, *buffers, *target]


class ZeroUpdate:
    """DeepSpeed ZeRO (``fastbyol.engine.zero``) with ZeroLARS; the EMA from the gathered online weights."""

    def __init__(self, pair: ByolPair, groups: list[dict[str, Any]], hyper: dict[str, float], cfg: Config,
                 ctx: DistContext, kernels: bool, run_dir: Path, resume: dict[str, Any] | None) -> None:
        from fastbyol.engine import zero
        from fastbyol.kernels.lars import SHARD_KERNELS
        from fastbyol.step.zero_lars import ZeroLARS

        self.pair, self.zero = pair, zero
        self.online_params, self.target_params = pair.param_pairs()
        if resume is not None:  # the full weights first: DeepSpeed partitions what the modules hold
            load_model(pair, resume["model"], cfg.model.arch)
        self.optimizer = ZeroLARS(groups, kernels=SHARD_KERNELS if kernels else None, **hyper)
        self.engine = zero.build_engine(pair, self.optimizer, cfg, ctx)
        self.optimizer.attach(self.engine)
        if resume is not None:
            if "deepspeed_tag" not in resume:
                raise FastByolError("this checkpoint was not written by a run.engine=deepspeed run: resume it "
                                    "with its own engine (torchrun or a single process)")
            zero.load(self.engine, run_dir / "checkpoints", resume["deepspeed_tag"])
        self.network = zero.DeepSpeedPair(pair, self.engine)
        self.backward = self.engine.backward

    def loss_scale(self, scale: float) -> float:
        return 1.0  # DeepSpeed scales by 1 / accum itself

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def micro_step_done(self, last: bool) -> None:
        if not last:
            self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step count

    def apply(self, lr: float, tau: float, phases: PhaseTimer) -> None:
        set_lr(self.engine.optimizer, lr)
        self.engine.step()  # the accumulation boundary: reduce, ZeroLARS on each partition, gather
        phases.start("ema")
        with self.zero.gathered(self.engine, self.online_params):  # the EMA reads full fp32 online weights
            target_step(self.online_params, self.target_params, tau)

    def protected(self, online: list[torch.Tensor], buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        raise FastByolError("run.nonfinite=skip is not supported with run.engine=deepspeed: use run.nonfinite=stop")

    def model_state(self) -> dict[str, torch.Tensor]:
        with self.zero.gathered(self.engine, self.pair.online_parameters()):
            return {k: v.detach().clone() for k, v in self.pair.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        return {}  # DeepSpeed keeps its sharded LARS state in its own checkpoint

    def load(self, state: dict[str, Any]) -> None:
        pass  # loaded before the engine was built (the weights) and by DeepSpeed (its shards)

    def save_shards(self, ckpt_dir: Path, step: int) -> str | None:
        tag: str = self.zero.save(self.engine, ckpt_dir, step)
        return tag

    def prune_shards(self, ckpt_dir: Path, kept_tags: set[str]) -> None:
        self.zero.prune(ckpt_dir, kept_tags)


def build_update(cfg: Config, ctx: DistContext, pair: nn.Module, groups: list[dict[str, Any]], kernels: bool,
                 device: torch.device, run_dir: Path, resume: dict[str, Any] | None, zero_ok: bool = True) -> Update:
    """The one place the engine and the kernels setting pick how the run updates; ``zero_ok``: the method's
    network can be sharded by ZeroUpdate (``Method.runs_under_zero``: BYOL's)."""
    hyper = dict(weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum, eta=cfg.optim.eta)
    traits = OPTIMIZERS[cfg.optim.name]
    if ctx.world > 1 and cfg.model.predictor == "directpred":
        raise FastByolError("model.predictor=directpred keeps its correlation in one process: run one process, or "
                            "use model.predictor=mlp")
    if any(group.get("lr_mult", 1.0) != 1.0 for group in groups) and (ctx.engine == "deepspeed" or (
            kernels and traits.flat_fused)):
        raise FastByolError(f"byol.predictor_lr_mult={cfg.byol.predictor_lr_mult} needs the per-tensor LARS: set "
                            "run.kernels=off and run.engine=ddp (the fused kernel and ZeRO apply one lr to all)")
    if ctx.engine == "deepspeed":
        if not zero_ok or not traits.zero:  # Config.validate refuses both first
            raise FastByolError("run.engine=deepspeed runs method=byol with optim.name=lars only: use DDP")
        return ZeroUpdate(cast(ByolPair, pair), groups, hyper, cfg, ctx, kernels, run_dir, resume)
    if kernels and traits.flat_fused:  # LARS and the EMA: one pass over identically laid-out flat buffers
        return FlatUpdate(pair, lambda flat: FlatLARS(groups, flat, **hyper), cfg.model.arch, ctx, device)
    if kernels:  # any other optimizer over the buffers' views, then the EMA kernel
        return FlatEmaUpdate(pair, lambda flat: build_optimizer(cfg, groups, device), cfg.model.arch, ctx, device)
    return ParamUpdate(pair, build_optimizer(cfg, groups, device), cfg.model.arch, ctx, device)
