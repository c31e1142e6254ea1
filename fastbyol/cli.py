"""Command line: ``fastbyol train``, ``fastbyol doctor``, ``fastbyol presets``.

Every error a user can cause surfaces as one line, ``fastbyol: error: ...``, with exit code 2; a
traceback means a bug in fastbyol.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fastbyol.errors import FastByolError

TRAIN_EPILOG = """\
overrides are key=value pairs applied after the preset and --config, e.g.
  fastbyol train --preset byol-r50-300ep data.path=/data/imagenet/train run.name=r50-300

config keys (default of the base config; presets change some):
{keys}
"""

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    from fastbyol.config import describe_keys, preset_names

    parser = argparse.ArgumentParser(prog="fastbyol", description="Fast, exact BYOL pretraining.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train", help="pretrain with BYOL", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain a ResNet with BYOL. The run directory gets config.yaml, metrics.jsonl and "
                    "checkpoints/.",
        epilog=TRAIN_EPILOG.format(keys=describe_keys()))
    train.add_argument("--preset", help=f"named preset: {', '.join(preset_names())} "
                                        "(default byol-r50-1000ep)")
    train.add_argument("--config", help="YAML file with sections model/data/optim/byol/run (and preset:)")
    train.add_argument("--resume", metavar="PATH",
                       help="continue a run: a checkpoint file, or a run directory (its newest valid checkpoint)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    sub.add_parser("doctor", help="what this machine has (torch/CUDA/GPU, DALI, Triton, DeepSpeed, NVML) "
                                  "and which paths fastbyol will take").add_argument(
        "--json", action="store_true", help="machine-readable output")
    sub.add_parser("presets", help="list the named presets and what they set")
    return parser


def _train(args: argparse.Namespace) -> int:
    import yaml

    from fastbyol.config import build_config

    if args.resume:
        from fastbyol.engine.trainer import resume_run

        if args.preset or args.config:
            raise FastByolError("--resume continues a run with its saved config: drop --preset/--config "
                                "(key=value overrides of run.* and data.workers/path are allowed)")
        trainer = resume_run(args.resume, args.overrides)
        print(f"fastbyol: resuming {trainer.run_dir} at step {trainer.step}/{trainer.total_steps}",
              file=sys.stderr)
    else:
        cfg = build_config(args.preset, args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        from fastbyol.engine.trainer import start_run  # torch is imported only once the config is valid

        trainer = start_run(cfg)
        print(f"fastbyol: run {trainer.run_dir}: {cfg.model.arch} on {trainer.device.type}"
              f"{' bf16' if trainer.bf16 else ''}, {trainer.source.kind} data "
              f"({trainer.images_per_epoch} images/epoch), {trainer.total_steps} steps of "
              f"{cfg.optim.batch_size}", file=sys.stderr)
    summary = trainer.train()
    last = summary["last"]
    logged = (f"loss {last['loss']:.4f}, proj_std {last['proj_std']:.4f} (uniform {last['proj_std_uniform']:.4f}), "
              if last else "")
    print(f"fastbyol: done: step {summary['step']}/{summary['total_steps']}, {logged}"
          f"{summary['img_per_s']:.1f} img/s, {summary['wall_s']:.1f} s; run directory {summary['run_dir']}",
          file=sys.stderr)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from fastbyol.engine.doctor import format_report, inspect_machine

    report = inspect_machine()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def _presets() -> int:
    from fastbyol.config import PRESETS

    for name in sorted(PRESETS):
        flat = json.dumps(PRESETS[name], separators=(",", ":"))
        print(f"{name}\n  {flat}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "presets":
            return _presets()
        _parser().print_help()
        return EXIT_USER_ERROR
    except FastByolError as e:
        print(f"fastbyol: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fastbyol: interrupted", file=sys.stderr)
        return 130
