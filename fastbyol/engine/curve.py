"""``fastbyol eval curve RUN [RUN ...] --data DIR``: learning curves from the checkpoints a run kept.

Every checkpoint ``run.keep_epochs`` kept (``RUN/checkpoints/epoch-<e>.pt``) is evaluated the way ``eval knn`` and
``eval linear`` evaluate one: the ONLINE encoder, frozen, on centre views of ``DIR/train`` and ``DIR/val``, kNN (cosine,
exp(sim / 0.07) votes) and the linear probe, features cached. Beside the runs, the baselines with nothing learned,
evaluated the same way: the raw pixels, and the standard random network (torchvision's init, BatchNorm calibrated
on the training images) of each architecture, over ``baseline_seeds`` draws. A RUN may also be a folder of encoders
trained elsewhere (a public BYOL, ``benchmarks/public_byol.py``): ``curve.json`` ({"label", "arch", "small_stem",
"image_size", and "padding": "same" for TF-padded weights}) beside ``epoch-<e>.pth`` files holding torchvision
state_dicts (what ``fastbyol export`` writes; an official ResNet-18/34's, with layer1[0]'s projection shortcut, is
built as that network).

Written to ``out_dir``: ``results.json`` (every point, rewritten atomically after each, so a killed evaluation
resumes where it stopped: a point whose checkpoint is unchanged is not evaluated again), ``curve.csv``, ``curve.md``
(a table, with the first epoch at which each run passes the better baseline) and ``curve.png`` (accuracy against
epoch, one line per run, the baselines as horizontal lines). A fastbyol run's own points also go to
``RUN/curve/``, where ``fastbyol report RUN`` finds them.

``with_results``: the ``results.json`` of earlier evaluations (another session, machine or cluster, whose
checkpoints may be gone) join the curve as they were measured, one run label at a time, when they were made with
the same k, linear-probe epochs and dataset (the same file contents, wherever the folder lies): a curve whose runs
could not all be trained in one place is still one curve.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fastbyol.config import OFFICIAL_SHORTCUT_ARCHS, PADDINGS, ModelConfig, check_arch
from fastbyol.data.folder import ImageFiles
from fastbyol.engine import checkpoint
from fastbyol.engine.evaluate import (
    calibrated_random_encoder,
    checkpoint_digest,
    evaluate_encoder,
    load_checkpoint_encoder,
    open_feature_cache,
    split_files,
)
from fastbyol.errors import FastByolError
from fastbyol.eval.baselines import RawPixels
from fastbyol.files import atomic_write_bytes, atomic_write_text
from fastbyol.model.backbone import Encoder
from fastbyol.telemetry.report import curve_plot

RESULTS = "results.json"
ENCODERS_META = "curve.json"
"""The metadata file of a folder of encoders trained elsewhere."""
_EXPORTED = re.compile(r"^epoch-(\d+(?:\.\d+)?)\.pth$")
RAW_PIXELS = "raw pixels"


@dataclass
class CurvePoint:
    """One checkpoint of one run, to evaluate."""

    run: str
    """The run's folder as given."""
    label: str
    epoch: float
    path: Path
    exported: bool
    """A torchvision state_dict (a folder of encoders), not a fastbyol checkpoint."""


@dataclass
class CurveRun:
    path: Path
    label: str
    points: list[CurvePoint]
    fastbyol: bool
    """A fastbyol run directory (its points also go to RUN/curve/)."""
    model: ModelConfig | None = None
    """Exported folders: the encoder to build (fastbyol runs carry theirs in each checkpoint's config)."""
    size: int = 0


def find_runs(targets: list[str]) -> list[CurveRun]:
    """The runs and their kept checkpoints, oldest epoch first; one line naming the fix for a folder that is
    neither kind, or holds no kept checkpoint."""
    runs = []
    for target in targets:
        p = Path(target)
        if (p / "checkpoints").is_dir():
            kept = checkpoint.list_epoch_checkpoints(p / "checkpoints")
            if not kept:
                raise FastByolError(f"{target} kept no epoch checkpoints (checkpoints/epoch-<e>.pt): train with "
                                    "run.keep_epochs=1,3,10,30,100 to keep them for a curve")
            label = p.resolve().name
            runs.append(CurveRun(p, label, [CurvePoint(target, label, e, path, False) for e, path in kept], True))
        elif (p / ENCODERS_META).is_file():
            runs.append(_exported_run(target))
        elif p.is_dir():
            raise FastByolError(f"{target} is neither a fastbyol run directory (no checkpoints/) nor a folder of "
                                f"encoders ({ENCODERS_META} beside epoch-<e>.pth): pass a run directory")
        else:
            raise FastByolError(f"{target}: no such run directory")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise FastByolError(f"two runs share the name {next(x for x in labels if labels.count(x) > 1)!r}: give each "
                            "run its own folder name")
    return runs


def _exported_run(target: str) -> CurveRun:
    p = Path(target)
    try:
        meta = json.loads((p / ENCODERS_META).read_text())
        model = ModelConfig(arch=str(meta["arch"]), small_stem=bool(meta.get("small_stem", False)),
                            init="torchvision", padding=str(meta.get("padding", "torch")))  # type: ignore[arg-type]
        size, label = int(meta["image_size"]), str(meta.get("label") or p.resolve().name)
        if model.padding not in PADDINGS:
            raise ValueError(f"padding {model.padding!r} is none of {', '.join(PADDINGS)}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FastByolError(f"{p / ENCODERS_META} is not a folder's encoder description ({e}): it needs "
                            '{"arch": "resnet18", "image_size": 32} (and "label", "small_stem", "padding")') from None
    check_arch("arch", model.arch)
    kept = sorted((float(m.group(1)), f) for f in p.iterdir() if (m := _EXPORTED.match(f.name)))
    if not kept:
        raise FastByolError(f"{target} holds no epoch-<e>.pth encoders: nothing to evaluate")
    return CurveRun(p, label, [CurvePoint(target, label, e, f, True) for e, f in kept], False, model, size)


def _file_identity(point: CurvePoint) -> str:
    """What the point's result depends on: a fastbyol checkpoint's verified payload digest (its header), or an
    exported file's SHA-256."""
    if not point.exported and (digest := checkpoint_digest(point.path)) is not None:
        return digest
    sha = hashlib.sha256()
    with point.path.open("rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return f"file sha256:{sha.hexdigest()}"


def _load_point(point: CurvePoint, run: CurveRun) -> tuple[torch.nn.Module, ModelConfig, int, dict[str, Any]]:
    """(encoder, its model config, image size, extra fields for the row)."""
    if not point.exported:
        loaded = load_checkpoint_encoder(str(point.path))
        cfg = loaded.cfg
        return loaded.encoder, cfg.model, cfg.data.image_size, {"method": cfg.method, "seed": cfg.run.seed}
    assert run.model is not None
    try:
        weights = torch.load(point.path, map_location="cpu", weights_only=True)
        model = run.model
        if model.arch in OFFICIAL_SHORTCUT_ARCHS and any(k.startswith("layer1.0.downsample.") for k in weights):
            model = replace(model, init="haiku")  # the official ResNet-18/34 (its weights replace the init)
        encoder = Encoder.from_config(model)
        missing, unexpected = encoder.net.load_state_dict(weights, strict=False)
    except Exception as e:
        raise FastByolError(f"{point.path} is not a {run.model.arch} state_dict ({str(e).splitlines()[0]}): pass "
                            "torchvision names, as `fastbyol export` writes") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise FastByolError(f"{point.path} does not fit a {run.model.arch} (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}): it was written for another architecture")
    return encoder, run.model, run.size, {"method": "byol", "seed": None}


def _model_key(model: ModelConfig, size: int) -> str:
    return f"{model.arch}{' small stem' if model.small_stem else ''} at {size} px"


def evaluate_curve(targets: list[str], data_root: str, out_dir: Path, device: torch.device, *, k: int = 20,
                   linear_epochs: int = 80, baseline_seeds: int = 2, workers: int | None = None,
                   stream: Any = None, with_results: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every kept checkpoint of ``targets`` and the baselines; write the curve to ``out_dir`` (and each
    fastbyol run's own points to RUN/curve/), with the points of ``with_results`` files added. Resumes from
    ``out_dir/results.json``."""
    stream = stream or sys.stderr
    _check_settings(k, linear_epochs, baseline_seeds, bool(targets or with_results))
    runs = find_runs(targets) if targets else []
    train, val = split_files(data_root)
    if k > len(train):
        raise FastByolError(f"--k {k} is larger than the {len(train)} training images of {data_root}: use a "
                            "smaller --k")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"cannot create {out_dir}: {e.strerror or e}: pass --out DIR on a writable disk") from None
    settings = {"data": str(Path(data_root).resolve()), "dataset": dataset_digest(data_root, train, val), "k": k,
                "linear_epochs": linear_epochs}
    results = _read_results(out_dir / RESULTS, settings, stream)
    done = {(p["checkpoint"], p["identity"]): p for p in results["points"]}
    cache = open_feature_cache(out_dir / "eval-cache", chosen=True)
    total = sum(len(r.points) for r in runs)

    def say(text: str) -> None:
        print(f"fastbyol curve: {text}", file=stream, flush=True)

    def evaluate(encoder: torch.nn.Module, size: int, encoder_id: str | None) -> dict[str, Any]:
        out = evaluate_encoder(encoder, data_root, size, device, knn_k=(k,), linear_epochs=linear_epochs,
                               workers=workers, cache=cache, encoder_id=encoder_id, splits=(train, val))
        return {"knn": out[f"knn{k}"], "linear": out["linear"]}

    def save() -> None:
        atomic_write_text(out_dir / RESULTS, json.dumps(results, indent=2))

    points: list[dict[str, Any]] = []
    models: dict[str, tuple[ModelConfig, int]] = {}
    index = 0
    for run in runs:
        for point in run.points:
            index += 1
            identity = _file_identity(point)
            key = (str(point.path), identity)
            if key in done:
                row = done[key]
                models.setdefault(row["model_key"], (ModelConfig(**row["model"]), row["size"]))
                points.append(row)
                say(f"[{index}/{total}] {run.label} epoch {checkpoint.epoch_label(point.epoch)}: "
                    f"kNN-{k} {row['knn']['top1']:.1f}%, linear {row['linear']['top1']:.1f}% (done before)")
                continue
            row, model = _evaluate_point(point, run, identity, evaluate)
            models.setdefault(row["model_key"], (model, row["size"]))
            points.append(row)
            results["points"] = [p for p in results["points"] if p["checkpoint"] != str(point.path)] + [row]
            save()
            say(f"[{index}/{total}] {run.label} epoch {checkpoint.epoch_label(point.epoch)}: kNN-{k} "
                f"{row['knn']['top1']:.1f}%, linear {row['linear']['top1']:.1f}% ({row['seconds']:.0f} s)")
    points += _earlier_points(with_results or [], settings, {p["label"] for p in points}, models, say)
    results["points"] = points  # in the order given; points of folders no longer named are dropped
    results["baselines"] = _baselines(results.get("baselines", []), models, baseline_seeds, data_root, device,
                                      evaluate, say, save, results)
    save()
    write_curve(results, out_dir)
    _write_run_curves(runs, results, out_dir, say)
    return results


def _check_settings(k: int, linear_epochs: int, baseline_seeds: int, anything: bool) -> None:
    if k < 1:
        raise FastByolError(f"--k {k}: use a neighbour count >= 1, e.g. 20")
    if linear_epochs < 1:
        raise FastByolError(f"--linear-epochs {linear_epochs}: use >= 1, e.g. 80")
    if baseline_seeds < 0:
        raise FastByolError(f"--baseline-seeds {baseline_seeds}: use 0 (no random-network line) or more")
    if not anything:
        raise FastByolError("nothing to evaluate: name at least one RUN, or an earlier results.json with --with")


def _evaluate_point(point: Any, run: Any, identity: str, evaluate: Callable[..., dict[str, Any]]
                    ) -> tuple[dict[str, Any], ModelConfig]:
    """One kept checkpoint's row (where it came from, its encoder's model settings, and its kNN and linear
    results from ``evaluate``), and its model config."""
    t0 = time.perf_counter()
    encoder, model, size, extra = _load_point(point, run)
    row = {"run": point.run, "label": run.label, "epoch": point.epoch, "checkpoint": str(point.path),
           "identity": identity, "model_key": _model_key(model, size), "size": size,
           "model": {"arch": model.arch, "small_stem": model.small_stem, "bn_momentum": model.bn_momentum,
                     "bn_eps": model.bn_eps, "image_size": model.image_size, "timm_kwargs": model.timm_kwargs},
           **extra, **evaluate(encoder, size, identity)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row, model


def _write_run_curves(runs: list[Any], results: dict[str, Any], out_dir: Path, say: Callable[[str], None]) -> None:
    """Each fastbyol run's own points to RUN/curve/ (its report shows them); a run folder that cannot be written
    to gets a warning, not an error."""
    points = results["points"]
    for run in runs:
        if run.fastbyol and (run.path / "curve").resolve() != out_dir.resolve():
            own = {**results, "points": [p for p in points if p["run"] == str(run.path) or p["label"] == run.label]}
            try:
                (run.path / "curve").mkdir(exist_ok=True)
                atomic_write_text(run.path / "curve" / RESULTS, json.dumps(own, indent=2))
                write_curve(own, run.path / "curve")
            except OSError as e:
                say(f"warning: cannot write {run.path / 'curve'} ({e.strerror or e}): its report will not show the "
                    "curve")


def dataset_digest(data_root: str, train: ImageFiles, val: ImageFiles) -> str:
    """What the images are, wherever they lie: a digest of each split's relative paths, labels and file bytes."""
    h = hashlib.sha256()
    for name, split in (("train", train), ("val", val)):
        root = Path(data_root) / name
        for index, label in enumerate(split.labels):
            path = Path(split.paths[index])
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
            h.update(f"{name}/{rel}\0{label}\0".encode())
            h.update(hashlib.sha256(split.read(index)).digest())
    return h.hexdigest()[:16]


def _earlier_points(paths: list[str], settings: dict[str, Any], have: set[str],
                    models: dict[str, tuple[ModelConfig, int]], say: Any) -> list[dict[str, Any]]:
    """The points of earlier evaluations' results.json files whose run labels this call did not evaluate; each file
    must have been made with this call's k, linear-probe epochs and dataset."""
    out: list[dict[str, Any]] = []
    origin: dict[str, str] = {}
    for path in paths:
        try:
            earlier = json.loads(Path(path).read_text())
            points = earlier["points"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FastByolError(f"--with {path} does not read as a curve's results.json ({e}): pass the "
                                "results.json that `fastbyol eval curve` wrote") from None
        for key in ("dataset", "k", "linear_epochs"):
            if earlier.get(key) != settings[key]:
                raise FastByolError(f"--with {path} was made with {key}={earlier.get(key)}, this curve with "
                                    f"{key}={settings[key]}: evaluate both with the same --data, --k and "
                                    "--linear-epochs")
        for p in points:
            label = p["label"]
            if label in have:
                continue  # evaluated by this call: its own points win
            if origin.setdefault(label, path) != path:
                raise FastByolError(f"run {label!r} is in both --with {origin[label]} and --with {path}: pass one "
                                    "of them")
            models.setdefault(p["model_key"], (ModelConfig(**p["model"]), p["size"]))
            out.append(p)
    if out:
        say(f"{len(out)} points of {len({p['label'] for p in out})} runs from earlier evaluations (--with)")
    return out


def _read_results(path: Path, settings: dict[str, Any], stream: Any) -> dict[str, Any]:
    fresh: dict[str, Any] = {**settings, "points": [], "baselines": []}
    if not path.is_file():
        return fresh
    try:
        old = json.loads(path.read_text())
        if not isinstance(old.get("points"), list) or not isinstance(old.get("baselines"), list):
            raise ValueError("no points or baselines")
    except (OSError, ValueError) as e:
        print(f"fastbyol curve: warning: {path} does not read ({e}): evaluating every point again", file=stream)
        return fresh
    if any(old.get(key) != value for key, value in settings.items()):
        before = ", ".join(f"{key}={old.get(key)}" for key in settings)
        print(f"fastbyol curve: {path} was made with other settings ({before}): evaluating every point again",
              file=stream)
        return fresh
    return old


def _baselines(previous: list[dict[str, Any]], models: dict[str, tuple[ModelConfig, int]], seeds: int,
               data_root: str, device: torch.device, evaluate: Any, say: Any, save: Any,
               results: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw pixels at each image size, and the torchvision random network of each architecture (one row per seed),
    evaluated like the runs; rows evaluated before are kept."""
    def key(b: dict[str, Any]) -> tuple[str, str, int | None]:
        return b["label"], b["model_key"], b.get("seed")

    have = {key(b): b for b in previous}
    rows: list[dict[str, Any]] = []
    wanted: list[tuple[str, str, int | None, ModelConfig | None, int]] = []
    for size in sorted({size for _, size in models.values()}):
        wanted.append((RAW_PIXELS, f"{size} px", None, None, size))
    for mkey, (arch_model, size) in models.items():
        wanted += [(f"random init, torchvision {arch_model.arch} (BN cal.)", mkey, seed, arch_model, size)
                   for seed in range(seeds)]
    for label, mkey, seed, model, size in wanted:
        if (label, mkey, seed) in have:
            rows.append(have[(label, mkey, seed)])
            continue
        t0 = time.perf_counter()
        if model is None:
            encoder: torch.nn.Module = RawPixels()
            encoder_id: str | None = f"raw pixels {size}"
        else:
            encoder = calibrated_random_encoder(model, seed or 0, data_root, size, device, init="torchvision")
            encoder_id = None  # the calibrated weights' fingerprint
        row = {"label": label, "model_key": mkey, "seed": seed, "size": size, **evaluate(encoder, size, encoder_id),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        done = {key(r) for r in rows}  # saved with the earlier rows not reached yet: a kill loses neither
        results["baselines"] = rows + [b for b in previous if key(b) not in done]
        save()
        which = f" seed {seed}" if seed is not None else ""
        say(f"baseline {label}{which} ({mkey}): kNN {row['knn']['top1']:.1f}%, linear {row['linear']['top1']:.1f}%")
    return rows


def best_baselines(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """label -> {"knn": best top-1 over seeds, "linear": ...}: the lines a run has to pass (the strongest draw)."""
    best: dict[str, dict[str, float]] = {}
    for b in results["baselines"]:
        entry = best.setdefault(b["label"], {"knn": 0.0, "linear": 0.0, "seeds": 0})
        entry["knn"] = max(entry["knn"], b["knn"]["top1"])
        entry["linear"] = max(entry["linear"], b["linear"]["top1"])
        entry["seeds"] += 1
    return best


def first_passing(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """run label -> {"knn": first evaluated epoch above every baseline's best kNN (None: never), "linear": ...}."""
    best = best_baselines(results)
    bar = {m: max((b[m] for b in best.values()), default=0.0) for m in ("knn", "linear")}
    out: dict[str, dict[str, float | None]] = {}
    for p in sorted(results["points"], key=lambda p: p["epoch"]):
        entry = out.setdefault(p["label"], {"knn": None, "linear": None})
        for m in ("knn", "linear"):
            if entry[m] is None and p[m]["top1"] > bar[m]:
                entry[m] = p["epoch"]
    return out


def write_curve(results: dict[str, Any], out_dir: Path) -> None:
    """curve.csv, curve.md and curve.png from ``results``."""
    k = results["k"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", "label", "method", "seed", "epoch", "model", f"knn{k}_top1", f"knn{k}_top5",
                     "linear_top1", "linear_top5", "checkpoint"])
    for p in results["points"]:
        writer.writerow([p["run"], p["label"], p.get("method") or "", "" if p.get("seed") is None else p["seed"],
                         checkpoint.epoch_label(p["epoch"]), p["model_key"], f"{p['knn']['top1']:.2f}",
                         f"{p['knn']['top5']:.2f}", f"{p['linear']['top1']:.2f}", f"{p['linear']['top5']:.2f}",
                         p["checkpoint"]])
    for b in results["baselines"]:
        writer.writerow(["baseline", b["label"], "", "" if b.get("seed") is None else b["seed"], "", b["model_key"],
                         f"{b['knn']['top1']:.2f}", f"{b['knn']['top5']:.2f}", f"{b['linear']['top1']:.2f}",
                         f"{b['linear']['top5']:.2f}", ""])
    atomic_write_text(out_dir / "curve.csv", buf.getvalue())
    atomic_write_text(out_dir / "curve.md", curve_table(results))
    labels = list(dict.fromkeys(p["label"] for p in results["points"]))
    series = {label: sorted((p["epoch"], p["knn"]["top1"], p["linear"]["top1"])
                            for p in results["points"] if p["label"] == label) for label in labels}
    best = best_baselines(results)
    lines = {f"{label} (best of {b['seeds']} seeds)" if b["seeds"] > 1 else label: (b["knn"], b["linear"])
             for label, b in best.items()}
    plot = curve_plot(series, lines, k, f"{Path(results['data']).name}: frozen online encoder, centre views")
    atomic_write_bytes(out_dir / "curve.png", plot.png)


def curve_table(results: dict[str, Any]) -> str:
    """Markdown: kNN / linear per run (rows) and epoch (columns), the baselines, and the first passing epochs."""
    k = results["k"]
    epochs = sorted({p["epoch"] for p in results["points"]})
    labels = list(dict.fromkeys(p["label"] for p in results["points"]))
    cell = {(p["label"], p["epoch"]): f"{p['knn']['top1']:.1f} / {p['linear']['top1']:.1f}" for p in results["points"]}
    head = "| run | " + " | ".join(f"epoch {checkpoint.epoch_label(e)}" for e in epochs) + " |"
    lines = [f"kNN-{k} top-1 / linear top-1 (%), frozen online encoder, centre views of {results['data']}", "",
             head, "|---|" + "---|" * len(epochs)]
    lines += ["| " + label + " | " + " | ".join(cell.get((label, e), "") for e in epochs) + " |" for label in labels]
    lines += ["", "| baseline | seeds | kNN top-1 (best) | linear top-1 (best) |", "|---|---|---|---|"]
    for label, b in best_baselines(results).items():
        lines.append(f"| {label} | {b['seeds']} | {b['knn']:.1f} | {b['linear']:.1f} |")
    lines += ["", "| run | first epoch above every baseline: kNN | linear |", "|---|---|---|"]
    for label, first in first_passing(results).items():
        lines.append(f"| {label} | {_epoch_or_never(first['knn'])} | {_epoch_or_never(first['linear'])} |")
    return "\n".join(lines) + "\n"


def _epoch_or_never(epoch: float | None) -> str:
    return "not yet" if epoch is None else checkpoint.epoch_label(epoch)
