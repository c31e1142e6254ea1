"""What each optimizer and each pretraining method supports, as two tables keyed by their config names. The
config's refusals and derived quantities read them (``fastbyol.config``), and so do the engine's choice of
update (``engine/update.py``, whose builders share ``OPTIMIZERS``' keys), the methods (``step/methods.py``,
whose classes share ``METHODS``' keys) and the checkpoint-size estimate (``engine/preflight.py``): a new
optimizer or method adds a row here instead of a branch in each of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class OptimizerTraits:
    """What an ``optim.name`` supports besides the plain update."""

    zero: bool
    """Runs under run.engine=deepspeed (ZeRO shards LARS only: ZeroLARS)."""
    skip: bool
    """run.nonfinite=skip can restore its whole state: a momentum buffer, made before the first step."""
    flat_fused: bool
    """run.kernels=on fuses it with the EMA in one pass over the flat buffers (FlatLARS, one lr for every tensor);
    otherwise the kernels do the EMA alone after torch's optimizer over the buffers' views."""


OPTIMIZERS: dict[str, OptimizerTraits] = {
    "lars": OptimizerTraits(zero=True, skip=True, flat_fused=True),
    "adamw": OptimizerTraits(zero=False, skip=False, flat_fused=False),
    "sgd": OptimizerTraits(zero=False, skip=True, flat_fused=False),
}


def supporting(trait: str) -> str:
    """The optimizers with ``trait``, for an error message: 'lars, sgd'."""
    return ", ".join(name for name, traits in OPTIMIZERS.items() if getattr(traits, trait))


@dataclass(frozen=True)
class MethodTraits:
    """What a ``method`` asks of the config and the engine."""

    views: Literal["byol", "view1"]
    """data.views when it is 'auto': 'byol' (BYOL's asymmetric pair) or 'view1' (view 1 twice)."""
    head: Literal["model", "simclr"]
    """The config section with its projection head's proj_hidden and proj_dim: 'model' or 'simclr'."""
    predictor: bool
    """Has BYOL's predictor: byol.predictor_lr_mult and model.predictor apply to it."""
    target: bool
    """Keeps a target network (moved by the EMA): checkpoints hold a second trunk and head."""
    zero: bool
    """Config.validate lets it run under run.engine=deepspeed (ZeroUpdate shards BYOL's pair); a method of the
    user's is asked when it is built (``Method.runs_under_zero``)."""
    accum: bool
    """optim.accum_steps > 1 keeps its loss (SimCLR's negatives are the whole batch: accumulating would shrink
    them to one micro-batch)."""


METHODS: dict[str, MethodTraits] = {
    "byol": MethodTraits(views="byol", head="model", predictor=True, target=True, zero=True, accum=True),
    "simclr": MethodTraits(views="view1", head="simclr", predictor=False, target=False, zero=False, accum=False),
}
CUSTOM_METHOD = MethodTraits(views="byol", head="model", predictor=False, target=False, zero=True, accum=True)
"""``method=custom:...``: what the config can assume of a method it does not know (the method decides the rest)."""


def method_traits(method: str) -> MethodTraits:
    """``METHODS``' row for a built-in method, ``CUSTOM_METHOD`` for any other (``custom:<module>.<Class>``)."""
    return METHODS.get(method, CUSTOM_METHOD)
