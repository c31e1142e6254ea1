"""DeepSpeed ZeRO for the online network; the target stays a plain replicated module.

DeepSpeed owns the online network (encoder, projector, predictor, probe) and the LARS state: ZeRO-1
shards the momentum, ZeRO-2 also the gradients, ZeRO-3 also the parameters. The client optimizer is
``ZeroLARS`` (``fastbyol.step.zero_lars``), which all-reduces per-tensor partial norms so the trust ratios
are the whole layers' at every stage. Parameters stay fp32 (bf16 is autocast in the forward, as in the
single-process path), so the target EMA reads full-precision online weights: under ZeRO-3 they are
gathered for the EMA and released again.

Checkpoints are two layers: DeepSpeed's own ``save_checkpoint`` (its sharded optimizer and model states,
under ``checkpoints/deepspeed/<tag>``), then, once every rank has finished it, rank 0's atomic fastbyol
checkpoint (``ckpt-<step>.pt``: config, step, data position, the full gathered model, target included,
and the DeepSpeed tag). The fastbyol file is the commit record: a run killed during DeepSpeed's save
resumes from the previous one, and export / eval read it exactly like a single-process checkpoint.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastbyol.config import Config
from fastbyol.engine.distributed import DistContext
from fastbyol.errors import FastByolError
from fastbyol.model.byol import ByolOutputs, ByolPair, online_outputs


class OnlineNet(nn.Module):
    """What DeepSpeed owns: the online tower, predictor and probe of a ByolPair (the same modules)."""

    def __init__(self, pair: ByolPair) -> None:
        super().__init__()
        self.online, self.predictor, self.probe = pair.online, pair.predictor, pair.probe

    def forward(self, view1: torch.Tensor, view2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return online_outputs(self.online, self.predictor, self.probe, view1, view2)


class DeepSpeedPair(nn.Module):
    """``ByolPair.forward`` with the online half run by the DeepSpeed engine (its ZeRO-3 hooks gather the
    parameters) and the target half by the plain replicated target."""

    def __init__(self, pair: ByolPair, engine: Any) -> None:
        super().__init__()
        self.target = pair.target
        self._engine = [engine]  # not a submodule: the engine is not part of this module's state

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> ByolOutputs:
        p1, p2, proj1, logits = self._engine[0](view1, view2)
        with torch.no_grad():
            z1, z2 = self.target(view1), self.target(view2)
        return ByolOutputs(p1, p2, z1, z2, proj1, logits)


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: fp32 parameters, the run's global batch, no gradient clipping
    (DeepSpeed clips to 1.0 by default; BYOL's LARS does not clip), a client optimizer under ZeRO."""
    accum = cfg.optim.accum_steps
    return {
        "train_batch_size": cfg.optim.batch_size,
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size // (world * accum),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.run.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def build_engine(pair: ByolPair, optimizer: torch.optim.Optimizer, cfg: Config, ctx: DistContext) -> Any:
    """``deepspeed.initialize`` around the online half of ``pair`` with the client ``optimizer``."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=OnlineNet(pair), optimizer=optimizer,
                                           config=deepspeed_config(cfg, ctx.world), dist_init_required=False)
    return engine


def gathered(engine: Any, params: list[torch.Tensor]) -> contextlib.AbstractContextManager[object]:
    """Under ZeRO-3 the full parameters on every rank for the duration (a collective); a no-op otherwise."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def save(engine: Any, ckpt_dir: Path, step: int) -> str:
    """DeepSpeed's sharded checkpoint of this step (every rank calls it); returns its tag."""
    tag = f"step-{step:08d}"
    try:
        engine.save_checkpoint(str(ckpt_dir / "deepspeed"), tag=tag, save_latest=False)
    except OSError as e:
        raise FastByolError(f"could not write DeepSpeed checkpoint {ckpt_dir / 'deepspeed' / tag}: "
                            f"{e.strerror or e}; free disk space, then --resume") from None
    return tag


def load(engine: Any, ckpt_dir: Path, tag: str) -> None:
    """Restore the online parameters and the sharded LARS state of ``tag`` (every rank calls it)."""
    path = ckpt_dir / "deepspeed" / tag
    if not path.is_dir():
        raise FastByolError(f"the checkpoint names DeepSpeed state {path}, which is missing: resume from an "
                            "earlier checkpoint of the run, or restore that folder")
    loaded, _ = engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag=tag, load_module_strict=True)
    if loaded is None:
        raise FastByolError(f"DeepSpeed could not load {path} (a different world size or ZeRO stage?): "
                            "resume with the run's world size and run.zero_stage")


def prune(ckpt_dir: Path, keep_tags: set[str]) -> None:
    """Delete DeepSpeed tags that no kept fastbyol checkpoint refers to (rank 0, after the save)."""
    root = ckpt_dir / "deepspeed"
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith("step-") and child.name not in keep_tags:
                shutil.rmtree(child, ignore_errors=True)
