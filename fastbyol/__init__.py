"""fastbyol: high-throughput, exact BYOL pretraining of ResNets on PyTorch.

The Python API (``fastbyol.api``), imported on first use so that ``import fastbyol`` stays cheap:
``fastbyol.train(config_or_preset, model=None, dataset=None, *, resume=None, **overrides) -> Path`` and
``fastbyol.load_encoder(run_dir_or_checkpoint, model=None) -> nn.Module``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_encoder", "train"]

if TYPE_CHECKING:
    from fastbyol.api import load_encoder, train


def __getattr__(name: str) -> Any:
    if name in ("train", "load_encoder"):
        from fastbyol import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastbyol' has no attribute {name!r}")
