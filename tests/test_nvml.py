"""fastbyol.telemetry.nvml: aggregation against hand-computed numbers, the sampler thread on a fake source and
clock, replay files, the no-driver / no-pynvml reasons, and NvmlSource's NVML calls on a stub pynvml module
(unit conversions, NotSupported -> None) so that code path runs on a CPU. One test reads a real GPU."""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fastbyol.errors import FastByolError
from fastbyol.telemetry.nvml import (
    CLOCK_EVENT_REASONS,
    REPLAY_ENV,
    SAMPLE_FIELDS,
    GpuSampler,
    NvmlSource,
    ReplaySource,
    aggregate,
    open_gpu_source,
)


def sample(t: float, gpu: int, step: int = 0, **fields: Any) -> dict[str, Any]:
    return {"t": t, "step": step, "gpu": gpu, **dict.fromkeys(SAMPLE_FIELDS), **fields}


# ---------------------------------------------------------------- aggregate


def test_aggregate_hand_computed() -> None:
    gpu0 = [
        sample(10.0, 0, sm_util_pct=50, mem_util_pct=20, mem_used_mib=1024.0, power_w=100.0, energy_j=1000.0,
               sm_clock_mhz=1400, mem_clock_mhz=2600, temp_c=60, clock_events=0x1, pcie_tx_mbs=10.0),
        sample(10.5, 0, sm_util_pct=70, mem_used_mib=3072.0, power_w=200.0, energy_j=1075.0,
               sm_clock_mhz=1500, mem_clock_mhz=2600, temp_c=65, clock_events=0x4, pcie_tx_mbs=20.0),
        sample(11.0, 0, mem_util_pct=40, mem_used_mib=2048.0, energy_j=1180.0, mem_clock_mhz=2600, temp_c=62,
               clock_events=0x800),
    ]
    # No energy counter in >= 2 samples: energy is the trapezoid of power over t, skipping the sample without
    # power: (10.5 - 10) * (100 + 300) / 2 + (12.5 - 10.5) * (300 + 100) / 2 = 100 + 400.
    gpu1 = [
        sample(10.0, 1, power_w=100.0, mem_used_mib=1000.0, energy_j=5.0),
        sample(10.5, 1, power_w=300.0),
        sample(12.0, 1),
        sample(12.5, 1, power_w=100.0),
    ]
    gpu2 = [sample(10.0, 2, power_w=90.0)]  # one power value: no energy
    interleaved = [gpu1[0], gpu2[0], gpu0[0], gpu1[1], gpu0[1], gpu1[2], gpu0[2], gpu1[3]]

    rows = aggregate(interleaved)

    assert [r["gpu"] for r in rows] == [0, 1, 2]
    assert rows[0] == {
        "gpu": 0, "samples": 3,
        "sm_util_pct": 60.0, "mem_util_pct": 30.0, "mem_used_gib": 3.0,
        "power_w": 150.0, "power_w_max": 200.0, "energy_j": 180.0,  # 1180 - 1000 from the counter
        "sm_clock_mhz": 1450.0, "mem_clock_mhz": 2600.0, "temp_c": 65,
        "clock_events": ["0x800", "gpu_idle", "sw_power_cap"],
        "pcie_tx_mbs": 15.0, "pcie_rx_mbs": None,
    }
    assert rows[1]["samples"] == 4
    assert rows[1]["energy_j"] == 500.0
    assert rows[1]["power_w"] == pytest.approx(166.667)  # 500 / 3, kept to 3 decimals
    assert rows[1]["power_w"] == round(500 / 3, 3)
    assert rows[1]["power_w_max"] == 300.0
    assert rows[1]["mem_used_gib"] == 0.977  # 1000 / 1024 = 0.9765625
    assert rows[1]["clock_events"] is None and rows[1]["temp_c"] is None and rows[1]["sm_util_pct"] is None
    assert rows[2]["samples"] == 1 and rows[2]["energy_j"] is None and rows[2]["power_w"] == 90.0
    json.dumps(rows)  # the rows go to metrics.jsonl as they are


def test_aggregate_counter_restart_falls_back_to_power_and_zero_mask_is_empty() -> None:
    rows = aggregate([
        sample(0.0, 0, energy_j=900.0, power_w=100.0, clock_events=0),
        sample(2.0, 0, energy_j=3.0, power_w=100.0, clock_events=0),  # driver reloaded: counter restarted
    ])
    assert rows[0]["energy_j"] == 200.0
    assert rows[0]["clock_events"] == []


def test_aggregate_empty() -> None:
    assert aggregate([]) == []


def test_clock_event_reasons_match_pynvml() -> None:
    pynvml = pytest.importorskip("pynvml")
    suffix = {"gpu_idle": "GpuIdle", "app_clocks_setting": "ApplicationsClocksSetting",
              "sw_power_cap": "SwPowerCap", "hw_slowdown": "HwSlowdown", "sync_boost": "SyncBoost",
              "sw_thermal": "SwThermalSlowdown", "hw_thermal": "HwThermalSlowdown",
              "hw_power_brake": "HwPowerBrakeSlowdown", "display_clocks": "DisplayClockSetting",
              "board_limit": "BoardLimit", "reliability": "Reliability"}
    assert sorted(CLOCK_EVENT_REASONS.values()) == sorted(suffix)
    for name, s in suffix.items():
        bit = getattr(pynvml, f"nvmlClocksEventReason{s}", None)
        bit = getattr(pynvml, f"nvmlClocksThrottleReason{s}") if bit is None else bit
        assert CLOCK_EVENT_REASONS[bit] == name
    # Every single-bit reason pynvml defines has a name here.
    for attr in dir(pynvml):
        if attr.startswith(("nvmlClocksEventReason", "nvmlClocksThrottleReason")):
            value = getattr(pynvml, attr)
            if isinstance(value, int) and value and value & (value - 1) == 0:
                assert value in CLOCK_EVENT_REASONS, attr


# ---------------------------------------------------------------- GpuSampler


class FakeSource:
    """Counts its reads per GPU; ``read`` returns the count as sm_util_pct so order is visible."""

    def __init__(self, gpus: tuple[int, ...] = (0, 1), fail_gpu: int | None = None, delay_s: float = 0.0) -> None:
        self.gpus, self.fail_gpu, self.delay_s = gpus, fail_gpu, delay_s
        self.reads: Counter[int] = Counter()
        self.read_times: list[float] = []
        self.closed = 0
        self.cond = threading.Condition()

    def devices(self) -> list[dict[str, Any]]:
        return [{"gpu": g, "name": f"fake {g}", "mem_total_mib": 1024.0, "power_limit_w": 300.0} for g in self.gpus]

    def read(self, gpu: int) -> dict[str, float | int | None]:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self.cond:
            self.reads[gpu] += 1
            self.read_times.append(time.monotonic())
            n = self.reads[gpu]
            self.cond.notify_all()
        if gpu == self.fail_gpu:
            raise RuntimeError("GPU is lost")
        return {"sm_util_pct": n, "power_w": 100.0 + gpu}

    def close(self) -> None:
        self.closed += 1

    def wait_reads(self, gpu: int, n: int, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.reads[gpu] >= n, timeout), f"only {self.reads[gpu]} reads"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def test_sampler_tags_steps_in_order_and_stops_once() -> None:
    source, clock = FakeSource(), FakeClock()
    sampler = GpuSampler(source, rate_hz=200, clock=clock)
    assert [d["gpu"] for d in sampler.devices] == [0, 1]
    sampler.set_step(7)
    sampler.start()
    source.wait_reads(1, 3)
    sampler.set_step(8)
    n = source.reads[1]
    source.wait_reads(1, n + 3)
    sampler.stop()
    samples = sampler.drain()

    assert sampler.drain() == []
    assert sampler.errors == 0
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)  # oldest first
    assert all(set(s) == {"t", "step", "gpu", *SAMPLE_FIELDS} for s in samples)
    for gpu in (0, 1):
        mine = [s for s in samples if s["gpu"] == gpu]
        assert [s["sm_util_pct"] for s in mine] == list(range(1, len(mine) + 1))
        assert all(s["power_w"] == 100.0 + gpu and s["temp_c"] is None for s in mine)
        steps = [s["step"] for s in mine]
        assert steps == sorted(steps) and steps[0] == 7 and steps[-1] == 8
    # One tick reads GPU 0 then GPU 1 with the same step.
    assert [(s["gpu"], s["step"]) for s in samples[0:2]] == [(0, 7), (1, 7)]

    sampler.stop()
    assert source.closed == 1
    with pytest.raises(RuntimeError):
        sampler.start()


def test_sampler_counts_a_failing_device_and_keeps_going() -> None:
    source = FakeSource(fail_gpu=1)
    sampler = GpuSampler(source, rate_hz=200, clock=FakeClock())
    sampler.start()
    source.wait_reads(1, 4)
    source.wait_reads(0, 4)
    assert sampler._thread is not None and sampler._thread.is_alive()
    sampler.stop()
    samples = sampler.drain()
    assert sampler.errors == source.reads[1] >= 4
    assert all(s[f] is None for s in samples if s["gpu"] == 1 for f in SAMPLE_FIELDS)
    assert all(s["sm_util_pct"] is not None for s in samples if s["gpu"] == 0)
    assert len([s for s in samples if s["gpu"] == 1]) == source.reads[1]


def test_sampler_rate_is_roughly_respected() -> None:
    source = FakeSource()
    sampler = GpuSampler(source, rate_hz=50)
    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    samples = sampler.drain()
    for gpu in (0, 1):
        assert 5 <= sum(s["gpu"] == gpu for s in samples) <= 25
    assert all(abs(s["t"] - time.time()) < 60 for s in samples)  # default clock: unix seconds


def test_sampler_skips_overrun_ticks_instead_of_bursting() -> None:
    class SlowFirstRead(FakeSource):
        def read(self, gpu: int) -> dict[str, float | int | None]:
            if not self.reads:
                time.sleep(0.22)  # ~4 periods at 20 Hz
            return super().read(gpu)

    source = SlowFirstRead(gpus=(0,))
    sampler = GpuSampler(source, rate_hz=20)
    sampler.start()
    source.wait_reads(0, 4)
    sampler.stop()
    gaps = [b - a for a, b in zip(source.read_times, source.read_times[1:])]
    assert sampler.ticks_skipped >= 3
    assert min(gaps) > 0.025, gaps  # a catching-up sampler would read back to back


def test_sampler_rejects_a_bad_rate() -> None:
    with pytest.raises(FastByolError, match="Hz"):
        GpuSampler(FakeSource(), rate_hz=0)


# ---------------------------------------------------------------- ReplaySource and open_gpu_source


def write_recording(path: Path) -> list[dict[str, Any]]:
    recorded = [sample(100.0 + i, gpu, step=i, sm_util_pct=10 * i + gpu, power_w=200.0 + i, clock_events=4)
                for i in range(3) for gpu in (0, 1)]
    recorded = recorded[:-1]  # GPU 1 has 2 samples, GPU 0 has 3
    path.write_text("".join(json.dumps(s) + "\n" for s in recorded) + "\n", encoding="utf-8")
    return recorded


def test_replay_round_trip_cycles(tmp_path: Path) -> None:
    path = tmp_path / "gpu_samples.jsonl"
    recorded = write_recording(path)
    source = ReplaySource(path)
    assert source.devices() == [
        {"gpu": 0, "name": "replay of gpu_samples.jsonl", "mem_total_mib": None, "power_limit_w": None},
        {"gpu": 1, "name": "replay of gpu_samples.jsonl", "mem_total_mib": None, "power_limit_w": None},
    ]
    fields = [{f: s[f] for f in SAMPLE_FIELDS} for s in recorded]
    assert [source.read(0) for _ in range(4)] == [fields[0], fields[2], fields[4], fields[0]]
    assert [source.read(1) for _ in range(3)] == [fields[1], fields[3], fields[1]]

    # Through the sampler, t and step are the sampler's own.
    sampler = GpuSampler(ReplaySource(path), rate_hz=200, clock=FakeClock())
    sampler.set_step(42)
    sampler.start()
    deadline = time.monotonic() + 5
    got: list[dict[str, Any]] = []
    while len(got) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
        got += sampler.drain()
    sampler.stop()
    assert [s["sm_util_pct"] for s in got[:4]] == [0, 1, 10, 11]
    assert all(s["step"] == 42 and s["t"] > 1000 for s in got)


def test_open_gpu_source_honours_replay_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gpu_samples.jsonl"
    write_recording(path)
    monkeypatch.setenv(REPLAY_ENV, str(path))
    source, reason = open_gpu_source()
    assert isinstance(source, ReplaySource) and reason == ""

    missing = tmp_path / "nowhere.jsonl"
    monkeypatch.setenv(REPLAY_ENV, str(missing))
    assert open_gpu_source() == (None, f"{REPLAY_ENV}={missing}: no such file: GPU telemetry off")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"gpu": 0}\nnot json\n', encoding="utf-8")
    monkeypatch.setenv(REPLAY_ENV, str(bad))
    source, reason = open_gpu_source()
    assert source is None and f"{bad}:2" in reason and "\n" not in reason


def test_open_gpu_source_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REPLAY_ENV, raising=False)
    source, reason = open_gpu_source()
    if source is not None:  # a machine with a driver
        source.close()
        assert reason == ""
        return
    assert "\n" not in reason and ("NVIDIA driver" in reason or "nvidia-ml-py" in reason), reason


def test_open_gpu_source_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REPLAY_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert open_gpu_source() == (None, "nvidia-ml-py not installed: pip install 'fastbyol[gpu]' for GPU telemetry")


# ---------------------------------------------------------------- NvmlSource on a stub pynvml

NOT_SUPPORTED, DRIVER_NOT_LOADED, GPU_IS_LOST = 3, 9, 15


def stub_pynvml(count: int = 2, init_error: int | None = None, event_reasons: bool = False) -> types.ModuleType:
    """The pynvml calls NvmlSource makes. GPU 0 answers everything (name as bytes, as old pynvml returns it);
    GPU 1 has no energy counter or PCIe counters (NotSupported) and its temperature read fails (GPU lost)."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            names = {NOT_SUPPORTED: "Not Supported", DRIVER_NOT_LOADED: "Driver Not Loaded"}
            return names.get(self.value, "GPU is lost")

    calls: Counter[str] = Counter()
    ns = types.SimpleNamespace

    def call(name: str, h: str | None = None) -> None:
        calls[name if h is None else f"{name}:{h}"] += 1

    def init() -> None:
        call("init")
        if init_error is not None:
            raise NVMLError(init_error)

    def energy(h: str) -> int:
        call("energy", h)
        if h == "h1":
            raise NVMLError(NOT_SUPPORTED)
        return 1_234_567

    def temperature(h: str, sensor: int) -> int:
        call("temp", h)
        assert sensor == nv.NVML_TEMPERATURE_GPU
        if h == "h1":
            raise NVMLError(GPU_IS_LOST)
        return 61

    def pcie(h: str, counter: int) -> int:
        call("pcie", h)
        if h == "h1":
            raise NVMLError(NOT_SUPPORTED)
        return {nv.NVML_PCIE_UTIL_TX_BYTES: 123_456, nv.NVML_PCIE_UTIL_RX_BYTES: 7_890}[counter]

    attrs: dict[str, Any] = dict(
        NVMLError=NVMLError, calls=calls,
        NVML_ERROR_NOT_SUPPORTED=NOT_SUPPORTED, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        NVML_PCIE_UTIL_TX_BYTES=0, NVML_PCIE_UTIL_RX_BYTES=1,
        nvmlInit=init, nvmlShutdown=lambda: call("shutdown"),
        nvmlDeviceGetCount=lambda: count,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetUUID=lambda h: f"GPU-0000000{h[1:]}-aaaa-bbbb-cccc-dddddddddddd",
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3" if h == "h0" else "NVIDIA A10",
        nvmlDeviceGetMemoryInfo=lambda h: ns(total=80 * 2**30, used=3 * 2**30 + 2**19, free=0),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetUtilizationRates=lambda h: ns(gpu=87, memory=35),
        nvmlDeviceGetPowerUsage=lambda h: 312_500,
        nvmlDeviceGetTotalEnergyConsumption=energy,
        nvmlDeviceGetClockInfo=lambda h, clock: {1: 1980, 2: 2619}[clock],
        nvmlDeviceGetTemperature=temperature,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 0x1 | 0x4,
        nvmlDeviceGetPcieThroughput=pcie,
    )
    if event_reasons:  # nvidia-ml-py >= 12.535 has both; the new name is preferred
        attrs["nvmlDeviceGetCurrentClocksEventReasons"] = lambda h: 0x40
    for k, v in attrs.items():
        setattr(nv, k, v)
    return nv


def test_nvml_source_reads_and_converts(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = stub_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    source = NvmlSource()
    assert source.devices() == [
        {"gpu": 0, "name": "NVIDIA H100 80GB HBM3", "mem_total_mib": 81920.0, "power_limit_w": 700.0},
        {"gpu": 1, "name": "NVIDIA A10", "mem_total_mib": 81920.0, "power_limit_w": 700.0},
    ]
    assert source.read(0) == {
        "sm_util_pct": 87, "mem_util_pct": 35, "mem_used_mib": 3072.5, "power_w": 312.5, "energy_j": 1234.567,
        "sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "temp_c": 61, "clock_events": 0x5,
        "pcie_tx_mbs": 123.456, "pcie_rx_mbs": 7.89,
    }
    for _ in range(2):
        r1 = source.read(1)
        assert r1["energy_j"] is None and r1["pcie_tx_mbs"] is None and r1["pcie_rx_mbs"] is None
        assert r1["temp_c"] is None and r1["power_w"] == 312.5
    # NotSupported is asked once (a PCIe query blocks ~20 ms): TX once, RX once; a transient failure is asked again.
    calls = nv.calls  # type: ignore[attr-defined]
    assert calls["energy:h1"] == 1 and calls["pcie:h1"] == 2 and calls["temp:h1"] == 2
    source.close()
    source.close()
    assert calls["init"] == calls["shutdown"] == 1


def test_nvml_source_prefers_clocks_event_reasons_and_takes_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", stub_pynvml(event_reasons=True))
    source = NvmlSource(indices=[1])
    assert [d["gpu"] for d in source.devices()] == [1]
    assert source.read(1)["clock_events"] == 0x40
    source.close()


def test_nvml_source_failures_give_one_line_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REPLAY_ENV, raising=False)
    nv = stub_pynvml(init_error=DRIVER_NOT_LOADED)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert open_gpu_source() == (None, "no NVIDIA driver (Driver Not Loaded): GPU telemetry off")

    nv = stub_pynvml(count=0)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert open_gpu_source() == (None, "NVML sees no GPU: GPU telemetry off")
    assert nv.calls["init"] == nv.calls["shutdown"] == 1  # type: ignore[attr-defined]

    nv = stub_pynvml(count=2)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    with pytest.raises(FastByolError, match=r"\[5\] is not among the 2 GPUs"):
        NvmlSource(indices=[0, 5])
    assert nv.calls["init"] == nv.calls["shutdown"] == 1  # type: ignore[attr-defined]

    source, reason = open_gpu_source([1])
    assert isinstance(source, NvmlSource) and reason == ""
    sampler = GpuSampler(source, rate_hz=100)
    sampler.stop()  # never started: still closes the source
    assert nv.calls["init"] == nv.calls["shutdown"] == 2  # type: ignore[attr-defined]


# ---------------------------------------------------------------- a real GPU


@pytest.mark.cuda
def test_nvml_source_on_a_real_gpu() -> None:
    pytest.importorskip("pynvml")
    source = NvmlSource([0])
    (device,) = source.devices()
    assert device["gpu"] == 0 and device["name"] and device["mem_total_mib"] > 1024
    r = source.read(0)
    assert set(r) == set(SAMPLE_FIELDS)
    assert 0 <= r["sm_util_pct"] <= 100 and 0 < r["mem_used_mib"] <= device["mem_total_mib"]  # type: ignore[operator]
    assert r["sm_clock_mhz"] > 0 and 0 < r["temp_c"] < 120 and isinstance(r["clock_events"], int)  # type: ignore[operator]
    assert r["power_w"] is None or 0 < r["power_w"] < 2000

    sampler = GpuSampler(source, rate_hz=20)
    sampler.start()
    time.sleep(0.5)
    sampler.stop()
    (row,) = aggregate(sampler.drain())
    assert row["gpu"] == 0 and row["samples"] >= 3 and sampler.errors == 0
    if row["power_w"] is not None:
        assert row["energy_j"] is not None and row["energy_j"] >= 0


def test_nvml_source_maps_cuda_uuids_to_nvml_indices(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA may number GPUs differently from NVML (and CUDA_VISIBLE_DEVICES renumbers them): torch's UUIDs
    (no 'GPU-' prefix) select NVML's devices, in CUDA's order."""
    monkeypatch.delenv(REPLAY_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", stub_pynvml(count=2))
    source, reason = open_gpu_source(uuids=["00000001-aaaa-bbbb-cccc-dddddddddddd",
                                            "GPU-00000000-AAAA-bbbb-cccc-dddddddddddd"])
    assert reason == "" and isinstance(source, NvmlSource)
    assert [d["gpu"] for d in source.devices()] == [1, 0]
    source.close()
    source, reason = open_gpu_source(uuids=["12345678-0000-0000-0000-000000000000"])
    assert source is None and reason == ("NVML does not see the GPU with UUID 12345678-0000-0000-0000-000000000000: "
                                         "GPU telemetry off")
