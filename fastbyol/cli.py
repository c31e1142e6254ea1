"""Command line: ``fastbyol train | bench | report | doctor | presets | data make | data check | data pack | eval |
export | import official | demo``.

Every error a user can cause surfaces as one line, ``fastbyol: error: ...``, with exit code 2; a
traceback means a bug in fastbyol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastbyol.errors import FastByolError, RunStopped

TRAIN_EPILOG = """\
overrides are key=value pairs applied after the preset and --config, e.g.
  fastbyol train --preset byol-r50-300ep data.path=/data/imagenet/train run.name=r50-300

config keys (default of the base config; presets change some):
{keys}
"""

EXIT_USER_ERROR = 2
EXIT_FOUND_BAD = 1
"""`data check` found unreadable files (and left them out of the clean list it wrote)."""


if TYPE_CHECKING:
    from fastbyol.engine.trainer import Trainer

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _parser() -> argparse.ArgumentParser:
    from fastbyol import __version__
    from fastbyol.config_parse import describe_keys
    from fastbyol.presets import preset_names

    parser = argparse.ArgumentParser(prog="fastbyol", description="Fast, exact BYOL pretraining.")
    parser.add_argument("--version", action="version", version=f"fastbyol {__version__}")
    # The deepspeed launcher inserts --local_rank=N before the command (LOCAL_RANK is in the environment).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub, describe_keys(), preset_names())
    for add in (_add_bench, _add_report_doctor_presets, _add_data, _add_eval, _add_export_import, _add_demo):
        add(sub)
    return parser


def commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()
             ) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command's parser keyed by its words (``()`` for ``fastbyol`` itself, ``("eval", "knn")``), in the
    parser's own order, depth first."""
    parser = parser or _parser()
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, (*path, name)))
    return found


def command_helps(width: int = 100) -> dict[tuple[str, ...], str]:
    """Each command's ``--help`` text at ``width`` columns (``commands``' keys): the documentation site's CLI
    reference (``docs/hooks.py``) reads them."""
    import os

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to $COLUMNS
    try:
        return {path: parser.format_help() for path, parser in commands().items()}
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _add_train(sub: Subparsers, keys: str, presets: list[str]) -> None:
    """`train`: the preset, the config file, resume, and key=value overrides."""
    train = sub.add_parser(
        "train", help="pretrain with BYOL", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a ResNet with BYOL. The run directory gets config.yaml, metrics.jsonl and "
                    "checkpoints/.",
        epilog=TRAIN_EPILOG.format(keys=keys))
    train.add_argument("--preset", help=f"named preset: {', '.join(presets)} "
                                        "(default byol-r50-1000ep)")
    train.add_argument("--config", help="YAML file with sections model/data/optim/byol/run (and preset:)")
    train.add_argument("--resume", metavar="PATH",
                       help="continue a run: a checkpoint file, or a run directory (its newest valid checkpoint); "
                            "'auto': run.out_dir/run.name is resumed if it has a checkpoint, else started "
                            "(the same command for every try of a requeued job)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--profile", nargs="?", const="10:15", metavar="A:B",
                       help="torch.profiler trace of optimizer steps A..B-1 into RUN_DIR/profile (default 10:15); "
                            "the same as run.profile=A:B")
    train.add_argument("overrides", nargs="*", metavar="key=value")


def _add_bench(sub: Subparsers) -> None:
    """`bench`: a sweep of training-step settings."""
    bench = sub.add_parser(
        "bench", help="time the real training step over a sweep of settings; CSV + table",
        description="Time the training step (the same Trainer.train_step as train) for every combination of "
                    "the comma-separated values below, after warm-up; telemetry on/off alternate inside one "
                    "trainer so its overhead is measured. Writes <date>-<device>-bench.csv/.md under --out.")
    bench.add_argument("--preset", default="synthetic-r50", help="base preset (default synthetic-r50)")
    bench.add_argument("--method", default="byol", help="byol, simclr, or byol,simclr (side by side)")
    bench.add_argument("--batch", default="", help="global batch sizes, e.g. 128,256 (default: the preset's)")
    bench.add_argument("--compile", default="auto", help="run.compile values, e.g. off,default,max-autotune")
    bench.add_argument("--kernels", default="auto", help="run.kernels values, e.g. off,on")
    bench.add_argument("--channels-last", default="auto", help="model.channels_last values, e.g. on,off")
    bench.add_argument("--data", default="synthetic",
                       help="data sources: synthetic (one batch on the device), torch, dali (image folder)")
    bench.add_argument("--data-path", default="", help="image folder for --data torch/dali (default: a "
                                                       "procedurally drawn JPEG folder made for the bench)")
    bench.add_argument("--telemetry", default="on,off", help="on, off, or on,off (default: both, interleaved)")
    bench.add_argument("--steps", type=int, default=30, help="timed steps per case and telemetry mode (30)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps first (5; compile needs them)")
    bench.add_argument("--rounds", type=int, default=3, help="alternating telemetry blocks per case (3)")
    bench.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    bench.add_argument("--quick", action="store_true",
                       help="ResNet-18 on 32 px images with narrow heads: a smoke sweep for a CPU")
    bench.add_argument("--out", default="runs/bench", help="folder for the CSV and markdown (runs/bench)")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every case")


def _add_report_doctor_presets(sub: Subparsers) -> None:
    """`report`, `doctor` and `presets`."""
    report = sub.add_parser("report", help="HTML page with plots of a run (loss, lr, tau, img/s, GPU timelines)")
    report.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    report.add_argument("--bench", nargs="*", default=[], metavar="CSV",
                        help="fastbyol bench CSVs to include (RUN_DIR/bench/*.csv are included anyway)")
    report.add_argument("--out", help="output folder (default RUN_DIR/report)")
    sub.add_parser("doctor", help="what this machine has (torch/CUDA/GPU, DALI, Triton, DeepSpeed, NVML) "
                                  "and which paths fastbyol will take").add_argument(
        "--json", action="store_true", help="machine-readable output")
    presets = sub.add_parser("presets", help="list the named presets, one line each (--json: every key they set)")
    presets.add_argument("--json", action="store_true", help="print each preset's settings as JSON")


def _add_data(sub: Subparsers) -> None:
    """`data make digits|synthetic|shapes`, then `data check` and `data pack` (``_add_data_check_pack``)."""
    data = sub.add_parser("data", help="build datasets").add_subparsers(dest="data_command", metavar="ACTION")
    make = data.add_parser("make", help="build an image folder with train/ and val/ splits").add_subparsers(
        dest="dataset", metavar="DATASET")
    digits = make.add_parser("digits", help="scikit-learn's 1,797 handwritten digits as JPEGs (no download)")
    digits.add_argument("out", help="folder to create (must be new or empty)")
    digits.add_argument("--size", type=int, default=32, help="side in pixels (default 32)")
    digits.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val/ (0.2)")
    synth = make.add_parser("synthetic", help="procedurally drawn classes of any size and count")
    synth.add_argument("out", help="folder to create (must be new or empty)")
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--train-per-class", type=int, default=100)
    synth.add_argument("--val-per-class", type=int, default=20)
    synth.add_argument("--size", type=int, default=64)
    shapes = make.add_parser("shapes", help="the demo's ten silhouettes in random colours, sizes and places")
    shapes.add_argument("out", help="folder to create (must be new or empty)")
    shapes.add_argument("--train-per-class", type=int, default=150)
    shapes.add_argument("--val-per-class", type=int, default=50)
    shapes.add_argument("--size", type=int, default=32, help="side in pixels (default 32)")
    _add_data_check_pack(data)


def _add_data_check_pack(data: Subparsers) -> None:
    """`data check` and `data pack`."""
    check = data.add_parser("check", help="check every image of a folder; write the good ones as a file list "
                                           "(a folder of shards: check their sizes and sha256 against the index); "
                                           "exit 0 if all are good, 1 if some were left out of the list")
    check.add_argument("dir", help="image folder (one sub-folder per class), or the OUT_DIR of `data pack`")
    check.add_argument("--out", metavar="FILE",
                       help="clean list, lines '<relative path> <label>' (default DIR/fastbyol-filelist.txt)")
    check.add_argument("--workers", type=int, metavar="N", help="threads (default: the number of CPUs)")
    check.add_argument("--full", action="store_true",
                       help="decode every image fully (catches truncated JPEGs; slower than the header check)")
    pack = data.add_parser(
        "pack", help="write an image folder as tar shards (WebDataset layout) for data.source=shards",
        description="Pack the images of SRC (the folder source's sorted scan: same order, labels and classes) "
                    "into OUT_DIR/shard-NNNNNN.tar, each file's bytes unchanged as member <key>.<ext> with its "
                    "label in <key>.cls, then the index OUT_DIR/fastbyol-shards.json (+ .npz). Train with "
                    "data.source=shards data.path=OUT_DIR: the same batches as from SRC.")
    pack.add_argument("src", metavar="SRC", help="image folder (one sub-folder per class)")
    pack.add_argument("out", metavar="OUT_DIR", help="folder for the shards (new, or holding no shards)")
    pack.add_argument("--shard-size", default="1GB", metavar="SIZE",
                      help="largest shard: bytes, or with KB/MB/GB (powers of 1000) or KiB/MiB/GiB, e.g. 64MB "
                           "(default 1GB; a shard holds at least one image)")
    pack.add_argument("--file-list", metavar="LIST", default="",
                      help="pack only the images of this list (`fastbyol data check SRC` writes "
                           "SRC/fastbyol-filelist.txt), in its order, as data.file_list would read them")


def _add_eval(sub: Subparsers) -> None:
    """`eval linear|knn`, then `eval curve` and `eval finetune`."""
    ev = sub.add_parser("eval", help="evaluate the online encoder of a checkpoint").add_subparsers(
        dest="protocol", metavar="PROTOCOL")
    for name, what in (("linear", "linear probe on frozen features (SGD Nesterov, cosine lr)"),
                       ("knn", "weighted kNN on cosine similarity of frozen features")):
        p = ev.add_parser(name, help=what)
        p.add_argument("checkpoint", help="checkpoint file or run directory (newest valid checkpoint)")
        p.add_argument("--data", required=True, help="image folder with train/ and val/ sub-folders")
        p.add_argument("--arch", help="expected architecture; a checkpoint of another one is rejected")
        p.add_argument("--size", type=int, help="evaluation crop size (default: the run's data.image_size)")
        p.add_argument("--json", help="also write the result to this JSON file")
        p.add_argument("--workers", type=int, metavar="N",
                       help="DataLoader processes decoding images for the encoder (default: min(8, CPUs) with a "
                            "GPU; 0 on the CPU, where the encoder, not decoding, is the bottleneck)")
        p.add_argument("--cache", metavar="DIR",
                       help="feature cache folder (default RUN_DIR/eval-cache): features of this checkpoint, data, "
                            "size and view are computed once, then read (N x D x 4 bytes per split and view)")
        p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
        p.add_argument("--loader", choices=("auto", "torch", "dali"), default="auto",
                       help="who decodes the centre views: dali (nvJPEG and GPU resize; CPU threads without a "
                            "GPU), torch (PIL in DataLoader processes), or auto (default: dali on a GPU when "
                            "nvidia-dali is installed, else torch); --augment's training views are always PIL's")
        if name == "linear":
            p.add_argument("--epochs", type=int, default=80, help="training epochs of the probe (spec: 80)")
            p.add_argument("--augment", action="store_true",
                           help="the spec's protocol: fresh crop + flip views each epoch (slow: one encoder pass "
                                "over the training set per epoch) instead of centre-view features computed once")
        else:
            p.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbour counts (20 200)")
    _add_curve(ev)
    _add_finetune(ev)


def _add_curve(ev: Subparsers) -> None:
    """`eval curve`: every kept checkpoint of one or more runs, beside the baselines."""
    cv = ev.add_parser("curve", help="learning curves: kNN and linear probe of every checkpoint run.keep_epochs kept, "
                                     "one line per run, beside the raw pixels and the random network")
    cv.add_argument("runs", nargs="*", metavar="RUN",
                    help="run directories trained with run.keep_epochs=..., or folders of encoders trained elsewhere "
                         "(curve.json beside epoch-<e>.pth, e.g. benchmarks/public_byol.py's)")
    cv.add_argument("--with", dest="with_results", action="append", default=[], metavar="RESULTS_JSON",
                    help="an earlier evaluation's results.json (another session or machine, checkpoints maybe gone): "
                         "its runs join this curve as measured; same --data contents, --k and --linear-epochs "
                         "(repeatable)")
    cv.add_argument("--data", required=True, help="image folder with train/ and val/ sub-folders")
    cv.add_argument("--out", metavar="DIR",
                    help="folder for results.json, curve.csv, curve.md, curve.png and the feature cache (default, for "
                         "one run: RUN/curve); an interrupted evaluation resumes from it")
    cv.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    cv.add_argument("--linear-epochs", type=int, default=80, help="epochs of each linear probe (default 80)")
    cv.add_argument("--baseline-seeds", type=int, default=2,
                    help="random networks drawn for the baseline (the best is the line to pass; default 2; 0: none)")
    cv.add_argument("--workers", type=int, metavar="N",
                    help="DataLoader processes decoding images (default: min(8, CPUs) with a GPU; 0 on the CPU)")


def _add_finetune(ev: Subparsers) -> None:
    """`eval finetune`: the semi-supervised protocol."""
    ft = ev.add_parser("finetune", help="the paper's semi-supervised protocol: fine-tune the encoder and a linear "
                                        "head on a class-balanced fraction of the labels")
    ft.add_argument("checkpoint", help="checkpoint file or run directory (newest valid checkpoint)")
    ft.add_argument("--data", required=True, help="image folder with train/ and val/ sub-folders")
    ft.add_argument("--labels-fraction", type=float, default=0.01, metavar="F",
                    help="fraction of each class's training labels: 0.01, 0.1 (the paper's) or 1.0; any in (0, 1]")
    ft.add_argument("--subset", metavar="LIST",
                    help="use the images this list names instead (one file name or path under DATA/train per line, "
                         "e.g. SimCLR's 1percent.txt)")
    ft.add_argument("--seed", type=int, default=0, help="draws the subset, the order and the views (default 0)")
    ft.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs over the subset (paper: 30 or 50)")
    ft.add_argument("--batch-size", type=int, default=1024, help="images per step (paper: 1024)")
    ft.add_argument("--lr", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1], metavar="LR",
                    help="learning rates at batch 1024, scaled linearly with --batch-size; each is fine-tuned and the "
                         "best top-1 on held-out training images (up to 10,000, outside the subset) is kept (default: "
                         "the paper's grid 0.005 0.01 0.02 0.05 0.1); cosine decay, Nesterov 0.9, no weight decay")
    ft.add_argument("--linear-epochs", type=int, default=80,
                    help="epochs of the baseline linear probe on the same labels (0: skip it)")
    ft.add_argument("--size", type=int, help="crop size (default: the run's data.image_size)")
    ft.add_argument("--arch", help="expected architecture; a checkpoint of another one is rejected")
    ft.add_argument("--out", metavar="DIR",
                    help="folder for subset.txt, result.json and classifier.pt (default "
                         "RUN_DIR/finetune-<fraction>-s<seed>)")
    ft.add_argument("--workers", type=int, metavar="N",
                    help="DataLoader processes decoding images (default: min(8, CPUs) with a GPU; 0 on the CPU)")
    ft.add_argument("--loader", choices=("auto", "torch", "dali"), default="auto",
                    help="who decodes the centre views (the probe's features, the validation logits): dali, torch "
                         "(PIL) or auto (default: dali on a GPU when nvidia-dali is installed); training views: PIL")
    ft.add_argument("--json", help="also write the result to this JSON file")


def _add_export_import(sub: Subparsers) -> None:
    """`export` and `import official`."""
    export = sub.add_parser("export", help="online encoder -> torchvision state_dict (.pth) and .safetensors")
    export.add_argument("checkpoint", help="checkpoint file or run directory")
    export.add_argument("out", help="output path without suffix (writes OUT.pth and OUT.safetensors)")

    imp = sub.add_parser("import", help="bring in networks trained elsewhere").add_subparsers(
        dest="source", metavar="SOURCE")
    official = imp.add_parser(
        "official", help="a checkpoint of the official BYOL code (deepmind-research/byol) as a run directory",
        description="Read a pretraining checkpoint of the official JAX/Haiku code (e.g. pretrain_res50x1.pkl: a "
                    "pickle of experiment_state, step, rng; read without JAX, Haiku or dill, building nothing but "
                    "arrays) and write RUN_DIR (config.yaml with the matching model.arch, model.init=haiku, "
                    "model.padding=same; checkpoints/ckpt-<step>.pt with the online and target networks, heads and "
                    "online classifier), which fastbyol eval and fastbyol export read. It cannot be resumed.")
    official.add_argument("checkpoint", metavar="CHECKPOINT.pkl", help="the official checkpoint file")
    official.add_argument("run_dir", metavar="RUN_DIR", help="run directory to create (new, or an empty folder)")


def _add_demo(sub: Subparsers) -> None:
    """`demo`: shapes and digits, pretrained and evaluated against the baselines."""
    demo = sub.add_parser("demo", help="shapes and digits demo: pretrain BYOL (and/or SimCLR), then kNN/linear "
                                       "against the raw pixels and random networks")
    demo.add_argument("--out", default="runs/demo", help="folder for the datasets and the runs (runs/demo)")
    demo.add_argument("--method", default="byol", help="byol, simclr, or byol,simclr (side by side)")
    demo.add_argument("--dataset", default="shapes,digits", help="shapes, digits, or shapes,digits (default)")
    demo.add_argument("--linear-epochs", type=int, default=80)
    demo.add_argument("--finetune-epochs", type=int, default=30,
                      help="epochs of the fine-tune columns (every encoder fine-tuned on 10%% of the labels); 0 skips "
                           "them")
    demo.add_argument("--arch", default=None, help="encoder instead of the presets' ResNet-18: a torchvision name or "
                                                   "timm:<name> (AdamW; a ViT with 4 px patches in 6 blocks)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo presets")


def _train(args: argparse.Namespace) -> int:
    if args.profile:
        args.overrides.append(f"run.profile={args.profile}")
    trainer = _auto_resumed(args) if args.resume == "auto" else _resumed(args) if args.resume else _started(args)
    if trainer is None:  # --print-config
        return 0
    from fastbyol.engine.distributed import shutdown

    try:
        summary = trainer.train()
    except FastByolError:
        if trainer.step == 0 and trainer.ctx.main:  # failed before its first step (the data): nothing to keep
            _remove_if_empty(trainer.run_dir)
        raise
    finally:
        shutdown(trainer.ctx)
    if trainer.ctx.main:
        _print_summary(summary, trainer.cfg.run.max_steps)
    return 0


def _auto_resumed(args: argparse.Namespace) -> Trainer:
    from fastbyol.config_parse import build_config
    from fastbyol.engine.trainer import auto_resume

    trainer, resumed = auto_resume(build_config(args.preset, args.config, args.overrides))
    if trainer.ctx.main:
        what = f"resuming at step {trainer.step}" if resumed else "no checkpoint yet: starting"
        print(f"fastbyol: --resume auto: {trainer.run_dir}: {what}/{trainer.total_steps}", file=sys.stderr)
    return trainer


def _resumed(args: argparse.Namespace) -> Trainer:
    from fastbyol.engine.trainer import resume_run

    if args.preset or args.config:
        raise FastByolError("--resume continues a run with its saved config: drop --preset/--config "
                            "(key=value overrides of run.* and data.workers/path are allowed)")
    trainer = resume_run(args.resume, args.overrides)
    if trainer.ctx.main:
        print(f"fastbyol: resuming {trainer.run_dir} at step {trainer.step}/{trainer.total_steps}", file=sys.stderr)
    return trainer


def _started(args: argparse.Namespace) -> Trainer | None:
    """A new run (None with --print-config, which prints the resolved config instead)."""
    from fastbyol.config_parse import build_config

    cfg = build_config(args.preset, args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return None
    from fastbyol.engine.preflight import preflight

    preflight(cfg)  # data, output folder, free space: one line in well under a second, before torch
    from fastbyol.engine.trainer import start_run  # torch is imported only once the config is valid

    trainer = start_run(cfg)
    ctx = trainer.ctx
    ranks = f" x {ctx.world} ranks ({ctx.engine}, {ctx.backend})" if ctx.enabled else ""
    if ctx.main and trainer.device.type == "cpu":
        _busy_cpu_hint()
    if ctx.main:
        print(f"fastbyol: run {trainer.run_dir}: {cfg.model.arch} on {trainer.device.type}{ranks}"
              f"{' bf16' if trainer.bf16 else ''}, {trainer.source.kind} data "
              f"({trainer.images_per_epoch} images/epoch), {trainer.total_steps} steps of "
              f"{cfg.optim.batch_size}", file=sys.stderr)
    return trainer


def _print_summary(summary: dict[str, Any], max_steps: int) -> None:
    last = summary["last"]
    logged = (f"loss {last['loss']:.4f}, proj_std {last['proj_std']:.4f} (uniform {last['proj_std_uniform']:.4f}), "
              if last else "")
    print(f"fastbyol: done: step {summary['step']}/{summary['total_steps']}, {logged}"
          f"{summary['img_per_s']:.1f} img/s, {summary['wall_s']:.1f} s; run directory {summary['run_dir']}",
          file=sys.stderr)
    skipped = int(last.get("skipped_images", 0)) if last else 0
    if skipped:
        print(f"fastbyol: {skipped} image(s) could not be decoded and were skipped (each replaced by the next image): "
              f"listed in {Path(summary['run_dir']) / 'skipped.txt'}; `fastbyol data check --full` writes a clean list "
              "for data.file_list", file=sys.stderr)
    if summary["step"] < summary["total_steps"]:
        print(f"fastbyol: stopped at run.max_steps={max_steps} of the run's {summary['total_steps']} "
              f"steps: continue with fastbyol train --resume {summary['run_dir']} run.max_steps=0 (or a larger "
              "run.max_steps)", file=sys.stderr)


def _csv_list(flag: str, text: str, kind: type = str) -> list:  # type: ignore[type-arg]
    values = [v.strip() for v in text.split(",") if v.strip()]
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise FastByolError(f"{flag} {text!r}: give comma-separated {kind.__name__} values, e.g. 128,256") from None


def _bench(args: argparse.Namespace) -> int:
    from fastbyol.engine.bench import QUICK_OVERRIDES, Sweep, run_sweep

    sweep = Sweep(preset=args.preset, overrides=(QUICK_OVERRIDES if args.quick else []) + args.overrides,
                  method=_csv_list("--method", args.method),
                  batch=_csv_list("--batch", args.batch, int), compile=_csv_list("--compile", args.compile),
                  kernels=_csv_list("--kernels", args.kernels),
                  channels_last=_csv_list("--channels-last", args.channels_last),
                  data=_csv_list("--data", args.data), telemetry=_csv_list("--telemetry", args.telemetry),
                  steps=args.steps, warmup=args.warmup, rounds=args.rounds, data_path=args.data_path)
    _, path = run_sweep(sweep, Path(args.out), device=args.device)
    print(f"fastbyol: wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from fastbyol.telemetry.report import build_report

    page = build_report(Path(args.run_dir), [Path(p) for p in args.bench], Path(args.out) if args.out else None)
    print(f"fastbyol: wrote {page}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from fastbyol.engine.doctor import format_report, inspect_machine

    report = inspect_machine()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def _remove_if_empty(run_dir: Path) -> None:
    """A run that failed before its first step (e.g. every image unreadable) leaves no run directory behind: it
    holds nothing to resume, only its config and an empty log."""
    import shutil

    from fastbyol.engine.checkpoint import list_checkpoints

    if not list_checkpoints(run_dir / "checkpoints"):
        shutil.rmtree(run_dir, ignore_errors=True)


def _busy_cpu_hint() -> None:
    """A CPU run on a machine already busy: torch's threads (one per core) then wait on each other and on the other
    jobs at every operator (benchmarks/NOTES.md: two 2-thread runs on 2 cores went at 5-13 img/s each, two 1-thread
    runs at 37-40). Say so once, with the fix; nothing changes by itself."""
    import os

    import torch

    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = torch.get_num_threads()
    if threads > 1 and load >= cpus:
        print(f"fastbyol: note: the load average ({load:.1f}) is at or above the {cpus} CPUs and torch uses {threads} "
              "threads: if other jobs share these cores, OMP_NUM_THREADS=1 (one per job) is likely faster",
              file=sys.stderr)


def _presets(as_json: bool) -> int:
    from fastbyol.presets import PRESET_DESCRIPTIONS, PRESETS

    if as_json:
        print(json.dumps({name: PRESETS[name] for name in sorted(PRESETS)}, indent=2))
        return 0
    width = max(len(name) for name in PRESETS)
    for name in sorted(PRESETS):
        print(f"{name:{width}s}  {PRESET_DESCRIPTIONS.get(name, '')}")
    print("fastbyol presets --json: every key each one sets; fastbyol train --preset NAME --print-config: the "
          "resolved config", file=sys.stderr)
    return 0


def _data(args: argparse.Namespace) -> int:
    from fastbyol.data.builders import make_digits, make_shapes, make_synthetic

    if args.data_command == "check":
        from fastbyol.data.shards import is_shard_folder

        return _data_check_shards(args) if is_shard_folder(args.dir) else _data_check(args)
    if args.data_command == "pack":
        return _data_pack(args)
    if args.data_command != "make" or not args.dataset:
        raise FastByolError("usage: fastbyol data make {digits,shapes,synthetic} OUT | fastbyol data check DIR | "
                            "fastbyol data pack SRC OUT_DIR")
    if args.dataset == "digits":
        if not 0 < args.val_fraction < 1:
            raise FastByolError(f"--val-fraction {args.val_fraction} is out of range: use a value in (0, 1)")
        counts = make_digits(args.out, size=args.size, val_fraction=args.val_fraction)
    elif args.dataset == "shapes":
        counts = make_shapes(args.out, args.train_per_class, args.val_per_class, args.size)
    else:
        counts = make_synthetic(args.out, args.classes, args.train_per_class, args.val_per_class, args.size)
    print(f"fastbyol: wrote {counts['train']} train and {counts['val']} val images to {args.out}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from fastbyol.data.check import DEFAULT_LIST_NAME, check_folder, format_report, write_file_list
    from fastbyol.telemetry.sinks import ProgressBar

    bar = ProgressBar(0, 0, enabled=True, label="fastbyol: data check", unit="file")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done, 1, None, force=done == total)

    try:
        report = check_folder(args.dir, workers=args.workers, full=args.full, progress=progress)
    finally:
        bar.close()
    out = args.out or str(Path(args.dir) / DEFAULT_LIST_NAME)
    write_file_list(report, out)
    print(format_report(report, out))
    # Bad files were left out of the list, which is usable; exit 1 still tells a script (a job's gate) that the
    # folder is not clean, as grep and fsck do. 2 stays the usage error's.
    return EXIT_FOUND_BAD if report.bad else 0


def _data_pack(args: argparse.Namespace) -> int:
    from fastbyol.data.shards import ShardInfo, format_bytes, pack_folder, parse_size

    shard_size = parse_size(args.shard_size)

    def progress(shard: ShardInfo, done: int, total: int) -> None:
        print(f"fastbyol: {shard.name}: {shard.samples} images, {format_bytes(shard.bytes)} ({done}/{total})",
              file=sys.stderr, flush=True)

    from fastbyol.telemetry.sinks import ProgressBar

    bar = ProgressBar(0, 0, enabled=True, label="fastbyol: data pack", unit="image")

    def per_image(done: int, total: int) -> None:
        bar.total = total
        bar.update(done, 1, None)  # a line per 30 s off a terminal; the shards' own lines say the rest

    try:
        report = pack_folder(args.src, args.out, shard_size, file_list=args.file_list, progress=progress,
                             per_image=per_image)
    finally:
        bar.close()
    print(f"fastbyol: packed {report.samples} images ({len(report.classes)} classes) from {args.src} into "
          f"{len(report.shards)} shards ({format_bytes(report.bytes)}) in {args.out} in {report.seconds:.1f} s; "
          f"train with data.source=shards data.path={args.out}")
    return 0


def _data_check_shards(args: argparse.Namespace) -> int:
    from fastbyol.data.shards import format_shard_report, verify_shards

    report = verify_shards(args.dir, full=args.full)
    if report.bad_shards:
        listed = ", ".join(f"{name} ({why})" for name, why in report.bad_shards)
        raise FastByolError(f"{len(report.bad_shards)} of {report.shards} shards in {args.dir} do not match the "
                            f"index: {listed}: copy them again from where they came from, or pack again")
    print(format_shard_report(report))
    return 0


def _eval(args: argparse.Namespace) -> int:
    if not args.protocol:
        raise FastByolError("usage: fastbyol eval {linear,knn,finetune,curve} CHECKPOINT --data DIR")
    if args.workers is not None and args.workers < 0:
        raise FastByolError(f"--workers {args.workers}: use 0 (decode in the main process) or more processes")
    if args.protocol == "finetune":
        return _finetune(args)
    if args.protocol == "curve":
        return _curve(args)
    _check_probe_args(args)
    from fastbyol.engine.evaluate import evaluate_encoder, load_checkpoint_encoder, open_feature_cache
    from fastbyol.engine.trainer import resolve_device

    loaded = load_checkpoint_encoder(args.checkpoint, args.arch)
    cfg = loaded.cfg
    size = args.size or cfg.data.image_size
    device = resolve_device("auto")
    cache = None if args.no_cache else open_feature_cache(args.cache or loaded.run_dir / "eval-cache",
                                                          chosen=bool(args.cache))
    if args.protocol == "linear":
        result = evaluate_encoder(loaded.encoder, args.data, size, device, knn_k=(), linear_epochs=args.epochs,
                                  augment=args.augment, workers=args.workers, cache=cache,
                                  encoder_id=loaded.identity, loader=args.loader)
        r = result["linear"]
        how = "augmented views" if args.augment else "centre-view features"
        print(f"linear probe ({args.epochs} epochs, {how}): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
    else:
        result = evaluate_encoder(loaded.encoder, args.data, size, device, knn_k=tuple(args.k), linear_epochs=None,
                                  workers=args.workers, cache=cache, encoder_id=loaded.identity, loader=args.loader)
        for k in args.k:
            r = result[f"knn{k}"]
            print(f"kNN k={k}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
    if cache is not None:
        print(f"fastbyol: feature cache {cache.root}: {cache.read} read, {cache.computed} computed",
              file=sys.stderr)
    _save_eval(args, loaded, result, size)
    return 0


def _check_probe_args(args: argparse.Namespace) -> None:
    """`eval linear|knn`'s flags that argparse cannot check alone."""
    if args.cache and args.no_cache:
        raise FastByolError("--cache DIR and --no-cache contradict each other: pass one of them")
    if args.protocol == "knn" and any(k < 1 for k in args.k):
        raise FastByolError(f"--k {' '.join(map(str, args.k))}: each neighbour count must be >= 1, e.g. --k 20 200")
    if args.protocol == "linear" and args.epochs < 1:
        raise FastByolError(f"--epochs {args.epochs}: the probe needs >= 1 epoch, e.g. --epochs 80")


def _save_eval(args: argparse.Namespace, loaded: Any, result: dict[str, Any], size: int) -> None:
    """The result with the checkpoint it read (file, step, epoch), to --json and to RUN/eval/ for the report."""
    from fastbyol.engine.evaluate import record_eval

    result.update({"checkpoint": args.checkpoint, "checkpoint_file": str(loaded.path), "step": loaded.step,
                   "epoch": loaded.epoch, "arch": loaded.cfg.model.arch, "data": args.data, "size": size,
                   "protocol": args.protocol})
    record_eval(loaded.run_dir, result)
    if args.json:
        from fastbyol.files import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(result, indent=2).encode())


def _curve(args: argparse.Namespace) -> int:
    if (len(args.runs) > 1 or args.with_results) and not args.out:
        raise FastByolError("several runs: pass --out DIR for their common curve (each fastbyol run's own points "
                            "also go to RUN/curve)")
    from fastbyol.engine.curve import evaluate_curve
    from fastbyol.engine.trainer import resolve_device

    # No RUN and no --with: evaluate_curve says so before it touches ``out``.
    out = Path(args.out) if args.out else Path(args.runs[0] if args.runs else ".") / "curve"
    results = evaluate_curve(args.runs, args.data, out, resolve_device("auto"), k=args.k,
                             linear_epochs=args.linear_epochs, baseline_seeds=args.baseline_seeds,
                             workers=args.workers, with_results=args.with_results)
    print((out / "curve.md").read_text(), end="")
    print(f"fastbyol curve: {len(results['points'])} checkpoints, {len(results['baselines'])} baselines; "
          f"{out / 'curve.png'}, {out / 'curve.csv'}", file=sys.stderr)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    if not 0.0 < args.labels_fraction <= 1.0:
        raise FastByolError(f"--labels-fraction {args.labels_fraction}: use a fraction in (0, 1], e.g. 0.01 or 0.1")
    if args.epochs < 1 or args.batch_size < 1 or not all(lr > 0 for lr in args.lr) or args.linear_epochs < 0:
        raise FastByolError("--epochs and --batch-size must be >= 1, each --lr > 0 and --linear-epochs >= 0")
    from fastbyol.engine.evaluate import finetune_encoder, load_checkpoint_encoder, open_feature_cache
    from fastbyol.engine.trainer import resolve_device

    loaded = load_checkpoint_encoder(args.checkpoint, args.arch)
    size = args.size or loaded.cfg.data.image_size
    device = resolve_device("auto")
    name = "subset" if args.subset else f"{args.labels_fraction:g}"
    out = Path(args.out) if args.out else loaded.run_dir / f"finetune-{name}-s{args.seed}"
    cache = open_feature_cache(loaded.run_dir / "eval-cache", chosen=False) if args.linear_epochs else None
    result = finetune_encoder(loaded.encoder, args.data, size, device, out, fraction=args.labels_fraction,
                              seed=args.seed, subset_list=args.subset, epochs=args.epochs,
                              batch_size=args.batch_size, lrs=tuple(args.lr), linear_epochs=args.linear_epochs or None,
                              workers=args.workers, cache=cache, encoder_id=loaded.identity, loader=args.loader)
    r = result["finetune"]
    for line in result["sweep"] if len(result["sweep"]) > 1 else []:
        chosen = "  <- chosen" if line["lr_at_1024"] == r["lr_at_1024"] else ""
        print(f"lr {line['lr_at_1024']:g} at batch 1024: held-out top-1 {line['holdout_top1']:.2f}% "
              f"(of {result['holdout_images']}), validation top-1 {line['top1']:.2f}%{chosen}")
    print(f"fine-tune (lr {r['lr_at_1024']:g}) on {result['subset_images']} of {result['train_images']} labelled "
          f"images "
          f"({result['classes']} classes, {result['images_per_class']['min']}-{result['images_per_class']['max']} "
          f"each; {r['epochs']} epochs, {r['steps']} steps): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
    if "linear" in result:
        lin = result["linear"]
        print(f"linear probe on the same labels: top-1 {lin['top1']:.2f}%  top-5 {lin['top5']:.2f}% "
              f"(fine-tuning {r['top1'] - lin['top1']:+.2f} points)")
    print(f"fastbyol: subset, result and fine-tuned classifier in {out}", file=sys.stderr)
    _save_eval(args, loaded, result, size)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastbyol.engine.evaluate import export_checkpoint

    for path in export_checkpoint(args.checkpoint, args.out):
        print(f"fastbyol: wrote {path}")
    return 0


def _import(args: argparse.Namespace) -> int:
    if args.source != "official":
        raise FastByolError("usage: fastbyol import official CHECKPOINT.pkl RUN_DIR")
    from fastbyol.engine.official import import_official

    run = import_official(args.checkpoint, args.run_dir)
    m = run.mapping
    print(f"fastbyol: imported the official {run.cfg.model.arch} (step {run.step}) from {args.checkpoint}: "
          f"{len(m.mapped)} tensors mapped, {len(m.dropped)} left out by name (the target's predictor and "
          f"classifier, the EMAs' un-debiased accumulators); wrote {run.checkpoint}")
    print(f"fastbyol: evaluate it with fastbyol eval knn {run.run_dir} --data DIR (or linear, finetune); export with "
          f"fastbyol export {run.run_dir} OUT", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fastbyol.engine.demo import format_table, run_demo

    methods = tuple(_csv_list("--method", args.method))
    datasets = tuple(_csv_list("--dataset", args.dataset))
    if args.finetune_epochs < 0:
        raise FastByolError(f"--finetune-epochs {args.finetune_epochs}: use 0 (no fine-tune columns) or more")
    result = run_demo(args.out, args.overrides, linear_epochs=args.linear_epochs, methods=methods, datasets=datasets,
                      arch=args.arch, finetune_epochs=args.finetune_epochs)
    print(format_table(result))
    return 0


def error_line(e: FastByolError) -> str:
    """The error's own message. A DataLoader worker's error comes back to the main process as the same type whose
    message is "Caught ... in DataLoader worker process N" and the worker's whole traceback: its last line is the
    message."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(f"{type(e).__name__}: ", 1)[-1]
    return " ".join(text.split())


def _unknown_command(argv: Sequence[str]) -> str | None:
    """A one-line error for a mistyped subcommand (argparse lists the choices but suggests none), or None."""
    import difflib

    if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:  # options first (--local_rank=N): argparse's
        return None
    near = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}? " if near else ""
    return (f"unknown command {argv[0]!r}: {hint}(the commands: {', '.join(COMMANDS)}; fastbyol --help says what "
            "each does)")


COMMANDS = ("train", "bench", "report", "doctor", "presets", "data", "eval", "export", "import", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_command(argv)
    if unknown is not None:
        print(f"fastbyol: error: {unknown}", file=sys.stderr)
        return EXIT_USER_ERROR
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come on either side of options (argparse takes only the first run of them).
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-")
                                                                      for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "presets":
            return _presets(args.json)
        commands = {"data": _data, "eval": _eval, "export": _export, "import": _import, "demo": _demo,
                    "bench": _bench, "report": _report}
        if args.command in commands:
            return commands[args.command](args)
        _parser().print_help()
        return EXIT_USER_ERROR
    except FastByolError as e:
        print(f"fastbyol: error: {error_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as e:
        print(f"fastbyol: {e}", file=sys.stderr)
        return RunStopped.exit_code
    except KeyboardInterrupt:
        print("fastbyol: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fastbyol presets | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush raises no second one
        return 141
