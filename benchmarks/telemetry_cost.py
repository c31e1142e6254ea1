"""The host cost of telemetry in absolute terms, beside ``fastbyol bench``'s on/off step medians.

A step-time difference of well under 1% drowns in the noise of a busy machine; this measures the two
costs directly and divides by the step time. (1) The phase timer: one step's worth of calls (forward,
backward, optimizer, ema, stop; a read every ``--log-every`` steps) timed over many repetitions, with CUDA
events on a GPU. (2) The NVML sampler thread: process CPU time consumed while the main thread sleeps
for ``--seconds`` with the sampler running at ``--hz`` (real NVML on a GPU machine, a replayed file with
``FASTBYOL_GPU_REPLAY`` elsewhere).

Run from the repository root: ``python -m benchmarks.telemetry_cost [--step-ms 1800]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.harness import environment, parse_args, write_results
from fastbyol.telemetry.nvml import GpuSampler, open_gpu_source
from fastbyol.telemetry.phases import PhaseTimer


def phase_timer_us_per_step(device: torch.device, steps: int, log_every: int) -> float:
    timer = PhaseTimer(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        for phase in ("forward", "backward", "optimizer", "ema"):
            timer.start(phase)
        timer.stop()
        if step % log_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the meter's sync, which the trainer pays anyway
            timer.read()
    return (time.perf_counter() - t0) / steps * 1e6


def sampler_cpu_share(hz: float, seconds: float) -> tuple[float | None, str, int]:
    """(share of one core the sampler thread used, source, samples) or (None, why, 0)."""
    source, reason = open_gpu_source()
    if source is None:
        return None, reason, 0
    sampler = GpuSampler(source, hz)
    cpu0 = time.process_time()
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    used = time.process_time() - cpu0
    return used / seconds, type(source).__name__, len(sampler.drain())


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--step-ms", type=float, default=100.0,
                            help="the step time to compare with (ms; e.g. the bench's median)")
        parser.add_argument("--hz", type=float, default=4.0, help="sampler rate (run.telemetry_hz)")
        parser.add_argument("--seconds", type=float, default=10.0, help="how long the sampler runs")
        parser.add_argument("--log-every", type=int, default=50)

    args = parse_args("Host cost of the phase timer and the NVML sampler", extra)
    steps = 200 if args.quick else 20000
    timer_us = phase_timer_us_per_step(args.device, steps, args.log_every)
    share, source, samples = sampler_cpu_share(args.hz, 1.0 if args.quick else args.seconds)
    step_us = args.step_ms * 1e3
    row: dict[str, Any] = {
        "step_ms": args.step_ms, "phase_timer_us_per_step": timer_us,
        "phase_timer_pct_of_step": 100 * timer_us / step_us, "sampler_source": source,
        "sampler_hz": args.hz, "sampler_samples": samples,
        "sampler_cpu_pct_of_one_core": None if share is None else 100 * share,
        # The sampler thread competes for the host only; its share of one core is the bound on what it can
        # take from a step that is host-bound, and ~0 of a GPU-bound step.
        "bound_pct_of_step": None if share is None else 100 * timer_us / step_us + 100 * share,
    }
    write_results([row], environment(args.device), args.out, "telemetry-cost")


if __name__ == "__main__":
    main()
