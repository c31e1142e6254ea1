"""Compile policy: which torch.compile mode the step's forward gets, and the errors that say what to do.

The compiled region is ``forward_loss`` (both views through the online/target pair, the loss, the probe):
``fullgraph=True``, so a graph break is an error, not a silent slowdown; the Triton kernels are custom ops
with fake implementations, so they trace. Backward runs the AOTAutograd graph compiled with it. The
optimizer and the EMA stay outside: with the kernels on they are three launches of a custom op already,
and outside the compiled region ``reduce-overhead``'s CUDA graphs never capture a parameter update.
Shapes are static (every micro-batch has the same size), so there is one compilation per run.

SimCLR with several ranks all-gathers the projections inside its loss (an autograd function around
``dist.all_gather``, which dynamo cannot put in a full graph): there the network alone is compiled and the
loss (one fused custom op with the kernels on) runs eagerly after it.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch

from fastbyol.errors import FastByolError
from fastbyol.step.train_step import (
    ForwardLoss,
    MethodLoss,
    MicroStepOut,
    forward_loss,
    loss_from_outputs,
    network_outputs,
)


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


def compiled_forward(mode: str, network_only: bool = False) -> ForwardLoss:
    """``forward_loss`` itself for 'off', else its torch.compile'd form (fullgraph, static shapes); with
    ``network_only``, the compiled network followed by the eager loss. 'reduce-overhead' adds what CUDA graphs
    need (``_graph_safe``)."""
    if mode == "off":
        return forward_loss
    if not network_only:
        compiled: ForwardLoss = torch.compile(forward_loss, mode=mode, fullgraph=True, dynamic=False)
        return _graph_safe(compiled) if mode == "reduce-overhead" else compiled
    network = torch.compile(network_outputs, mode=mode, fullgraph=True, dynamic=False)

    def forward(pair: Any, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None, bf16: bool,
                loss_fn: MethodLoss) -> tuple[torch.Tensor, MicroStepOut]:
        return loss_from_outputs(network(pair, view1, view2, bf16), labels, loss_fn)
    return _graph_safe(forward) if mode == "reduce-overhead" else forward


def _graph_safe(forward: ForwardLoss) -> ForwardLoss:
    """A CUDA graph writes its outputs into the same memory at every replay, so an output kept past the next
    micro-step reads the next step's values (torch 2.11 raises "accessing tensor output of CUDAGraphs that has
    been overwritten by a subsequent run"). The loss is consumed by this micro-step's backward, but the metrics
    are kept: the interval meter sums them across steps and the non-finite guard reads the last one after the
    optimizer. So each call starts a new graph step and copies the metrics out (a few scalars)."""

    def forward_copied(pair: Any, view1: torch.Tensor, view2: torch.Tensor, labels: torch.Tensor | None,
                       bf16: bool, loss_fn: MethodLoss) -> tuple[torch.Tensor, MicroStepOut]:
        torch.compiler.cudagraph_mark_step_begin()
        total, out = forward(pair, view1, view2, labels, bf16, loss_fn)
        return total, MicroStepOut(out.loss.clone(), out.proj_std.clone(),
                                   None if out.probe_loss is None else out.probe_loss.clone(),
                                   None if out.probe_top1 is None else out.probe_top1.clone())
    return forward_copied
