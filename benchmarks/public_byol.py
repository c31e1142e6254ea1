"""A public BYOL as a yardstick: lightly 1.6.0's BYOL, trained on fastbyol's data and network, saving the online
ResNet-18 at chosen epochs for fastbyol's learning-curve evaluation (the same images, network, 32 px, batch
and epochs as fastbyol's ``shapes`` preset; only the BYOL recipe is lightly's).

Run it through ``scripts/lightly_byol.sh`` (it installs lightly==1.6.0 into a side folder, no dependencies, and
checks the version), e.g.::

    bash scripts/lightly_byol.sh --data /tmp/shapes --out runs/lightly-byol-shapes --epochs 200 --batch-size 64

Running the same command again resumes from ``--out``/state.pt at the next epoch; a finished run says so.

What comes from lightly (every piece is lightly's own class or function)
-----------------------------------------------------------------------
The recipe is lightly's CIFAR-10 benchmark, its BYOL model (``class BYOLModel``) and ``byol_transform``, file
``docs/source/getting_started/benchmarks/cifar10_benchmark.py`` of github.com/lightly-ai/lightly (read at
commit e8d317f, 2026-08-21, whose BYOL code is the 1.6.0 wheel's but for GaussianBlur's removed, deprecated
``kernel_size``). Its optimizer, heads and tau date from 2021-22; ``byol_transform`` from July 2023 (#1325): its
results table (27.03.2023: BYOL, batch 128, 200 epochs, kNN 0.869) was measured before, with SimCLR's views.
The loop is ``examples/pytorch/byol.py``'s plain PyTorch loop, in the order
it and the benchmark's ``training_step`` use: EMA update first, then the online and target forwards of both
views, then the loss, backward and optimizer step.

- heads: ``BYOLProjectionHead(512, 1024, 256)`` and ``BYOLPredictionHead(256, 1024, 256)`` (Linear -> BN1d ->
  ReLU -> Linear, lightly.models.modules.heads), as in the benchmark and the example.
- target: ``copy.deepcopy`` of the online backbone and projection head, ``deactivate_requires_grad`` on both;
  ``update_momentum(online, target, m=tau)`` (lightly.models.utils: parameters only, one ``_foreach`` lerp per
  module) before each step's forwards. Both networks stay in training mode (as under Lightning), so the
  target's BatchNorm uses batch statistics and updates its own running statistics, as BYOL.md asks.
- tau: constant 0.99 (the benchmark's ``update_momentum(..., m=0.99)``), computed as lightly's
  ``cosine_schedule(step, total_steps, tau_base, tau_end)`` (lightly.utils.scheduler) with tau_base = tau_end =
  0.99; ``--tau-end 1.0`` gives the cosine 0.99 -> 1 per step of lightly's ImageNet BYOL benchmark
  (``benchmarks/imagenet/resnet50/byol.py``) and of the paper.
- loss: ``0.5 * (NegativeCosineSimilarity()(p0, z1) + NegativeCosineSimilarity()(p1, z0))`` (lightly.loss), the
  mean of -cos over the batch and over the two directions: values in [-1, 1].
- optimizer: ``torch.optim.SGD(lr=0.06 * batch / 128, momentum=0.9, weight_decay=5e-4)`` over the online
  backbone, projection and prediction heads, every parameter decayed (BatchNorm and biases too), the
  benchmark's ``lr_factor = batch_size / 128`` scaling: 0.03 at batch 64. Schedule:
  ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch (Lightning's default interval), no warm-up.
- views: ``BYOLTransform(BYOLView1Transform(input_size=S, gaussian_blur=0.0), BYOLView2Transform(input_size=S,
  gaussian_blur=0.0))`` (lightly.transforms.byol_transform), S = ``--image-size``: lightly disables blur at
  CIFAR's 32 px ("We disable resizing and gaussian blur for cifar10", examples/pytorch/byol.py; the benchmark's
  ``byol_transform`` is the same), at every size here, as the recipe is the 32 px one. Everything else is
  lightly's default: RandomResizedCrop scale (0.08, 1), horizontal flip 0.5, colour jitter p 0.8 at strength 1.0
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; the benchmark keeps 1.0 for BYOL although the
  docstring suggests 0.5 for CIFAR), grayscale 0.2, solarization 0.0 / 0.2 (views 1 / 2), then ToTensor and
  ImageNet normalisation (lightly.transforms.utils.IMAGENET_NORMALIZE). curve.json records every value as the
  installed lightly's signatures give it.
- data: ``drop_last=True``, shuffled, fp32 (the benchmark's Lightning default precision).

What differs from fastbyol's ``shapes`` preset, and why
-------------------------------------------------------
The same on purpose, so the curves compare recipes and not inputs: the image folder (DIR/train), torchvision's
``resnet18()`` at its default init with the ImageNet stem (7x7 stride-2 conv and max-pool; fc replaced by
Identity, 512-d pooled features, lightly's ImageNet benchmark's way), 32 px, batch 64, the epochs, the target a
copy of the online network. lightly's CIFAR-10 benchmark itself uses its ``ResNetGenerator("resnet-18")``, a
CIFAR stem (3x3 stride-1 conv, no max-pool), batch 128; not used here.

Different, because they are lightly's recipe (the point of the benchmark):

- optimizer: SGD, lr 0.03 at batch 64, every parameter decayed, per-epoch cosine, no warm-up; fastbyol: LARS
  (base 1.0, peak 0.25 at batch 64, biases and BN out of the decay and trust ratio), 1 warm-up epoch, per-step
  cosine. Weight decay is 5e-4 in both.
- tau: constant 0.99; fastbyol: cosine 0.99 -> 1.
- heads: 512 -> 1024 -> 256 and 256 -> 1024 -> 256; fastbyol's shapes preset: 512 -> 512 -> 128 for both.
- loss: lightly averages the two directions of -cos; BYOL's (and fastbyol's) loss sums 2 - 2 cos over both, 4x
  the gradient, so at equal lr lightly's steps are 4x smaller (BYOL.md's pitfall; lightly's lr goes with its loss).
- views: lightly's jitter at strength 1.0 with grayscale 0.2, crops from 8% of the area, no blur, solarization
  0.2 on view 2; fastbyol's shapes preset: strong jitter (0.8, 0.8, 0.8, any hue; grayscale 0.5), crops from
  30%, BYOL's blur (3 taps at 32 px, p 1.0 / 0.1) and solarization 0.2 on view 2.

Outputs in ``--out``, each written atomically (temp file in the folder, fsync, rename, fsync of the folder):
``epoch-<e>.pth`` (the online backbone's state_dict with torchvision's names, no ``fc.*``, CPU tensors) at each
``--keep-epochs`` epoch the run reaches; ``curve.json`` (label, arch, stem, image size, every setting, versions);
``metrics.jsonl`` (per epoch: mean loss, the epoch's lr, tau at its last step, img/s of the epoch, wall_s =
training seconds since the run began, summed over resumes); ``state.pt`` (online, target, optimizer, lr
scheduler, epoch, RNG states) after every epoch.

Determinism: the initial weights come from ``torch.manual_seed(seed)``; each epoch's shuffle and worker seeds from
a DataLoader generator seeded by (seed, epoch), each worker seeding numpy and ``random`` from its torch seed
(lightly's solarization draws from numpy), so an epoch's views do not depend on how the run got there and a
resumed run repeats an uninterrupted one (for a given --workers; cuDNN in deterministic mode on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import io
import json
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torchvision
from torch import nn

from fastbyol.files import atomic_write_bytes, atomic_write_text

PROG = "public_byol"
LABEL = "lightly 1.6.0 BYOL"
LIGHTLY_VERSION = "1.6.0"
DEFAULT_KEEP = "1,3,10,30,50,100,150,200,300"
# lightly's CIFAR-10 benchmark (docs/source/getting_started/benchmarks/cifar10_benchmark.py, BYOLModel): SGD at
# lr 6e-2 * batch / 128, momentum 0.9, weight decay 5e-4; tau 0.99; heads 512 -> 1024 -> 256 -> 1024 -> 256.
BASE_LR, LR_REF_BATCH, SGD_MOMENTUM, WEIGHT_DECAY, TAU = 0.06, 128, 0.9, 5e-4, 0.99
FEATURES, PROJ_HIDDEN, PROJ_DIM, PRED_HIDDEN = 512, 1024, 256, 1024
# The benchmark's byol_transform: lightly's view defaults but blur off in both views ("We disable resizing and
# gaussian blur for cifar10": examples/pytorch/byol.py).
VIEW_OVERRIDES: dict[str, Any] = {"gaussian_blur": 0.0}


class UsageError(Exception):
    """A mistake in the command (or its folders) the user can fix: one line to stderr, exit 2."""


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints the usage too: one line is enough in a log
        fail(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=f"python -m benchmarks.{PROG}", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="image folder with class sub-folders; DIR/train is used when DIR has one")
    parser.add_argument("--out", type=Path, required=True, help="run folder (created; rerun to resume)")
    parser.add_argument("--epochs", type=int, default=200, help="training epochs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the views in px (default %(default)s)")
    parser.add_argument("--keep-epochs", default=DEFAULT_KEEP,
                        help="epochs whose online backbone is saved as epoch-<e>.pth (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, shuffles and views (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible)")
    parser.add_argument("--base-lr", type=float, default=BASE_LR,
                        help=f"SGD lr at batch {LR_REF_BATCH}, scaled linearly with --batch-size (default %(default)s)")
    parser.add_argument("--momentum", type=float, default=SGD_MOMENTUM, help="SGD momentum (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY,
                        help="SGD weight decay, on every parameter (default %(default)s)")
    parser.add_argument("--tau-base", type=float, default=TAU, help="target EMA decay at step 0 (default %(default)s)")
    parser.add_argument("--tau-end", type=float, default=TAU,
                        help="target EMA decay at the last step, cosine in between (default %(default)s: constant)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        fail(f"--workers must be >= 0, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
    for name in ("tau_base", "tau_end"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not (args.base_lr > 0 and math.isfinite(args.base_lr)):
        fail(f"--base-lr must be a positive number, got {args.base_lr}")
    args.keep_epochs = parse_keep_epochs(args.keep_epochs)
    return args


def parse_keep_epochs(text: str) -> list[int]:
    """``"1,3,10"`` -> [1, 3, 10] (sorted, unique); an empty string keeps none."""
    epochs = set()
    for item in (s.strip() for s in text.split(",")):
        if not item and not text.strip():
            continue
        if not item.isdigit() or int(item) < 1:
            fail(f"--keep-epochs has {item!r}: give positive whole epochs separated by commas, e.g. 1,3,10,30")
        epochs.add(int(item))
    return sorted(epochs)


def train_folder(data: Path) -> Path:
    if not data.is_dir():
        fail(f"--data {data}: no such folder")
    return (data / "train") if (data / "train").is_dir() else data


# --- lightly (imported where used: it lives in the side folder scripts/lightly_byol.sh installs) -----------------
def import_lightly() -> Any:
    try:
        lightly = importlib.import_module("lightly")
    except ImportError as e:
        fail(f"lightly is not importable ({e}): run this through bash scripts/lightly_byol.sh, which installs "
             f"lightly=={LIGHTLY_VERSION} into a side folder")
    if lightly.__version__ != LIGHTLY_VERSION:
        fail(f"lightly {lightly.__version__} imported from {lightly.__file__}, expected {LIGHTLY_VERSION}: run this "
             "through bash scripts/lightly_byol.sh")
    return lightly


def view_settings() -> dict[str, dict[str, Any]]:
    """Every argument of lightly's two view transforms as this run uses them: the installed lightly's defaults
    (read from its signatures) with ``VIEW_OVERRIDES``; ``input_size`` is filled in by ``build_transform``."""
    from lightly.transforms.byol_transform import (  # type: ignore[import-untyped]
        BYOLView1Transform,
        BYOLView2Transform,
    )

    views = {}
    for name, cls in (("view_1", BYOLView1Transform), ("view_2", BYOLView2Transform)):
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        views[name] = {**defaults, **VIEW_OVERRIDES}
    return views


def build_transform(views: dict[str, dict[str, Any]]) -> Any:
    from lightly.transforms.byol_transform import (  # type: ignore[import-untyped]
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
    )

    return BYOLTransform(view_1_transform=BYOLView1Transform(**views["view_1"]),
                         view_2_transform=BYOLView2Transform(**views["view_2"]))


class BYOL(nn.Module):
    """lightly's BYOL module (examples/pytorch/byol.py, cifar10_benchmark.py's BYOLModel) around torchvision's
    ResNet-18: the online backbone and heads, and the target (``*_momentum``) copies of backbone and projector."""

    def __init__(self) -> None:
        super().__init__()
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead  # type: ignore[import-untyped]
        from lightly.models.utils import deactivate_requires_grad  # type: ignore[import-untyped]

        resnet = torchvision.models.resnet18()  # torchvision's default init, ImageNet stem
        resnet.fc = nn.Identity()  # 512-d pooled features; state_dict keeps torchvision's names, no fc.*
        self.backbone = resnet
        self.projection_head = BYOLProjectionHead(FEATURES, PROJ_HIDDEN, PROJ_DIM)
        self.prediction_head = BYOLPredictionHead(PROJ_DIM, PRED_HIDDEN, PROJ_DIM)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(y)
        return self.prediction_head(z)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()

    def online_parameters(self) -> list[nn.Parameter]:
        """What the benchmark's configure_optimizers hands to SGD."""
        return [*self.backbone.parameters(), *self.projection_head.parameters(), *self.prediction_head.parameters()]

    def online_state(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "projection_head": self.projection_head.state_dict(),
                "prediction_head": self.prediction_head.state_dict()}

    def target_state(self) -> dict[str, Any]:
        return {"backbone": self.backbone_momentum.state_dict(),
                "projection_head": self.projection_head_momentum.state_dict()}

    def load_states(self, online: dict[str, Any], target: dict[str, Any]) -> None:
        self.backbone.load_state_dict(online["backbone"])
        self.projection_head.load_state_dict(online["projection_head"])
        self.prediction_head.load_state_dict(online["prediction_head"])
        self.backbone_momentum.load_state_dict(target["backbone"])
        self.projection_head_momentum.load_state_dict(target["projection_head"])


# --- data --------------------------------------------------------------------------------------------------------
def load_dataset(root: Path, transform: Any) -> torchvision.datasets.ImageFolder:
    try:
        dataset = torchvision.datasets.ImageFolder(str(root), transform=transform, allow_empty=True)
    except FileNotFoundError:
        fail(f"--data {root}: no class sub-folders (an image folder is DIR/<class>/<image>, e.g. made by "
             "`fastbyol data make shapes DIR`)")
    if len(dataset) == 0:
        extensions = " ".join(torchvision.datasets.folder.IMG_EXTENSIONS)
        fail(f"--data {root}: no images in its class sub-folders (files ending {extensions})")
    return dataset


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch): an epoch's shuffle and views do not depend on the epochs before it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_host_generators(seed: int) -> None:
    """numpy's and ``random``'s global generators: lightly's solarization (and blur) draw from numpy."""
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader workers get torch seed base + id from the loader's generator; numpy's state a forked worker
    would otherwise inherit unchanged, epoch after epoch."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main's handler is for the main process: a worker just ends
    seed_host_generators(torch.initial_seed())


def epoch_loader(dataset: torchvision.datasets.ImageFolder, args: argparse.Namespace, epoch: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    seed = epoch_seed(args.seed, epoch)
    if args.workers == 0:  # the views are drawn in this process, from its global generators
        torch.manual_seed(seed)
        seed_host_generators(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=seed_worker,
        pin_memory=device.type == "cuda")


# --- files -------------------------------------------------------------------------------------------------------
def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def rng_state() -> dict[str, Any]:
    """Weights-only-loadable (tensors, ints, strings, tuples): numpy's key array as a tensor."""
    kind, key, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss),
                      float(cached)),
            "random": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {json.dumps(old.get(key))} there, {json.dumps(new.get(key))} here"
    return ""


def read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """The rows of epochs 1..upto (a row written after the last state.pt is dropped: that epoch reruns)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["epoch"] <= upto]


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- the run -----------------------------------------------------------------------------------------------------
def settings_of(args: argparse.Namespace, root: Path, images: int, views: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every hyperparameter the run uses (curve.json; a resume must match it)."""
    steps = images // args.batch_size
    return {
        "data": str(root.resolve()), "images": images, "epochs": args.epochs, "batch_size": args.batch_size,
        "steps_per_epoch": steps, "total_steps": steps * args.epochs, "image_size": args.image_size,
        "seed": args.seed, "workers": args.workers, "keep_epochs": args.keep_epochs, "drop_last": True,
        "precision": "fp32",
        "network": "torchvision.models.resnet18(), default init, ImageNet stem, fc = Identity (512-d)",
        "target_init": "copy.deepcopy(online)", "target_mode": "train (batch statistics)",
        "projection_head": [FEATURES, PROJ_HIDDEN, PROJ_DIM], "prediction_head": [PROJ_DIM, PRED_HIDDEN, PROJ_DIM],
        "loss": "0.5 * (NegativeCosineSimilarity(p0, z1) + NegativeCosineSimilarity(p1, z0))",
        "optimizer": "torch.optim.SGD (every online parameter decayed)", "base_lr": args.base_lr,
        "lr_ref_batch": LR_REF_BATCH, "lr": args.base_lr * args.batch_size / LR_REF_BATCH,
        "momentum": args.momentum, "nesterov": False, "weight_decay": args.weight_decay,
        "lr_schedule": "CosineAnnealingLR(T_max=epochs, eta_min=0), stepped per epoch, no warm-up",
        "tau_base": args.tau_base, "tau_end": args.tau_end,
        "tau_schedule": "lightly cosine_schedule(step, total_steps, tau_base, tau_end), per step",
        "ema_order": "update_momentum before each step's forwards (lightly's)",
        "views": {name: {**view, "input_size": args.image_size} for name, view in views.items()},
        "source": "lightly docs/source/getting_started/benchmarks/cifar10_benchmark.py (BYOLModel, byol_transform)",
    }


def train(args: argparse.Namespace) -> int:
    root = train_folder(args.data)
    lightly = import_lightly()
    from lightly.loss import NegativeCosineSimilarity  # type: ignore[import-untyped]
    from lightly.models.utils import update_momentum  # type: ignore[import-untyped]
    from lightly.utils.scheduler import cosine_schedule  # type: ignore[import-untyped]

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} asked but no CUDA GPU is visible: use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    views = view_settings()
    for view in views.values():
        view["input_size"] = args.image_size
    dataset = load_dataset(root, build_transform(views))
    steps = len(dataset) // args.batch_size
    if steps == 0:
        fail(f"--batch-size {args.batch_size} is more than the {len(dataset)} images in {root} (drop_last): "
             "use a smaller batch")
    settings = settings_of(args, root, len(dataset), views)
    settings = json.loads(json.dumps(settings))  # as curve.json holds it (tuples -> lists), for the comparison

    out: Path = args.out
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: give a folder")
    out.mkdir(parents=True, exist_ok=True)
    curve_path, state_path, metrics_path = out / "curve.json", out / "state.pt", out / "metrics.jsonl"
    state: dict[str, Any] | None = None
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    for name, old in (("curve.json", json.loads(curve_path.read_text())["settings"] if curve_path.is_file() else None),
                      ("state.pt", state["settings"] if state is not None else None)):
        if old is not None and old != settings:
            fail(f"{out} was started with other settings ({name}: {first_difference(old, settings)}): rerun with "
                 "its arguments, or give another --out")
    done = state["epoch"] if state is not None else 0
    if done >= args.epochs:
        print(f"{PROG}: {out} is done ({done}/{args.epochs} epochs): nothing to do", file=sys.stderr, flush=True)
        return 0
    curve = {"label": LABEL, "arch": "resnet18", "small_stem": False, "image_size": args.image_size,
             "settings": settings, "lightly": lightly.__version__, "torch": torch.__version__,
             "torchvision": torchvision.__version__, "device": str(device)}
    atomic_write_text(curve_path, json.dumps(curve, indent=2) + "\n")

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.manual_seed(args.seed)
    model = BYOL().to(device)
    model.train()  # online and target alike: the target's BatchNorm uses batch statistics (BYOL.md)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.online_parameters(), lr=settings["lr"], momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    wall_total = 0.0
    if state is not None:
        model.load_states(state["online"], state["target"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        wall_total = state["wall_s"]
    rows = read_metrics(metrics_path, done)
    total_steps = steps * args.epochs
    print(f"{PROG}: lightly {lightly.__version__} BYOL, resnet18 (ImageNet stem) on {len(dataset)} images of "
          f"{root} at {args.image_size} px, {steps} steps/epoch of {args.batch_size}, lr {settings['lr']:g}, "
          f"{device}; " + (f"resuming after epoch {done}" if done else "from scratch") + f" -> {out}",
          file=sys.stderr, flush=True)

    session_s = 0.0
    for epoch in range(done, args.epochs):  # epoch is 0-based here, 1-based in files and lines
        loader = epoch_loader(dataset, args, epoch, device)
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)
        tau = args.tau_base
        t0 = time.perf_counter()
        for i, (views_batch, _) in enumerate(loader):
            step = epoch * steps + i
            tau = cosine_schedule(step, total_steps, args.tau_base, args.tau_end)
            update_momentum(model.backbone, model.backbone_momentum, m=tau)
            update_momentum(model.projection_head, model.projection_head_momentum, m=tau)
            x0 = views_batch[0].to(device, non_blocking=True)
            x1 = views_batch[1].to(device, non_blocking=True)
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            loss_sum += loss.detach()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
        mean_loss = (loss_sum / steps).item()  # one device sync per epoch
        seconds = time.perf_counter() - t0
        session_s += seconds
        wall_total += seconds
        number = epoch + 1
        if number in args.keep_epochs:
            backbone = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
            save_torch(out / f"epoch-{number}.pth", backbone)
        rows.append({"epoch": number, "loss": mean_loss, "lr": lr, "tau": tau,
                     "img_per_s": steps * args.batch_size / seconds, "wall_s": wall_total})
        atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
        save_torch(state_path, {"epoch": number, "settings": settings, "online": model.online_state(),
                                "target": model.target_state(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "rng": rng_state(), "wall_s": wall_total})
        eta = session_s / (number - done) * (args.epochs - number)
        print(f"{PROG}: epoch {number}/{args.epochs} loss {mean_loss:.4f} lr {lr:.4g} tau {tau:.4f} "
              f"{steps * args.batch_size / seconds:.1f} img/s {seconds:.1f} s eta {duration(eta)}",
              file=sys.stderr, flush=True)
    print(f"{PROG}: done: {args.epochs} epochs in {duration(wall_total)}; kept "
          f"{[e for e in args.keep_epochs if e <= args.epochs]} in {out}", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def stop(signum: int, frame: object) -> None:  # unwinds, so an atomic write in flight removes its temp file
        fail(f"stopped by signal {signum}: rerun the same command to resume from the last finished epoch",
             128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        return train(args)
    except KeyboardInterrupt:
        fail("interrupted: rerun the same command to resume from the last finished epoch", 130)


if __name__ == "__main__":
    sys.exit(main())
