"""Per-GPU telemetry from NVML: a sampler thread beside the training loop, and the per-log-interval summary.

The sampler reads NVML (utilisation, memory, power, energy, clocks, temperature, clock-event reasons, PCIe
traffic) on its own daemon thread, so the training loop pays one int store per step (``set_step``) and never
a device sync. NVML talks to the driver, not to the CUDA context: nothing here imports torch or touches CUDA.

``pynvml`` (package ``nvidia-ml-py``, extra ``fastbyol[gpu]``) is imported where used (STYLE.md habit 9);
without it or without a driver, ``open_gpu_source`` says why in one line and training runs without GPU rows.
``FASTBYOL_GPU_REPLAY=<gpu_samples.jsonl>`` replays a recorded run instead, so the whole path (sampler,
aggregation, sinks) can be exercised on a CPU-only machine.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from fastbyol.errors import FastByolError

SAMPLE_FIELDS: tuple[str, ...] = (
    "sm_util_pct",  # % of the sample period in which a kernel ran (nvmlDeviceGetUtilizationRates .gpu)
    "mem_util_pct",  # % of the period in which device memory was read or written (.memory)
    "mem_used_mib",
    "power_w",
    "energy_j",  # cumulative since the driver loaded (Volta+): differences give exact energy
    "sm_clock_mhz",
    "mem_clock_mhz",
    "temp_c",
    "clock_events",  # bitmask of CLOCK_EVENT_REASONS
    "pcie_tx_mbs",
    "pcie_rx_mbs",
)

# Bit values of nvmlClocksEventReason* (== the deprecated nvmlClocksThrottleReason*) in nvidia-ml-py 13.615;
# 0x200 and 0x400 exist only as nvmlClocksThrottleReasonBoardLimit / Reliability. tests/test_nvml.py checks
# these against pynvml. Literal here because pynvml is optional and aggregate() must name bits without it.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "app_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
    0x200: "board_limit",
    0x400: "reliability",
}

REPLAY_ENV = "FASTBYOL_GPU_REPLAY"


def replaying() -> bool:
    """Whether a recorded timeline replaces NVML (``FASTBYOL_GPU_REPLAY`` set): GPU telemetry runs even on
    the CPU then, for tests and demos of the whole path."""
    return bool(os.environ.get(REPLAY_ENV))
_INSTALL_HINT = "nvidia-ml-py not installed: pip install 'fastbyol[gpu]' for GPU telemetry"


class GpuSource(Protocol):
    """Where samples come from: NVML on a GPU machine, a recorded file elsewhere, a stub in tests."""

    def devices(self) -> list[dict[str, Any]]:
        """``[{"gpu": index, "name": str, "mem_total_mib": float | None, "power_limit_w": float | None}]``."""
        ...

    def read(self, gpu: int) -> dict[str, float | int | None]:
        """One sample's SAMPLE_FIELDS for ``gpu``; a field the GPU does not support is None."""
        ...

    def close(self) -> None: ...


class NvmlSource:
    """Reads NVML through pynvml. ``indices`` are NVML indices (PCI bus order, not remapped by
    CUDA_VISIBLE_DEVICES); None takes every GPU NVML sees.

    A field that answers NotSupported once (no energy counter before Volta, no PCIe counters on some
    virtualised GPUs) is not asked again: NVML's answer does not change, and a PCIe query costs ~20 ms."""

    def __init__(self, indices: list[int] | None = None, uuids: list[str] | None = None) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise FastByolError(_INSTALL_HINT) from e
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise FastByolError(f"no NVIDIA driver ({_one_line(e)}): GPU telemetry off") from e
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                raise FastByolError("NVML sees no GPU: GPU telemetry off")
            if uuids is not None:  # CUDA ordinals -> NVML indices (CUDA may order GPUs differently)
                indices = _indices_of_uuids(pynvml, count, uuids)
            wanted = list(range(count)) if indices is None else list(indices)
            outside = [i for i in wanted if not 0 <= i < count]
            if outside:
                raise FastByolError(f"GPU index {outside} is not among the {count} GPUs NVML sees: "
                                    "GPU telemetry off")
            self._handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in wanted}
            self._devices = [self._describe(i) for i in wanted]
        except BaseException:
            pynvml.nvmlShutdown()  # nvmlInit is reference-counted: every init needs its shutdown
            raise
        # nvidia-ml-py >= 12.535 names them "clocks event" reasons; older releases only have "throttle".
        self._clock_events = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        self._unsupported: dict[int, set[str]] = {i: set() for i in wanted}
        self._closed = False

    def _describe(self, gpu: int) -> dict[str, Any]:
        nv, h = self._nvml, self._handles[gpu]
        name = nv.nvmlDeviceGetName(h)
        return {
            "gpu": gpu,
            "name": name.decode() if isinstance(name, bytes) else str(name),  # bytes before nvidia-ml-py 11.515
            "mem_total_mib": self._or_none(lambda: nv.nvmlDeviceGetMemoryInfo(h).total / 2**20),
            "power_limit_w": self._or_none(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000),
        }

    def _or_none(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except self._nvml.NVMLError:
            return None

    def devices(self) -> list[dict[str, Any]]:
        return [dict(d) for d in self._devices]

    def read(self, gpu: int) -> dict[str, float | int | None]:
        nv, h = self._nvml, self._handles[gpu]
        skip = self._unsupported[gpu]
        out: dict[str, float | int | None] = dict.fromkeys(SAMPLE_FIELDS)
        # (fields filled, reader returning their values): one NVML call each, each in its own try.
        readers: list[tuple[tuple[str, ...], Callable[[], tuple[float | int, ...]]]] = [
            (("sm_util_pct", "mem_util_pct"), lambda: _util(nv.nvmlDeviceGetUtilizationRates(h))),
            (("mem_used_mib",), lambda: (nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,)),
            (("power_w",), lambda: (nv.nvmlDeviceGetPowerUsage(h) / 1000,)),  # mW
            (("energy_j",), lambda: (nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000,)),  # mJ
            (("sm_clock_mhz",), lambda: (nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),)),
            (("mem_clock_mhz",), lambda: (nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),)),
            (("temp_c",), lambda: (nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),)),
            (("clock_events",), lambda: (int(self._clock_events(h)),)),
            # KB/s averaged over NVML's 20 ms window; the call blocks for that window (GIL released by ctypes).
            (("pcie_tx_mbs",), lambda: (nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES) / 1000,)),
            (("pcie_rx_mbs",), lambda: (nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES) / 1000,)),
        ]
        for fields, reader in readers:
            if fields[0] in skip:
                continue
            try:
                out.update(zip(fields, reader()))
            except nv.NVMLError as e:
                if getattr(e, "value", None) == nv.NVML_ERROR_NOT_SUPPORTED:
                    skip.update(fields)
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()


def _util(u: Any) -> tuple[int, int]:
    return u.gpu, u.memory


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


class ReplaySource:
    """Samples recorded in ``gpu_samples.jsonl`` (one sample dict per line), returned per GPU in file order and
    cycling at the end, so a CPU machine runs the sampler and the sinks on real numbers. The sampler sets
    ``t`` and ``step``; the recorded ones are ignored."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FastByolError(f"{REPLAY_ENV}={self.path}: no such file: GPU telemetry off")
        per_gpu: dict[int, list[dict[str, float | int | None]]] = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                gpu = int(sample["gpu"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise FastByolError(f"{self.path}:{n} is not a GPU sample ({_one_line(e)}): "
                                    "expected one JSON object with a 'gpu' index per line") from e
            per_gpu.setdefault(gpu, []).append({f: sample.get(f) for f in SAMPLE_FIELDS})
        if not per_gpu:
            raise FastByolError(f"{REPLAY_ENV}={self.path} holds no samples: GPU telemetry off")
        self._samples = dict(sorted(per_gpu.items()))
        self._next = dict.fromkeys(self._samples, 0)

    def devices(self) -> list[dict[str, Any]]:
        return [{"gpu": gpu, "name": f"replay of {self.path.name}", "mem_total_mib": None, "power_limit_w": None}
                for gpu in self._samples]

    def read(self, gpu: int) -> dict[str, float | int | None]:
        recorded = self._samples[gpu]
        i = self._next[gpu]
        self._next[gpu] = (i + 1) % len(recorded)
        return dict(recorded[i])

    def close(self) -> None:
        pass


def _normal_uuid(text: str) -> str:
    text = text.strip().lower()
    return text[4:] if text.startswith("gpu-") else text


def _indices_of_uuids(nv: Any, count: int, uuids: list[str]) -> list[int]:
    """The NVML indices of the GPUs with these UUIDs (torch's ``get_device_properties(i).uuid``, with or
    without NVML's 'GPU-' prefix), in the order given."""
    by_uuid = {}
    for i in range(count):
        uuid = nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i))
        by_uuid[_normal_uuid(uuid.decode() if isinstance(uuid, bytes) else str(uuid))] = i
    missing = [u for u in uuids if _normal_uuid(u) not in by_uuid]
    if missing:
        raise FastByolError(f"NVML does not see the GPU with UUID {missing[0]}: GPU telemetry off")
    return [by_uuid[_normal_uuid(u)] for u in uuids]


def open_gpu_source(indices: list[int] | None = None, uuids: list[str] | None = None
                    ) -> tuple[GpuSource | None, str]:
    """(source, "") when GPU telemetry is possible, else (None, one-line reason). Never raises: telemetry is
    optional and must not stop a run. ``FASTBYOL_GPU_REPLAY=<path>`` takes precedence over NVML. ``uuids``
    (the CUDA devices' UUIDs, from torch) select the GPUs this job uses, whatever CUDA_VISIBLE_DEVICES says."""
    replay = os.environ.get(REPLAY_ENV)
    try:
        if replay:
            return ReplaySource(replay), ""
        return NvmlSource(indices, uuids), ""
    except FastByolError as e:
        return None, _one_line(e)
    except Exception as e:  # a driver can fail in ways NVML does not classify (GPU lost, RM mismatch)
        return None, f"NVML failed ({type(e).__name__}: {_one_line(e)}): GPU telemetry off"


class GpuSampler:
    """Daemon thread: every 1/rate_hz seconds reads every device of the source and appends one sample per GPU
    to an in-memory list (lock-protected); never writes files, never touches CUDA/torch.

    Ticks are scheduled on ``time.monotonic`` and the thread sleeps on an Event until the next one; a tick
    the reads overran (each PCIe counter blocks ~20 ms per GPU) is skipped, not made up in a burst, so the
    samples stay evenly spaced. ``clock`` only stamps ``t`` (unix seconds by default). Call ``drain`` at the
    log cadence: undrained samples stay in memory."""

    def __init__(self, source: GpuSource, rate_hz: float, clock: Callable[[], float] = time.time) -> None:
        if not (math.isfinite(rate_hz) and rate_hz > 0):
            raise FastByolError(f"GPU sample rate must be a positive number of Hz, got {rate_hz}")
        self.source = source
        self.period = 1.0 / rate_hz
        self.clock = clock
        self.devices: list[dict[str, Any]] = source.devices()
        self.errors = 0  # source.read calls that raised; each still leaves a sample with every field None
        self.ticks_skipped = 0  # ticks lost because reading all devices took longer than one period
        self._step = 0
        self._samples: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        if self._thread is not None or self._stopped:
            raise RuntimeError("GpuSampler.start: a sampler starts once")
        self._thread = threading.Thread(target=self._run, name="fastbyol-gpu-sampler", daemon=True)
        self._thread.start()

    def set_step(self, step: int) -> None:
        self._step = step  # one attribute store: atomic under the GIL, read by the sampler thread

    def drain(self) -> list[dict[str, Any]]:
        """Samples since the last drain, oldest first."""
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.period))
            if self._thread.is_alive():
                # A read is stuck inside the driver: shutting NVML down under it could crash the process.
                # The thread is a daemon, and the process's exit releases NVML.
                return
        self.source.close()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stopping.is_set():
            self._sample_all()
            next_tick += self.period
            late = time.monotonic() - next_tick
            if late > 0:
                missed = math.ceil(late / self.period)
                self.ticks_skipped += missed
                next_tick += missed * self.period
            self._stopping.wait(max(0.0, next_tick - time.monotonic()))

    def _sample_all(self) -> None:
        step = self._step  # one step for all GPUs of a tick, so their samples line up
        taken = []
        for device in self.devices:
            gpu = device["gpu"]
            t = self.clock()
            try:
                fields = self.source.read(gpu)
            except Exception:  # a lost GPU or a broken source: count it, keep sampling the others
                self.errors += 1
                fields = {}
            taken.append({"t": t, "step": step, "gpu": gpu, **{f: fields.get(f) for f in SAMPLE_FIELDS}})
        with self._lock:
            self._samples.extend(taken)


_MEANS = ("sm_util_pct", "mem_util_pct", "power_w", "sm_clock_mhz", "mem_clock_mhz", "pcie_tx_mbs", "pcie_rx_mbs")


def aggregate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-GPU summary of one log interval, sorted by gpu index: means of rates, maxima of memory, power and
    temperature, energy over the interval, and the clock-event reasons seen. None values are ignored; a field
    with no value is None. Floats keep 3 decimals so the JSONL rows stay short.

    Energy is the NVML counter's last minus first value (exact, integrated by the driver) when at least two
    samples carry it, else the trapezoid integral of power over t. Either spans the first to the last sample
    of the interval: the gap to the next interval's first sample (one sample period) is in neither."""
    per_gpu: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        per_gpu.setdefault(int(s["gpu"]), []).append(s)
    rows = []
    for gpu, group in sorted(per_gpu.items()):
        group = sorted(group, key=lambda s: s["t"])  # stable: equal stamps keep their order
        row: dict[str, Any] = {"gpu": gpu, "samples": len(group)}
        for field in _MEANS:
            row[field] = _round(_mean(_values(group, field)))
        mem = _values(group, "mem_used_mib")
        row["mem_used_gib"] = _round(max(mem) / 1024) if mem else None
        power = _values(group, "power_w")
        row["power_w_max"] = _round(max(power)) if power else None
        row["energy_j"] = _round(_energy(group))
        temp = _values(group, "temp_c")
        row["temp_c"] = _round(max(temp)) if temp else None
        row["clock_events"] = _reason_names(_values(group, "clock_events"))
        rows.append(row)
    return rows


def _values(group: Iterable[dict[str, Any]], field: str) -> list[Any]:
    return [s[field] for s in group if s.get(field) is not None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _energy(group: list[dict[str, Any]]) -> float | None:
    counter = _values(group, "energy_j")
    # A negative difference means the counter restarted (driver reload): fall back to integrating power.
    if len(counter) >= 2 and counter[-1] >= counter[0]:
        return float(counter[-1] - counter[0])
    points = [(s["t"], s["power_w"]) for s in group if s.get("power_w") is not None]
    if len(points) < 2:
        return None
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:]))


def _reason_names(masks: list[int]) -> list[str] | None:
    if not masks:
        return None
    seen = 0
    for m in masks:
        seen |= int(m)
    bits = [1 << i for i in range(seen.bit_length()) if seen >> i & 1]
    return sorted(CLOCK_EVENT_REASONS.get(b, f"0x{b:x}") for b in bits)
