"""Evaluation and export composed from checkpoints: what ``fastbyol eval``, ``export`` and ``demo`` run."""

from __future__ import annotations

import io
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastbyol.config import Config, ModelConfig
from fastbyol.config_parse import config_from_dict
from fastbyol.data.folder import ImageFiles
from fastbyol.engine import checkpoint
from fastbyol.errors import FastByolError
from fastbyol.eval import finetune as finetuning
from fastbyol.eval.export import export_bytes, online_encoder_state, torchvision_notes
from fastbyol.eval.features import (
    CenterViews,
    FeatureCache,
    FeatureKey,
    data_fingerprint,
    default_workers,
    extract_features,
    precision_name,
    resolve_loader,
    state_fingerprint,
    view_name,
)
from fastbyol.eval.knn import knn_accuracy
from fastbyol.eval.linear import linear_probe
from fastbyol.files import atomic_write_bytes
from fastbyol.model.backbone import Encoder
from fastbyol.telemetry.sinks import ProgressBar


@dataclass
class CheckpointEncoder:
    """The online encoder of a checkpoint, with where it came from (the feature cache's key and folder)."""

    encoder: Encoder
    cfg: Config
    run_dir: Path
    """The run directory (a checkpoint file outside ``checkpoints/``: its folder)."""
    identity: str
    """``checkpoint sha256:<hex>`` from the file's header (what ``checkpoint.load`` verified), or the
    encoder's ``state_fingerprint`` where the loaded file cannot be named again."""
    step: int = -1
    """The optimizer step the checkpoint was saved at (-1: not recorded)."""
    epoch: float | None = None
    """Its epoch (checkpoints written before run.keep_epochs existed do not record it)."""
    path: Path | None = None
    """The checkpoint file read (a run directory resolves to its newest valid one)."""


def load_checkpoint_encoder(target: str, expect_arch: str | None = None) -> CheckpointEncoder:
    """The ONLINE encoder of a checkpoint file or run directory (never the target)."""
    run_dir, state = checkpoint.resolve_resume(target)
    cfg = config_from_dict(state["config"])
    if expect_arch and expect_arch != cfg.model.arch:
        raise FastByolError(f"checkpoint {target} holds a {cfg.model.arch} encoder, not {expect_arch}: "
                            f"pass a {expect_arch} checkpoint or drop --arch")
    weights = online_encoder_state(state["model"])
    try:
        encoder = _encoder_with(cfg.model, weights)
    except RuntimeError as e:
        raise FastByolError(f"checkpoint {target} does not fit a {cfg.model.arch} encoder "
                            f"({str(e).splitlines()[0]}): it was written for another architecture") from None
    # A run directory resolves to its newest valid ckpt-<step>.pt; the state names the step it was saved at.
    path = Path(target) if Path(target).is_file() else run_dir / "checkpoints" / checkpoint.checkpoint_name(
        int(state.get("step", -1)))
    return CheckpointEncoder(encoder, cfg, run_dir, checkpoint_digest(path) or state_fingerprint(encoder),
                             step=int(state.get("step", -1)), epoch=state.get("epoch"), path=path)


def _encoder_with(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> Encoder:
    """The encoder of ``cfg`` holding ``weights``. Built on the meta device first: the random init the weights
    replace costs seconds on a CPU (Haiku's truncated normal over a ResNet-18's 11 M values: ~3 s). A model
    whose state_dict leaves a buffer unset (a non-persistent one) is built again the ordinary way."""
    try:
        with torch.device("meta"):
            encoder = Encoder.from_config(cfg)
    except Exception:  # an init that reads values (meta tensors have none): build it on the CPU
        encoder = Encoder.from_config(cfg)
    encoder.load_state_dict(weights, assign=True)
    if any(t.is_meta for t in itertools.chain(encoder.parameters(), encoder.buffers())):
        encoder = Encoder.from_config(cfg)
        encoder.load_state_dict(weights)
    return encoder


def checkpoint_digest(path: Path) -> str | None:
    """``checkpoint sha256:<hex>`` from a checkpoint file's header: the SHA-256 of its payload, verified when
    it was loaded; None if the file is gone (a newer checkpoint replaced it meanwhile) or not one."""
    magic = checkpoint.MAGIC
    try:
        with path.open("rb") as f:
            header = f.read(len(magic) + 64)
    except OSError:
        return None
    if len(header) != len(magic) + 64 or not header.startswith(magic):
        return None
    return f"checkpoint sha256:{header[len(magic):].decode('ascii', 'replace')}"


def encoder_from_checkpoint(target: str, expect_arch: str | None = None) -> tuple[Encoder, Config]:
    """The ONLINE encoder of a checkpoint file or run directory (never the target), and the run's config."""
    loaded = load_checkpoint_encoder(target, expect_arch)
    return loaded.encoder, loaded.cfg


@torch.no_grad()
def calibrate_batchnorm(encoder: Encoder, files: ImageFiles, size: int, device: torch.device,
                        batches: int = 8, batch_size: int = 128) -> None:
    """Set BatchNorm running statistics from training images (a forward in train mode, no gradient), so a
    random-init encoder normalises its features like a trained one: a fair baseline, not a broken one."""
    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    encoder.train()
    loader = torch.utils.data.DataLoader(CenterViews(files, size), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for i, (x, _) in enumerate(loader):
        if i == batches:
            break
        encoder(x.to(device))
    encoder.eval()


def calibrated_random_encoder(cfg: ModelConfig, seed: int, data_root: str, size: int,
                              device: torch.device, init: str = "haiku") -> Encoder:
    """A baseline: the same architecture at random initialisation (seeded; ``init`` 'haiku' as training
    starts, or 'torchvision', the standard random network), BatchNorm calibrated on the training split of
    ``data_root``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder.from_config(cfg, init=init).to(device)
    calibrate_batchnorm(encoder, split_files(data_root)[0], size, device)
    return encoder


def split_files(data_root: str) -> tuple[ImageFiles, ImageFiles]:
    root = Path(data_root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FastByolError(f"{data_root} has no {split}/ folder: evaluation needs {data_root}/train and "
                                f"{data_root}/val (e.g. from `fastbyol data make digits OUT`)")
    train, val = ImageFiles.scan(str(root / "train")), ImageFiles.scan(str(root / "val"))
    return train, val


def _workers(workers: int | None, device: torch.device) -> int:
    """DataLoader processes for evaluation: ``workers``, or ``default_workers(device)`` when None."""
    workers = default_workers(device) if workers is None else workers
    if workers < 0:
        raise FastByolError(f"workers {workers}: use 0 (decode in this process) or more DataLoader processes")
    return workers


def _num_classes(train: ImageFiles, val: ImageFiles) -> int:
    return max(max(train.labels), max(val.labels)) + 1


def open_feature_cache(folder: Path | str, chosen: bool) -> FeatureCache | None:
    """The feature cache in ``folder`` (created). A folder the user ``chose`` (``--cache``) that cannot be
    created is an error; the default one (``RUN_DIR/eval-cache``, e.g. in a read-only run) turns the cache
    off with one line."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if chosen:
            raise FastByolError(f"cannot create the feature cache folder {folder}: {e.strerror or e}: pass "
                                "--cache DIR on a writable disk, or --no-cache") from None
        print(f"fastbyol: warning: cannot create the feature cache folder {folder} ({e.strerror or e}): "
              "evaluating without a cache (pass --cache DIR to keep one)", file=sys.stderr, flush=True)
        return None
    return FeatureCache(folder)


PROGRESS_MIN_IMAGES = 5000
"""Extractions of fewer images show no progress bar (they take seconds)."""


def evaluate_encoder(encoder: torch.nn.Module, data_root: str, size: int, device: torch.device, *,
                     knn_k: tuple[int, ...] = (20,), linear_epochs: int | None = 80, batch_size: int = 256,
                     augment: bool = False, workers: int | None = None, cache: FeatureCache | None = None,
                     encoder_id: str | None = None, seed: int = 0,
                     splits: tuple[ImageFiles, ImageFiles] | None = None, loader: str = "auto") -> dict[str, Any]:
    """kNN (cosine, each k) and/or the linear probe: on features precomputed once from centre views, or
    (``augment``) on fresh crop + flip views every epoch (seeded by ``seed``), the spec's protocol.

    ``workers`` DataLoader processes decode the images (default ``default_workers(device)``). With a ``cache``, each
    split's features (per view) are read from it when the encoder (``encoder_id``: a checkpoint's
    ``CheckpointEncoder.identity``; default the encoder's ``state_fingerprint``), the images, ``size``, the
    view and the device's precision match, and written to it otherwise. ``splits``: the (train, val) images of
    ``data_root`` when the caller has them already (default ``split_files(data_root)``; fine-tuning's baseline
    passes its labelled subset as train). ``loader`` ('auto', 'torch',
    'dali': ``resolve_loader``) decodes the centre views; augmented views are always PIL's."""
    workers = _workers(workers, device)
    train, val = splits or split_files(data_root)
    for k in knn_k:
        if not 1 <= k <= len(train):
            raise FastByolError(f"--k {k}: kNN needs 1 <= k <= the {len(train)} training images of {data_root}: pass "
                                "a k in that range, e.g. --k 20")
    splits_by_name = {"train": train, "val": val}
    num_classes = _num_classes(train, val)
    encoder = encoder.to(device)
    fingerprints: dict[str, str] = {}
    if cache is not None and encoder_id is None:
        encoder_id = state_fingerprint(encoder)

    def features(split: str, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        files = splits_by_name[split]
        decoder = resolve_loader(loader, device, epoch)  # the cache keys DALI's pixels apart from PIL's

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            # A terminal gets a live bar for large splits; a log file a line every PLAIN_EVERY_S and one at the end.
            tty = sys.stderr.isatty()
            bar = ProgressBar(len(files), 0, enabled=not tty or len(files) >= PROGRESS_MIN_IMAGES,
                              label=f"fastbyol: {split} features ({view_name(epoch, seed, decoder)} views)")
            if bar.enabled and tty:
                how = f"DALI, {max(1, workers)} threads" if decoder == "dali" else f"{workers} workers"
                print(f"fastbyol: {split} features ({view_name(epoch, seed, decoder)} views) of {len(files)} "
                      f"images, {how}", file=sys.stderr, flush=True)
            try:
                return extract_features(encoder, files, size, device, batch_size=batch_size, workers=workers,
                                        epoch=epoch, seed=seed, loader=decoder,
                                        progress=lambda done: bar.update(done, 1, None, force=done == len(files)))
            finally:
                bar.close()

        if cache is None or encoder_id is None:
            return compute()
        if split not in fingerprints:  # one stat per image, once per split
            fingerprints[split] = data_fingerprint(files, str(Path(data_root) / split))
        key = FeatureKey(encoder=encoder_id, data=fingerprints[split], split=split, size=size,
                         view=view_name(epoch, seed, decoder), precision=precision_name(device))
        return cache.features(key, compute)

    train_f, train_y = features("train")
    val_f, val_y = features("val")
    out: dict[str, Any] = {"train_images": len(train), "val_images": len(val), "feature_dim": train_f.shape[1],
                           "loader": resolve_loader(loader, device)}
    for k in knn_k:
        out[f"knn{k}"] = knn_accuracy(train_f, train_y, val_f, val_y, k, num_classes)
    if linear_epochs:
        def epoch_features(epoch: int) -> torch.Tensor:
            return features("train", epoch)[0]

        out["linear"] = linear_probe(train_f, train_y, val_f, val_y, num_classes, epochs=linear_epochs,
                                     batch_size=batch_size, seed=seed,
                                     epoch_features=epoch_features if augment else None)
        out["linear"]["augmented"] = float(augment)
    if cache is not None:
        out["feature_cache"] = cache.summary()
    return out


def finetune_encoder(encoder: torch.nn.Module, data_root: str, size: int, device: torch.device, out_dir: Path, *,
                     fraction: float, seed: int = 0, subset_list: str | None = None,
                     epochs: int = finetuning.DEFAULT_EPOCHS, batch_size: int = finetuning.DEFAULT_BATCH,
                     lrs: Sequence[float] = finetuning.LR_GRID, linear_epochs: int | None = 80,
                     workers: int | None = None,
                     cache: FeatureCache | None = None, encoder_id: str | None = None, loader: str = "auto"
                     ) -> dict[str, Any]:
    """The semi-supervised protocol (``fastbyol.eval.finetune``) on ``data_root``'s train/ and val/: the
    labelled subset (``fraction`` of every class drawn with ``seed``, or the images ``subset_list`` names),
    written first to ``out_dir/subset.txt``; a linear probe of the unchanged encoder on the same labels (the
    baseline fine-tuning has to beat; ``linear_epochs`` None skips it); then fine-tuning at each of ``lrs`` (at
    batch 1024), keeping the one with the best top-1 on a class-balanced held-out part of the other training
    images (``holdout_subset``), as the paper chose its hyperparameters. ``out_dir`` receives ``result.json``
    (the chosen rate's validation top-1/top-5 and the sweep) and ``classifier.pt`` (the chosen fine-tuned encoder
    and head: a ``Classifier`` state_dict).
    ``loader`` decodes the centre views (the probe's features, the validation logits): ``resolve_loader``."""
    workers = _workers(workers, device)
    train, val = split_files(data_root)
    root = str(Path(data_root) / "train")
    indices = (finetuning.read_subset(subset_list, train, root) if subset_list
               else finetuning.class_balanced_subset(train.labels, fraction, seed))
    labelled = finetuning.subset_files(train, indices)
    per_class = Counter(labelled.labels)
    if not lrs or any(not lr > 0 for lr in lrs):
        raise FastByolError(f"learning rates {list(lrs)}: give one or more, each > 0 (the paper's: 0.005 0.01 0.02 "
                            "0.05 0.1)")
    held = finetuning.holdout_subset(train.labels, indices, seed) if len(lrs) > 1 else []
    if len(lrs) > 1 and not held:
        raise FastByolError("the labelled subset is the whole training split: no held-out images are left to choose "
                            "the learning rate by; pass a single --lr")
    holdout = finetuning.subset_files(train, held) if held else None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"cannot create {out_dir}: {e.strerror or e}: pass --out DIR on a writable disk") from None
    how = f"from {subset_list}" if subset_list else f"labels fraction {fraction}, seed {seed}, class-balanced"
    finetuning.write_subset(out_dir / "subset.txt", train, indices, root,
                            f"fastbyol eval finetune subset of {root}: {len(indices)} of {len(train)} images, "
                            f"{how}\n<path under {root}>\t<label>")
    result: dict[str, Any] = {
        "fraction": None if subset_list else fraction, "seed": seed, "subset_list": subset_list,
        "subset": str(out_dir / "subset.txt"), "subset_images": len(indices), "train_images": len(train),
        "val_images": len(val), "classes": len(per_class),
        "images_per_class": {"min": min(per_class.values()), "max": max(per_class.values())},
        "holdout_images": len(held),
        "loader": resolve_loader(loader, device)}  # resolved before the fine-tuning: a missing DALI stops it now
    loader = result["loader"]
    if linear_epochs:
        result["linear"] = evaluate_encoder(encoder, data_root, size, device, knn_k=(), linear_epochs=linear_epochs,
                                            workers=workers, cache=cache, encoder_id=encoder_id, seed=seed,
                                            splits=(labelled, val), loader=loader)["linear"]
    num_classes = _num_classes(train, val)

    def run(lr: float) -> tuple[finetuning.Classifier, dict[str, Any]]:
        bar = ProgressBar(0, 0, enabled=True, label=f"fastbyol: fine-tune at lr {lr:g}")  # a line per 30 s off a tty
        try:
            return finetuning.finetune(encoder, labelled, val, num_classes, size, device, epochs=epochs,
                                       batch_size=batch_size, lr=lr, seed=seed, workers=workers,
                                       progress=_bar_progress(bar, batch_size), loader=loader, holdout=holdout)
        finally:
            bar.close()

    model, result["finetune"], result["sweep"] = finetuning.sweep(lrs, run)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(out_dir / "classifier.pt", buf.getvalue())
    atomic_write_bytes(out_dir / "result.json", json.dumps(result, indent=2).encode())
    return result


def _bar_progress(bar: ProgressBar, batch_size: int) -> Callable[[int, int, float], None]:
    def update(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(step, batch_size, loss, force=step == total)
    return update


def record_eval(run_dir: Path, result: dict[str, Any]) -> Path | None:
    """Keep an eval command's result in RUN/eval/<protocol>-step<step>[-<n>].json, where ``fastbyol report RUN``
    lists it; a run directory that cannot be written gets one warning line (the result was printed anyway)."""
    folder = Path(run_dir) / "eval"
    stem = f"{result.get('protocol', 'eval')}-step{result.get('step', -1)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        n, path = 1, folder / f"{stem}.json"
        while path.exists():  # another data set or setting at the same step: kept beside it
            n += 1
            path = folder / f"{stem}-{n}.json"
        result = {**result, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_bytes(path, json.dumps(result, indent=2, default=str).encode())
    except OSError as e:
        print(f"fastbyol: warning: cannot keep the result in {folder} ({e.strerror or e}): the run's report will not "
              "list it (--json FILE writes it elsewhere)", file=sys.stderr)
        return None
    return path


def export_checkpoint(target: str, out: str) -> list[Path]:
    """OUT.pth and OUT.safetensors of the checkpoint's online encoder; where it is not torchvision's network as it
    is (``torchvision_notes``), a ``fastbyol: note:`` line each on stderr and the notes in the metadata."""
    encoder, cfg = encoder_from_checkpoint(target)
    base = Path(out)
    if base.suffix in (".pth", ".safetensors"):
        base = base.with_suffix("")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"cannot create {base.parent}: {e.strerror or e}") from None
    written = []
    notes = torchvision_notes(cfg.model)
    meta = {"arch": cfg.model.arch, "small_stem": str(cfg.model.small_stem), "image_size": str(cfg.model.image_size),
            "timm_kwargs": repr(cfg.model.timm_kwargs), "init": cfg.model.init, "padding": cfg.model.padding,
            "torchvision_notes": " | ".join(notes), "source": "fastbyol online encoder"}
    for suffix, blob in export_bytes(encoder, meta).items():
        path = base.with_suffix(suffix)
        atomic_write_bytes(path, blob)
        written.append(path)
    for note in notes:
        print(f"fastbyol: note: {note}", file=sys.stderr, flush=True)
    return written
