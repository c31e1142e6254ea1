"""Throughput and model FLOP utilisation from plain numbers: img/s, achieved TFLOP/s, MFU.

MFU = achieved model FLOP/s / the device's dense peak (PaLM, Chowdhery et al. 2022, App. B): the FLOPs are
those of the model's convolutions and matmuls, forward and backward, counted once per run by
``torch.utils.flop_counter`` on the real model (``fastbyol.engine.flops``); elementwise work, the optimizer
and the EMA are not counted, as is the convention.
"""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, matched by substring of
# the device name, longest key first (so "H100 PCIe" wins over "H100").
PEAK_BF16_TFLOPS = {
    "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H100": 989.4,
    "H200": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "L40S": 362.1, "L4": 121.0,
}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The table's peak for a device name such as 'NVIDIA H100 80GB HBM3'; None when it is not listed."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def throughput_fields(img_per_s: float, world: int, gflop_per_image: float | None,
                      peak_tflops: float | None) -> dict[str, float]:
    """img/s per GPU, achieved TFLOP/s and MFU (%) of one log interval; fields that cannot be known are
    left out (no FLOP count, no peak)."""
    fields = {"img_per_s_per_gpu": img_per_s / max(world, 1)}
    if gflop_per_image:
        achieved = gflop_per_image * img_per_s / 1e3  # over all ranks
        fields["tflop_per_s"] = achieved
        if peak_tflops:
            fields["mfu_pct"] = 100.0 * achieved / (peak_tflops * max(world, 1))
    return fields
