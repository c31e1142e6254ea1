"""Compile policy: which torch.compile mode the step's forward gets, and the errors that say what to do.

The compiled region is ``forward_loss`` (both views through the online/target pair, the loss, the probe):
``fullgraph=True``, so a graph break is an error, not a silent slowdown; the Triton kernels are custom ops
with fake implementations, so they trace. Backward runs the AOTAutograd graph compiled with it. The
optimizer and the EMA stay outside: with the kernels on they are three launches of a custom op already,
and outside the compiled region ``reduce-overhead``'s CUDA graphs never capture a parameter update.
Shapes are static (every micro-batch has the same size), so there is one compilation per run.
"""

from __future__ import annotations

import shutil

import torch

from fastbyol.errors import FastByolError
from fastbyol.step.train_step import ForwardLoss, forward_loss


def resolve_compile(setting: str, device: torch.device) -> str:
    """'off' or the torch.compile mode for this run ('auto': 'default' on CUDA, 'off' on the CPU, where
    the first compilation costs about a minute and the demo is short)."""
    if setting == "auto":
        return "default" if device.type == "cuda" else "off"
    if setting == "off":
        return "off"
    if setting == "reduce-overhead" and device.type != "cuda":
        raise FastByolError("run.compile=reduce-overhead uses CUDA graphs and needs a CUDA GPU: use "
                            "run.compile=default or off on the CPU")
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise FastByolError(f"run.compile={setting} on the CPU needs a C++ compiler (g++) for inductor: "
                            "install one, or use run.compile=off")
    return setting


def compiled_forward(mode: str) -> ForwardLoss:
    """``forward_loss`` itself for 'off', else its torch.compile'd form (fullgraph, static shapes)."""
    if mode == "off":
        return forward_loss
    compiled: ForwardLoss = torch.compile(forward_loss, mode=mode, fullgraph=True, dynamic=False)
    return compiled
