"""``fastbyol import official``: a checkpoint of the official BYOL code as a fastbyol run directory.

The file's online and target networks (``fastbyol.model.official`` maps the names) go into the ByolPair of the
matching config (the official network: ``model.init=haiku``, ``model.padding=same``; heads and probe sized from the
file), checked tensor for tensor against it, and are written as ``RUN_DIR/config.yaml`` and
``RUN_DIR/checkpoints/ckpt-<step>.pt``: what ``fastbyol eval``, ``fastbyol export`` and ``fastbyol.load_encoder``
read. The file holds no fastbyol training state (data position, fastbyol's LARS momentum), so the run cannot be
resumed; its checkpoint says where it came from (``imported``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastbyol.config import Config
from fastbyol.config_parse import build_config
from fastbyol.engine import checkpoint
from fastbyol.engine.trainer import CHECKPOINT_VERSION
from fastbyol.errors import FastByolError
from fastbyol.files import atomic_write_bytes
from fastbyol.model.byol import ByolPair
from fastbyol.model.official import OfficialImport, map_official, read_official

OFFICIAL_PRESET = "byol-r50-1000ep"
"""The config an imported run starts from (the released ResNet-50's recipe); arch, heads and probe follow the file."""
DATA_PATH = "imagenet-train (the official run's; not recorded in its checkpoint)"
"""data.path of an imported run: the official runs read ImageNet's train split through TFDS, which no path names."""


@dataclass
class ImportedRun:
    """What ``import_official`` wrote, and how every tensor of the file was accounted for."""

    run_dir: Path
    checkpoint: Path
    cfg: Config
    step: int
    mapping: OfficialImport


def imported_config(mapping: OfficialImport, run_dir: Path) -> Config:
    """The official network's config: its arch, Haiku's init and TF's padding, its head widths and classifier."""
    m = mapping.model
    overrides = [f"model.arch={m.arch}", "model.init=haiku", "model.padding=same", f"model.proj_hidden={m.proj_hidden}",
                 f"model.proj_dim={m.proj_dim}", f"model.online_probe={str(bool(m.classes)).lower()}",
                 f"data.path={DATA_PATH}", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}"]
    if m.classes:
        overrides.append(f"data.num_classes={m.classes}")
    return build_config(OFFICIAL_PRESET, overrides=overrides)


def checked_state(mapping: OfficialImport, cfg: Config, path: Path) -> dict[str, torch.Tensor]:
    """The pair's state_dict from the file's tensors, in the pair's order, once every leaf of the file is mapped or
    left out by name and every tensor of the pair is set, with its shape."""
    if mapping.unmapped:
        raise FastByolError(f"{path}: {len(mapping.unmapped)} tensors left unmapped, e.g. "
                            f"{', '.join(mapping.unmapped[:3])}: not the official network fastbyol imports")
    with torch.device("meta"):  # shapes only: no random init to pay for
        pair = ByolPair(cfg.model, probe_classes=mapping.model.classes)
    want = pair.state_dict()
    extra = [k for k in mapping.state if k not in want]
    if extra:
        source = {key: leaf for leaf, key in mapping.mapped}
        raise FastByolError(f"{path}: {len(extra)} tensors left unmapped, e.g. {source[extra[0]]} (as {extra[0]}), "
                            f"which fastbyol's {cfg.model.arch} has not")
    missing = [k for k in want if k not in mapping.state]
    if missing:
        raise FastByolError(f"{path} lacks {len(missing)} tensors of the official {cfg.model.arch}, e.g. "
                            f"{', '.join(missing[:3])}: the file is damaged or of another network")
    for key, t in want.items():
        got = mapping.state[key]
        if got.shape != t.shape:
            official = next(o for o, k in mapping.mapped if k == key)
            raise FastByolError(f"{path}: {official} has shape {list(got.shape)}, but {key} of fastbyol's "
                                f"{cfg.model.arch} needs {list(t.shape)}")
    return {key: mapping.state[key].to(t.dtype) for key, t in want.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def import_official(source: str | Path, run_dir: str | Path) -> ImportedRun:
    """Read the official checkpoint ``source`` and write it as the run directory ``run_dir`` (new, or empty)."""
    source, run_dir = Path(source), Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise FastByolError(f"{run_dir} exists and is not an empty folder: pass a new run directory")
    official = read_official(source)
    mapping = map_official(official, source)
    cfg = imported_config(mapping, run_dir)
    state = checked_state(mapping, cfg, source)
    step = max(official.step, 0)
    imported = {"source": str(source.resolve()), "sha256": _sha256(source), "step": official.step,
                "format": "deepmind-research/byol pretraining checkpoint (experiment_state)",
                "mapped": len(mapping.mapped), "dropped": len(mapping.dropped)}
    path = write_run(run_dir, cfg, state, step, imported)
    return ImportedRun(run_dir, path, cfg, step, mapping)


def write_run(run_dir: Path, cfg: Config, state: dict[str, torch.Tensor], step: int, imported: dict[str, Any]) -> Path:
    """``config.yaml`` and ``checkpoints/ckpt-<step>.pt`` of an imported run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())
    except OSError as e:
        raise FastByolError(f"cannot write {run_dir}: {e.strerror or e}: pass a run directory on a writable disk") \
            from None
    payload = {"version": CHECKPOINT_VERSION, "config": cfg.to_dict(), "step": step, "epoch": None, "model": state,
               "imported": imported}
    return checkpoint.save(payload, run_dir / "checkpoints", step, keep_last=1)
