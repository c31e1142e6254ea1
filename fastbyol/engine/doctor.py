"""``fastbyol doctor``: what this machine has, and which paths fastbyol will take on it."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
from typing import Any

from fastbyol.config import ARCHS


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> str | None:
    """None if it imports, else the one-line reason."""
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # an optional package may fail in many ways (missing .so, CUDA mismatch)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _nvml() -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {"ok": False, "why": "nvidia-ml-py not installed: pip install 'fastbyol[gpu]'"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"ok": False, "why": f"no NVIDIA driver ({e}): GPU telemetry off"}
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append(name.decode() if isinstance(name, bytes) else name)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"ok": True, "driver": driver.decode() if isinstance(driver, bytes) else driver, "gpus": gpus}
    finally:
        pynvml.nvmlShutdown()


def _launch() -> str:
    """Where this process sits in a job, as ``fastbyol train`` would read it (torchrun, SLURM, or alone)."""
    from fastbyol.engine.distributed import launch_env
    from fastbyol.errors import FastByolError

    try:
        launch = launch_env()
    except FastByolError as e:
        return f"refused: {e}"
    if launch.launcher == "none":
        return "one process (no torchrun or SLURM task variables)"
    return (f"{launch.launcher}: rank {launch.rank} of {launch.world}, local rank {launch.local_rank}, master "
            f"{launch.master_addr or '?'}:{launch.master_port or '?'}")


def inspect_machine() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "triton": _version("triton"),
        "dali": _version("nvidia-dali-cuda130"),
        "dali_import_error": _try_import("nvidia.dali") if _version("nvidia-dali-cuda130") else "not installed",
        "deepspeed": _version("deepspeed"),
        "nvml": _nvml(),
        "apex": _version("apex") if _try_import("apex.optimizers") is None else None,
        "wandb": _version("wandb"),
    }
    report["launch"] = _launch()
    report["bf16_supported"] = bool(cuda and torch.cuda.is_bf16_supported())
    report["paths"] = {
        "device": "cuda" if cuda else "cpu",
        "precision": "bf16 autocast" if cuda else "fp32",
        "memory_format": "channels_last (convolutional encoders)" if cuda else "contiguous",
        "encoders": f"torchvision: {', '.join(ARCHS)}; timm:<name> (any timm model)",
        "data_loader": "torch (torchvision/PIL workers)",
        "triton_kernels": "GPU" if cuda and report["triton"] else (
            "interpreter only (TRITON_INTERPRET=1, tests)" if report["triton"] else "unavailable"),
        "distributed": "deepspeed available" if report["deepspeed"] else "torch DDP only",
        "launch": report["launch"],
        "compile": "torch.compile default (run.compile=auto)" if cuda else (
            "off by default; run.compile=default works (C++ compiler found)" if shutil.which("g++")
            else "off: no C++ compiler for inductor on the CPU"),
    }
    return report


def format_report(r: dict[str, Any]) -> str:
    def mark(ok: bool) -> str:
        return "ok " if ok else "-- "

    nvml = r["nvml"]
    lines = [
        f"{mark(True)}python      {r['python']} on {r['platform']} ({r['cpu_count']} CPUs)",
        f"{mark(True)}torch       {r['torch']} (built for CUDA {r['torch_cuda']})",
        f"{mark(r['cuda_available'])}cuda        "
        + (", ".join(r["gpus"]) if r["cuda_available"] else "no CUDA GPU visible: training runs on the CPU"),
        f"{mark(bool(r['torchvision']))}torchvision {r['torchvision'] or 'missing: pip install torchvision'}",
        f"{mark(bool(r['timm']))}timm        "
        + (f"{r['timm']}: model.arch=timm:<name> takes any of its models" if r["timm"]
           else "missing: pip install timm for model.arch=timm:<name>"),
        f"{mark(bool(r['triton']))}triton      {r['triton'] or 'missing: pip install triton'}",
        f"{mark(r['dali_import_error'] is None)}dali        "
        + (r["dali"] if r["dali_import_error"] is None else
           f"{r['dali_import_error']}: pip install 'fastbyol[gpu]' for GPU data loading"),
        f"{mark(bool(r['deepspeed']))}deepspeed   {r['deepspeed'] or 'missing: pip install fastbyol[gpu] for ZeRO'}",
        f"{mark(nvml['ok'])}nvml        "
        + (f"driver {nvml['driver']}, {', '.join(nvml['gpus'])}" if nvml["ok"] else nvml["why"]),
        f"{mark(bool(r['apex']))}apex        {r['apex'] or 'not installed (optional)'}",
        f"{mark(bool(r['wandb']))}wandb       "
        + (f"{r['wandb']}: run.wandb=PROJECT logs to Weights & Biases" if r["wandb"]
           else "not installed (optional): pip install 'fastbyol[track]' for run.wandb=PROJECT"),
        "",
        "fastbyol will use:",
    ]
    lines += [f"  {k:15s} {v}" for k, v in r["paths"].items()]
    return "\n".join(lines)
