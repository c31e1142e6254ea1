"""Checks a new run passes in well under a second, before torch is imported (which alone takes ~10-30 s on a busy
CPU): the data folder exists and holds an image, the output folder is writable, and its disk has room for the
checkpoints the run keeps. Each failure is one line with the fix; nothing is written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastbyol.config import OFFICIAL_SHORTCUT_ARCHS, Config
from fastbyol.config_traits import METHODS
from fastbyol.data.folder import IMAGE_EXTENSIONS, scan_image_folder
from fastbyol.errors import FastByolError

# Parameters of torchvision's ResNets without their classifier (``sum(p.numel())`` of each with ``fc`` removed); the
# official ResNet-18/34 (init=haiku) add OFFICIAL_SHORTCUT_PARAMS.
TRUNK_PARAMS = {
    "resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032, "resnet101": 42_500_160,
    "resnet152": 58_143_808, "resnet200": 62_624_832, "wide_resnet50_2": 66_834_240, "wide_resnet101_2": 124_837_696,
}
OFFICIAL_SHORTCUT_PARAMS = 64 * 64 + 2 * 64
"""The official ResNet-18/34's (init=haiku) extra projection shortcut in layer1[0]: a 1x1 conv 64 -> 64 and its
BatchNorm's scale and shift (11,180,736 parameters for ResNet-18)."""
FEATURE_DIM = {"resnet18": 512, "resnet34": 512}  # the others: 2048
MARGIN_BYTES = 1 << 30
"""Free space left beyond the checkpoints: logs, the feature cache, the page cache's write-back."""


def checkpoint_bytes(cfg: Config) -> int | None:
    """About the size of one checkpoint of ``cfg``'s run: the online network (trunk, projection head, BYOL's
    predictor) and the optimizer's momentum in fp32, and the target's trunk and head for a method that keeps one
    (``config_traits.METHODS``). None for an encoder fastbyol has no count for (timm) or a method of the user's."""
    arch = cfg.model.arch
    if arch not in TRUNK_PARAMS or cfg.method not in METHODS:  # a method of the user's: its heads unknown
        return None
    traits = METHODS[cfg.method]
    feat = FEATURE_DIM.get(arch, 2048)
    trunk = TRUNK_PARAMS[arch] + (OFFICIAL_SHORTCUT_PARAMS if cfg.model.init == "haiku" and
                                  arch in OFFICIAL_SHORTCUT_ARCHS else 0)
    hidden, out = cfg.head().proj_hidden, cfg.head().proj_dim
    head = feat * hidden + 3 * hidden + hidden * out  # Linear, BatchNorm, Linear (BYOL's; SimCLR's within 0.1%)
    predictor = out * hidden + 3 * hidden + hidden * out if traits.predictor else 0
    online, target = trunk + head + predictor, (trunk + head if traits.target else 0)
    return 4 * (2 * online + target)  # weights + momentum of the online network, and the target's weights


def _first_image(path: str) -> bool:
    """Whether ``path`` holds an image file at any depth (stops at the first one: instant on ImageNet)."""
    for _, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in filenames):
            return True
    return False


def check_data(cfg: Config) -> None:
    d = cfg.data
    if d.source != "folder" or d.file_list:
        return
    if not os.path.isdir(d.path) or not _first_image(d.path):
        scan_image_folder(d.path)  # raises its one-line error: no such folder, a file, no images


def check_output(cfg: Config, run_dir: Path | None = None) -> None:
    """The output folder can be written and its disk holds ``run.keep_last + 1`` checkpoints plus a margin (the
    ``keep_epochs`` ones are links to them, but each outlives the rolling ones: counted too)."""
    out = Path(run_dir) if run_dir is not None else Path(cfg.run.out_dir)
    probe = out
    while not probe.exists() and probe != probe.parent:  # the nearest existing folder: it will hold the run
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise FastByolError(f"cannot write to {probe}: set run.out_dir to a writable folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".fastbyol-write-check-"):
            pass
    except OSError as e:
        raise FastByolError(f"cannot write to {probe} ({e.strerror or e}): set run.out_dir to a writable "
                            "folder") from None
    size = checkpoint_bytes(cfg)
    if size is None:
        return
    count = cfg.run.keep_last + 1 + len(cfg.run.keep_epochs)
    need = size * count + MARGIN_BYTES
    free = shutil.disk_usage(probe).free
    if free < need:
        raise FastByolError(
            f"{probe} has {_gib(free)} free, but the run keeps up to {count} checkpoints of ~{_gib(size)} plus "
            f"{_gib(MARGIN_BYTES)} of margin ({_gib(need)}): free space, lower run.keep_last (or run.keep_epochs), or "
            "set run.out_dir to a larger disk")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 27 else f"{n / (1 << 20):.1f} MiB"


def preflight(cfg: Config, run_dir: Path | None = None) -> None:
    """Every check, in the order a user would fix them."""
    check_data(cfg)
    check_output(cfg, run_dir)
