"""``fastbyol report``: the page built from a run directory is self-contained, escapes what it read, draws what
the run logged, and says why when it could not (no GPU telemetry, a killed run, a wrong path or CSV).
The last test opens the page in headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/setup.sh) and checks that every plot decodes and the page is not blank."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import chromium
from PIL import Image

from fastbyol.errors import FastByolError
from fastbyol.telemetry.report import build_report, fmt_cell

ROOT = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"
TRAINING_PNGS = {"loss", "probe_top1", "proj_std", "schedules", "throughput", "data_wait", "phases"}
GPU_PNGS = {"gpu_util", "gpu_memory", "gpu_power", "gpu_clocks", "gpu_temp", "gpu_pcie"}

CONFIG = f"""preset: byol-r50-1000ep
model:
  arch: resnet50
  proj_hidden: 4096
  proj_dim: 256
data:
  source: folder
  path: /data/imagenet/train
optim:
  batch_size: 4096
  base_lr: 0.2
run:
  name: '{XSS}'
  log_every: 50
"""

ENV = "2026-11-23T11:49:04+00:00,3921dfa,NVIDIA H100 80GB HBM3,580.65,13.0,2.14.1+cu130,3.8.0,3.11.7"
BENCH_CSV = f"""variant,batch,img_per_s,ratio_vs_torch,note,date,commit,device,driver,cuda,torch,triton,python
torch,256,2711.4481230,1.0,baseline,{ENV}
dali,256,5103.98765,1.882392,"{XSS}",{ENV}
dali_roi,256,12345.6789,4.553,,{ENV}
"""


def _metrics_row(i: int, gpus: bool) -> dict[str, Any]:
    """Log row i (every 50 steps) of a 2-GPU ResNet-50 run at batch 4096: realistic magnitudes and shapes."""
    step = 50 * (i + 1)
    row: dict[str, Any] = {
        "step": step, "epoch": round(step * 4096 / 1_281_167, 6),
        "loss": 0.35 + 3.5 * math.exp(-i / 8), "proj_std": 0.0625 * (1 - 0.3 * math.exp(-i / 5)),
        "proj_std_uniform": 1 / math.sqrt(256), "lr": 4.8 * min(1.0, step / 1000),
        "tau": 1 - 0.004 * (math.cos(math.pi * step / 2000) + 1) / 2,
        "img_per_s": 5200.0 + 40 * math.sin(i), "img_per_s_per_gpu": 2600.0 + 20 * math.sin(i),
        "data_wait_frac": 0.02 + 0.01 * (i % 3), "skipped_images": 0,
        "tflop_per_s": 420.0, "mfu_pct": 42.4 + math.sin(i), "peak_mem_gib": 61.2,
        "phase_ms": {"data_wait": 16.0, "forward": 230.0, "backward": 460.0, "optimizer": 30.0},
    }
    if i % 5 == 3:  # the probe logs every 5th row; the last row (i = 39) has none
        row["probe_loss"], row["probe_top1"] = 2.3 * math.exp(-i / 20), 10 + 2.5 * i
    if gpus:
        row["gpus"] = [{
            "gpu": g, "samples": 49, "sm_util_pct": 96.0 - g, "mem_util_pct": 55.0, "mem_used_gib": 61.2,
            "power_w": 640.0 + 10 * g, "power_w_max": 699.0, "energy_j": 31_000.0, "sm_clock_mhz": 1755.0,
            "mem_clock_mhz": 2619.0, "temp_c": 60.0 + g,
            "clock_events": (["gpu_idle"] if i == 0 else []) + (["sw_power_cap"] if i % 4 == 1 else []),
            "pcie_tx_mbs": None, "pcie_rx_mbs": 310.0,
        } for g in range(2)]
    return row


def _gpu_sample(k: int, gpu: int) -> dict[str, Any]:
    """The k-th 4 Hz sample of one GPU."""
    warm = k > 8  # idle while the loader fills its queues
    return {"t": 1_763_900_000.0 + k / 4, "step": k // 8, "gpu": gpu,
            "sm_util_pct": min(100, (94 if warm else 3) - gpu * 2 + (k % 7)),
            "mem_util_pct": 50 + (k % 11) if warm else 1,
            "mem_used_mib": 62_000 + 30 * (k % 5) if warm else 2_100, "power_w": (630 if warm else 90) + 5 * (k % 9),
            "energy_j": 150.0 * k, "sm_clock_mhz": 1755 if k % 13 else 1620, "mem_clock_mhz": 2619,
            "temp_c": 40 + min(k, 80) * 0.3 + gpu, "clock_events": 4 if k % 13 == 0 else 0,
            "pcie_tx_mbs": 80 + k % 5 if gpu == 0 else None, "pcie_rx_mbs": 300 + k % 17}


def make_run(root: Path, gpus: bool = True, samples: bool = True, rows: int = 40) -> Path:
    run = root / "byol-r50"
    (run / "bench").mkdir(parents=True)
    (run / "config.yaml").write_text(CONFIG, encoding="utf-8")
    (run / "metrics.jsonl").write_text("".join(json.dumps(_metrics_row(i, gpus), sort_keys=True) + "\n"
                                               for i in range(rows)), encoding="utf-8")
    if gpus and samples:
        with open(run / "gpu_samples.jsonl", "w", encoding="utf-8") as f:
            for k in range(rows * 8):
                for g in range(2):
                    f.write(json.dumps(_gpu_sample(k, g)) + "\n")
    telemetry: dict[str, Any] = {
        "gpu_telemetry": True, "reason": "",
        "devices": [{"gpu": g, "name": "NVIDIA H100 80GB HBM3", "mem_total_mib": 81_559, "power_limit_w": 700.0}
                    for g in range(2)],
        "gflop_per_image": 12.3, "peak_tflops": 989.4, "device": "NVIDIA H100 80GB HBM3 x2", "world": 2,
    } if gpus else {
        "gpu_telemetry": False, "reason": "no NVIDIA driver (libnvidia-ml.so.1 not found): telemetry off",
        "devices": [], "gflop_per_image": 12.3, "peak_tflops": None, "device": "cpu", "world": 1,
    }
    (run / "telemetry.json").write_text(json.dumps(telemetry), encoding="utf-8")
    (run / "bench" / "2026-11-23-nvidia-h100-80gb-hbm3-pipeline.csv").write_text(BENCH_CSV, encoding="utf-8")
    return run


@dataclass
class Report:
    run: Path
    index: Path
    html: str


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    run = make_run(tmp_path_factory.mktemp("gpu"))
    index = build_report(run)
    return Report(run, index, index.read_text(encoding="utf-8"))


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', page)


def _colours(png: bytes) -> int:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None
    return len(colours)


def _assert_self_contained(page: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', page, re.I), "external reference"
    assert "url(" not in page and "<link" not in page.lower() and "@import" not in page
    assert "<script" not in page.lower(), "a script tag: the page needs none, so this one came from a file"
    srcs = _img_srcs(page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)


def _plot_count(page: str) -> int:
    match = re.search(r'<meta name="fastbyol-plot-count" content="(\d+)">', page)
    assert match
    return int(match.group(1))


def test_gpu_run_report_is_self_contained_and_draws_every_plot(gpu_report: Report) -> None:
    page, out = gpu_report.html, gpu_report.index.parent
    assert gpu_report.index == gpu_report.run / "report" / "index.html"
    _assert_self_contained(page)
    assert "<title>fastbyol report: byol-r50</title>" in page

    pngs = {p.stem for p in out.glob("*.png")}
    assert pngs == TRAINING_PNGS | GPU_PNGS
    srcs = _img_srcs(page)
    assert len(srcs) == len(pngs) == _plot_count(page)
    assert len(re.findall(r'<img class="plot" [^>]*alt="[^"]+"', page)) == len(srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    for name in pngs:
        png = (out / f"{name}.png").read_bytes()
        assert png in embedded, f"{name}.png differs from the embedded copy"
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and 800 <= image.width <= 1200 and 250 <= image.height <= 600
        assert _colours(png) > 1, f"{name}.png is blank"

    for heading in ("Summary (last log step)", "Training", "GPUs", "Benchmarks", "Config"):
        assert f"<h2>{heading}</h2>" in page, heading
    for title in ("Loss", "Throughput", "Data-wait share", "Time per step by phase", "GPU utilisation",
                  "GPU power draw", "GPU temperature"):
        assert f'title="{title}"' in page, title
    assert "No GPU telemetry" not in page
    # Summary: the last row's values, 4 significant digits; the probe from the last row that had one (step 1950).
    assert re.search(r"<td>MFU</td><td class=\"num\">4\d\.\d\d</td>", page)
    assert re.search(r"<td>probe top-1</td><td class=\"num\">105</td><td>%</td><td class=\"num\">1950</td>", page)
    # Clock events: per log interval, counted once even when both GPUs report it.
    assert re.search(r"<code>sw_power_cap</code></td><td class=\"num\">10</td><td>0, 1</td>", page)
    assert re.search(r"<code>gpu_idle</code></td><td class=\"num\">1</td>", page)


def test_bench_table_hoists_environment_and_escapes(gpu_report: Report) -> None:
    page = gpu_report.html
    env = re.search(r'<p class="meta env">(.*?)</p>', page)
    assert env, "environment line above the bench table"
    for key, value in (("commit", "3921dfa"), ("device", "NVIDIA H100 80GB HBM3"), ("torch", "2.14.1+cu130"),
                       ("driver", "580.65"), ("date", "2026-11-23T11:49:04+00:00")):
        assert f"{key} <b>{value}</b>" in env.group(1)
    table = re.search(r'<table class="bench">(.*?)</table>', page, re.S)
    assert table
    header = re.findall(r"<th>(.*?)</th>", table.group(1))
    assert header == ["variant", "batch", "img_per_s", "ratio_vs_torch", "note"]
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1))[1:]
    assert [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in rows] == [
        ["torch", "256", "2711", "1", "baseline"],
        ["dali", "256", "5104", "1.882", "&lt;script&gt;alert(1)&lt;/script&gt;"],
        ["dali_roi", "256", "12350", "4.553", ""],
    ]
    # The config's <script> value arrives as text inside the collapsed block.
    config = re.search(r"<details><summary>[^<]*</summary><pre>(.*?)</pre></details>", page, re.S)
    assert config and "name: &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in config.group(1)
    assert "arch: resnet50" in config.group(1)


def test_bench_csv_given_outside_the_run_and_cells_formatted(tmp_path: Path) -> None:
    run = make_run(tmp_path, rows=6)
    extra = tmp_path / "zero.csv"
    extra.write_text("zero_stage,params_mib,peak_gpu_mib,date,commit\n0,94.408447265625,0.0,2026-11-23,a35fa8c\n"
                     "3,47.2042236328125,1.5e-05,2026-11-24,a35fa8c\n", encoding="utf-8")
    page = build_report(run, bench_csvs=[extra, extra], out_dir=tmp_path / "out").read_text(encoding="utf-8")
    assert page.count("<h3>zero.csv</h3>") == 1  # named twice, shown once
    assert "commit <b>a35fa8c</b>" in page and "<th>date</th>" in page  # dates differ: kept as a column
    assert '<td class="num">94.41</td>' in page and '<td class="num">1.5e-05</td>' in page
    assert [fmt_cell(c) for c in ("7", "0.000123456", "3.0", "nan", "3921dfa", "12345678", "", "1e400")] == \
           ["7", "0.0001235", "3", "nan", "3921dfa", "12345678", "", "inf"]


def test_run_without_gpu_telemetry_says_why_and_still_plots(tmp_path: Path) -> None:
    run = make_run(tmp_path, gpus=False)
    index = build_report(run)
    page = index.read_text(encoding="utf-8")
    _assert_self_contained(page)
    assert ("No GPU telemetry in this run: no NVIDIA driver (libnvidia-ml.so.1 not found): telemetry off"
            in page)
    assert {p.stem for p in index.parent.glob("*.png")} == TRAINING_PNGS
    assert _plot_count(page) == len(TRAINING_PNGS) == len(_img_srcs(page))
    assert "Clock-event" not in page


def test_gpu_timeline_from_metrics_when_no_samples_file(tmp_path: Path) -> None:
    run = make_run(tmp_path, samples=False, rows=8)
    out = build_report(run).parent
    page = (out / "index.html").read_text(encoding="utf-8")
    assert {p.stem for p in out.glob("*.png")} == TRAINING_PNGS | GPU_PNGS
    assert 'alt="Plot of gpu utilisation in %, one line per GPU, against step"' in page  # x: steps, not seconds


def test_killed_run_half_written_last_line_is_skipped(tmp_path: Path) -> None:
    run = make_run(tmp_path, rows=10)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(_metrics_row(10, True))[:57])  # killed mid-write: no closing brace, no newline
    with open(run / "gpu_samples.jsonl", "a", encoding="utf-8") as f:
        f.write('{"t": 1763900099.5, "gpu": 1, "sm_')
    page = build_report(run).read_text(encoding="utf-8")
    assert "steps logged <b>10</b>" in page and "last step <b>500</b>" in page
    assert "skipped 1 line(s) of metrics.jsonl" in page
    assert "skipped 1 line(s) of gpu_samples.jsonl" in page


def test_rerun_removes_plots_it_no_longer_makes(tmp_path: Path) -> None:
    run = make_run(tmp_path, rows=6)
    out = build_report(run).parent
    assert (out / "gpu_util.png").exists()
    (run / "gpu_samples.jsonl").unlink()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gpus"}) + "\n"
                                               for r in lines))
    build_report(run)
    assert {p.stem for p in out.glob("*.png")} == TRAINING_PNGS


def test_sparse_rows_plot_what_is_there(tmp_path: Path) -> None:
    run = tmp_path / "minimal"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.9}\n{"step": 20, "loss": 3.1, "lr": null}\n'
                                       '{"step": 30, "loss": NaN, "gpus": [{"gpu": 0, "clock_events": null}]}\n')
    index = build_report(run)
    page = index.read_text(encoding="utf-8")
    assert {p.stem for p in index.parent.glob("*.png")} == {"loss"}
    assert "No config.yaml" in page and "No GPU telemetry in this run" in page
    assert '<td>loss</td><td class="num">nan</td>' in page  # a NaN last loss is shown, not papered over


@pytest.mark.parametrize("case", ["missing_dir", "no_metrics", "empty_metrics", "garbled_csv", "binary_csv",
                                  "missing_csv"])
def test_user_errors_are_one_actionable_line(tmp_path: Path, case: str) -> None:
    run = make_run(tmp_path, rows=3)
    bench: list[Path] = []
    expected = {
        "missing_dir": "run directory .* does not exist: pass the directory train wrote",
        "no_metrics": r"no metrics.jsonl in .*: is it a fastbyol run directory\? \(train writes one at the first",
        "empty_metrics": "has no complete row yet: run the report after the first log step",
        "garbled_csv": r"bench CSV .*bad.csv is garbled: row 3 has 2 fields, the header 3: pass a CSV written by",
        "binary_csv": "bench CSV .*bad.csv is (not UTF-8 text|garbled)",
        "missing_csv": "bench CSV .*nope.csv does not exist: check the --bench path",
    }[case]
    if case == "missing_dir":
        run = tmp_path / "no-such-run"
    elif case == "no_metrics":
        (run / "metrics.jsonl").unlink()
    elif case == "empty_metrics":
        (run / "metrics.jsonl").write_text('{"step": 50, "lo')
    elif case == "garbled_csv":
        bench = [tmp_path / "bad.csv"]
        bench[0].write_text("a,b,c\n1,2,3\n4,5\n")
    elif case == "binary_csv":
        bench = [tmp_path / "bad.csv"]
        bench[0].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    else:
        bench = [tmp_path / "nope.csv"]
    with pytest.raises(FastByolError, match=expected) as info:
        build_report(run, bench_csvs=bench)
    assert "\n" not in str(info.value)
    assert not (run / "report" / "index.html").exists()


def test_report_module_does_not_import_torch() -> None:
    # The report runs on a laptop without the training stack; conftest has torch in this process already.
    code = "import sys, fastbyol.telemetry.report; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _render_in_chromium(index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], Path]:
    """Open the page in headless Debian chromium; wait until every plot image has loaded; screenshot the whole
    page. Returns (the page's state, the screenshot)."""
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(tmp_path, monkeypatch) as driver:
        driver.get(index.as_uri())
        state_js = """
            const imgs = Array.from(document.querySelectorAll('img.plot'));
            return {ready: document.readyState, n: imgs.length,
                    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
                    claimed: Number(document.querySelector('meta[name="fastbyol-plot-count"]').content),
                    shown: Number(document.getElementById('plot-count').textContent),
                    height: document.documentElement.scrollHeight};"""
        WebDriverWait(driver, 30).until(
            lambda d: (s := d.execute_script(state_js))["ready"] == "complete" and s["loaded"] == s["n"])
        state = driver.execute_script(state_js)
        driver.set_window_size(1280, min(int(state["height"]) + 200, 12000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    if os.environ.get("FASTBYOL_KEEP_SCREENSHOT"):  # for looking at the page by eye
        Path(os.environ["FASTBYOL_KEEP_SCREENSHOT"]).write_bytes(shot.read_bytes())
    return state, shot


def test_page_renders_in_headless_chromium(gpu_report: Report, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    state, shot = _render_in_chromium(gpu_report.index, tmp_path, monkeypatch)
    assert state["n"] == state["loaded"] == state["claimed"] == state["shown"] == len(TRAINING_PNGS | GPU_PNGS)
    with Image.open(shot) as image:
        assert image.width >= 1000 and image.height >= 4000
    assert _colours(shot.read_bytes()) > 200, "the screenshot is (nearly) blank"


def test_report_of_a_real_smoke_run_renders_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: a real (tiny) training run with replayed GPU samples, ``fastbyol report`` on its run
    directory, and the page in the browser with every training and GPU plot loaded."""
    from fastbyol.cli import main

    replay = tmp_path / "h100.jsonl"
    replay.write_text("".join(json.dumps(_gpu_sample(k, gpu)) + "\n" for k in range(24) for gpu in (0, 1)))
    monkeypatch.setenv("FASTBYOL_GPU_REPLAY", str(replay))
    assert main(["train", "--preset", "smoke", f"run.out_dir={tmp_path}", "run.name=smoke", "run.max_steps=6",
                 "run.log_every=2", "run.telemetry_hz=20", "data.num_images=64", "optim.batch_size=8",
                 "model.proj_hidden=64", "model.proj_dim=32", "model.small_stem=true", "data.image_size=16",
                 "data.workers=0", "run.progress=off", "optim.warmup_epochs=0.25", "run.epochs=2"]) == 0
    assert main(["report", str(tmp_path / "smoke")]) == 0
    index = tmp_path / "smoke" / "report" / "index.html"
    made = {p.name for p in index.parent.glob("*.png")}
    assert {"loss.png", "schedules.png", "throughput.png", "phases.png", "gpu_util.png", "gpu_power.png"} <= made
    state, shot = _render_in_chromium(index, tmp_path, monkeypatch)
    assert state["n"] == state["loaded"] == state["claimed"] == len(made)
    assert _colours(shot.read_bytes()) > 200, "the screenshot is (nearly) blank"
