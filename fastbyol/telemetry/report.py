"""One training run as a self-contained HTML page: ``fastbyol report RUN_DIR [--bench CSV ...] [--out DIR]``.

Reads what ``train`` and ``bench`` wrote (metrics.jsonl, gpu_samples.jsonl, telemetry.json, config.yaml, bench
CSVs) and draws each plot with matplotlib's Agg backend into a PNG beside the page. The page embeds the same
bytes as data: URIs and has no external CSS, JS or fonts, so the one index.html can be attached to a ticket or
opened on a machine without network and still show everything. Every field but the rows themselves is optional:
a missing key skips its plot, never the report. Every string read from a file is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastbyol.errors import FastByolError
from fastbyol.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_DPI = 100
_WIDTH_IN = 10.0  # 1000 px at _DPI: the page's content width, so a plot is shown at its own size
_MAX_POINTS = 4000  # per line: a ~1000 px wide axis cannot show more, and days of 4 Hz samples would be slow

# Environment columns of benchmarks/harness.py's rows: equal in every row of one bench run, shown once.
ENV_COLUMNS = ("date", "commit", "device", "driver", "torch", "cuda", "triton", "python")

# phase_ms keys in the order a step runs them (trainer: fetch -> forward/backward -> optimizer -> EMA).
_PHASES = ("data_wait", "forward", "backward", "optimizer", "ema")

# GPU timelines: (file stem, title, unit, panels as (key, label)). Keys are the per-interval `gpus` fields;
# gpu_samples.jsonl has the same ones but memory in MiB (mem_used_mib), converted on reading.
_GPU_FIGURES: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("gpu_util", "GPU utilisation", "%", (("sm_util_pct", "SM busy"), ("mem_util_pct", "memory controller busy"))),
    ("gpu_memory", "GPU memory used", "GiB", (("mem_used_gib", "memory used"),)),
    ("gpu_power", "GPU power draw", "W", (("power_w", "power"),)),
    ("gpu_clocks", "GPU clocks", "MHz", (("sm_clock_mhz", "SM clock"), ("mem_clock_mhz", "memory clock"))),
    ("gpu_temp", "GPU temperature", "°C", (("temp_c", "temperature"),)),
    ("gpu_pcie", "GPU PCIe traffic", "MB/s", (("pcie_tx_mbs", "PCIe TX"), ("pcie_rx_mbs", "PCIe RX"))),
)
_TRAINING_PLOTS = ("loss", "probe_top1", "proj_std", "schedules", "throughput", "data_wait", "phases")
# Every PNG name a report may write: a re-run removes those it no longer makes, so out_dir matches the page.
PLOT_NAMES = _TRAINING_PLOTS + tuple(f[0] for f in _GPU_FIGURES) + ("curve",)


@dataclass
class Plot:
    name: str  # written as out_dir/<name>.png
    title: str  # heading on the page; also the start of the alt text
    alt: str
    png: bytes
    width: int
    height: int


@dataclass
class BenchTable:
    path: Path
    env: dict[str, str]  # environment columns equal in every row, shown once above the table
    columns: list[str]
    rows: list[list[str]]


# -- reading ------------------------------------------------------------------------------------------------

def _num(value: object) -> float | None:
    """A JSON number as float (NaN and inf kept: a NaN loss is news); None for null, bools, strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The lines that are complete JSON objects, and how many were not: a run killed mid-write leaves its last
    line half-written (JsonlMetrics flushes whole lines, so only the last one can be cut)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FastByolError(f"cannot read {path}: {e.strerror or e}: check that it is a readable file") from None
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _read_telemetry(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, json.JSONDecodeError) as e:
        # Optional and written by train, not the user: report it on the page rather than refuse the report.
        notes.append(f"telemetry.json could not be read ({e}); device names and the telemetry reason are missing")
        return {}
    return data if isinstance(data, dict) else {}


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def fmt_number(value: float) -> str:
    """4 significant digits, without exponents between 1e-4 and 1e15 (12345.6 -> '12350', not '1.235e+04')."""
    if not math.isfinite(value):
        return str(value)
    if 1e4 <= abs(value) < 1e15:
        return f"{float(f'{value:.4g}'):.0f}"
    return f"{value:.4g}"


def fmt_cell(text: str) -> str:
    """A CSV cell for display: floats to 4 significant digits; integers (batch sizes, counts) exact; text as is."""
    s = text.strip()
    if _INTEGER.fullmatch(s) or not _NUMBER.fullmatch(s):
        return text
    return fmt_number(float(s))


def read_bench_csv(path: Path) -> BenchTable:
    """A CSV from ``fastbyol bench``: header row, then rows of the same width. FastByolError if it is not one."""
    what = "pass a CSV written by `fastbyol bench` (header row, then rows of the same width)"
    try:
        with open(path, encoding="utf-8", newline="") as f:
            records = [r for r in csv.reader(f, strict=True) if r]
    except FileNotFoundError:
        raise FastByolError(f"bench CSV {path} does not exist: check the --bench path") from None
    except UnicodeDecodeError:
        raise FastByolError(f"bench CSV {path} is not UTF-8 text: {what}") from None
    except csv.Error as e:
        raise FastByolError(f"bench CSV {path} is garbled ({e}): {what}") from None
    except OSError as e:
        raise FastByolError(f"cannot read bench CSV {path}: {e.strerror or e}: check that it is a readable file") \
            from None
    if not records:
        raise FastByolError(f"bench CSV {path} is empty: {what}")
    header, rows = records[0], records[1:]
    for i, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise FastByolError(f"bench CSV {path} is garbled: row {i} has {len(row)} fields, the header "
                                f"{len(header)}: {what}")
    hoisted = [j for j, col in enumerate(header) if col in ENV_COLUMNS and rows and len({r[j] for r in rows}) == 1]
    kept = [j for j in range(len(header)) if j not in hoisted]
    return BenchTable(path=path, env={header[j]: rows[0][j] for j in hoisted}, columns=[header[j] for j in kept],
                      rows=[[fmt_cell(r[j]) for j in kept] for r in rows])


# -- series -------------------------------------------------------------------------------------------------

Series = tuple[np.ndarray, np.ndarray]


def _series(rows: Iterable[dict[str, Any]], key: str, scale: float = 1.0) -> Series | None:
    """(steps, values) of the rows that have a number for ``key``; None when none has a finite one."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        step, value = _num(row.get("step")), _num(row.get(key))
        if step is not None and value is not None:
            xs.append(step)
            ys.append(value * scale)
    if not any(math.isfinite(y) for y in ys):
        return None
    return np.asarray(xs), np.asarray(ys)


def _decimate(x: np.ndarray, y: np.ndarray, max_points: int = _MAX_POINTS) -> Series:
    """Sorted by x; above max_points, means of consecutive buckets (a line cannot show more than its pixels)."""
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x) <= max_points:
        return x, y
    size = math.ceil(len(x) / max_points)
    starts = np.arange(0, len(x), size)
    counts = np.diff(np.append(starts, len(x)))
    return np.add.reduceat(x, starts) / counts, np.add.reduceat(y, starts) / counts


# GPU timeline: gpu index -> metric key -> (x, y), x in seconds since the first sample or in steps.
Timeline = dict[int, dict[str, Series]]


def _gpu_keys() -> list[str]:
    return [key for fig in _GPU_FIGURES for key, _ in fig[3]]


def timeline_from_samples(samples: list[dict[str, Any]]) -> Timeline:
    times = [t for t in (_num(s.get("t")) for s in samples) if t is not None and math.isfinite(t)]
    if not times:
        return {}
    t0 = min(times)
    points: dict[int, dict[str, tuple[list[float], list[float]]]] = {}
    for s in samples:
        t, gpu = _num(s.get("t")), _num(s.get("gpu"))
        if t is None or gpu is None or not math.isfinite(t):
            continue
        per_gpu = points.setdefault(int(gpu), {})
        for key in _gpu_keys():
            value = _num(s.get("mem_used_mib")) if key == "mem_used_gib" else _num(s.get(key))
            if value is None or not math.isfinite(value):
                continue
            xs, ys = per_gpu.setdefault(key, ([], []))
            xs.append(t - t0)
            ys.append(value / 1024 if key == "mem_used_gib" else value)
    return _arrays(points)


def timeline_from_metrics(rows: list[dict[str, Any]]) -> Timeline:
    """The per-interval ``gpus`` aggregates of metrics.jsonl, vs step (when no gpu_samples.jsonl was kept)."""
    points: dict[int, dict[str, tuple[list[float], list[float]]]] = {}
    for row in rows:
        step, gpus = _num(row.get("step")), row.get("gpus")
        if step is None or not isinstance(gpus, list):
            continue
        for i, g in enumerate(gpus):
            if not isinstance(g, dict):
                continue
            gpu = _num(g.get("gpu"))
            per_gpu = points.setdefault(i if gpu is None else int(gpu), {})
            for key in _gpu_keys():
                value = _num(g.get(key))
                if value is not None and math.isfinite(value):
                    xs, ys = per_gpu.setdefault(key, ([], []))
                    xs.append(step)
                    ys.append(value)
    return _arrays(points)


def _arrays(points: dict[int, dict[str, tuple[list[float], list[float]]]]) -> Timeline:
    return {gpu: {key: _decimate(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
                  for key, (xs, ys) in sorted(per_gpu.items())}
            for gpu, per_gpu in sorted(points.items()) if per_gpu}


def clock_event_counts(rows: list[dict[str, Any]]) -> dict[str, tuple[int, list[int]]] | None:
    """reason -> (log intervals in which any GPU reported it, the GPUs that did); None when no row reports any
    clock_events field (no GPU telemetry), {} when they were reported but always empty."""
    counts: dict[str, int] = {}
    gpus_seen: dict[str, set[int]] = {}
    reported = False
    for row in rows:
        gpus = row.get("gpus")
        if not isinstance(gpus, list):
            continue
        in_interval: set[str] = set()
        for i, g in enumerate(gpus):
            events = g.get("clock_events") if isinstance(g, dict) else None
            if not isinstance(events, list):
                continue
            reported = True
            gpu = _num(g.get("gpu"))
            for reason in events:
                in_interval.add(str(reason))
                gpus_seen.setdefault(str(reason), set()).add(i if gpu is None else int(gpu))
        for reason in in_interval:
            counts[reason] = counts.get(reason, 0) + 1
    if not reported:
        return None
    return {r: (n, sorted(gpus_seen[r])) for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


# -- plots --------------------------------------------------------------------------------------------------

def _figure(panels: int, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    # Imported here, not at the top: `fastbyol --help` and the other subcommands should not pay for matplotlib.
    # Figure + FigureCanvasAgg instead of pyplot: no global figure registry, no GUI backend lookup.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _plot(name: str, title: str, alt: str, fig: Figure) -> Plot:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})  # no version: same input, same bytes
    width, height = (int(round(v)) for v in fig.get_size_inches() * _DPI)
    return Plot(name=name, title=title, alt=alt, png=buffer.getvalue(), width=width, height=height)


def training_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """The run's plots from its metrics rows: loss and probe, spread and schedules, throughput, phases."""
    return [*_loss_plots(rows), *_spread_schedule_plots(rows), *_throughput_plots(rows), *_phase_plots(rows)]


def _loss_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """The loss (and the online probe's loss and top-1)."""
    plots: list[Plot] = []
    loss, probe_loss = _series(rows, "loss"), _series(rows, "probe_loss")
    if loss or probe_loss:
        fig, (ax,) = _figure(1)
        if loss:
            ax.plot(*loss, label="BYOL loss (2 - 2 cos)")
        if probe_loss:
            ax.plot(*probe_loss, marker="o", markersize=3, label="online linear probe (cross-entropy)")
        ax.set(title="Loss", xlabel="step", ylabel="loss (dimensionless)")
        ax.legend()
        plots.append(_plot("loss", "Loss", "Plot of the BYOL loss"
                           + (" and the probe loss" if probe_loss else "") + " against the training step", fig))

    top1 = _series(rows, "probe_top1")
    if top1:
        fig, (ax,) = _figure(1)
        ax.plot(*top1, marker="o", markersize=3)
        ax.set(title="Online linear probe: top-1 accuracy on the training batch", xlabel="step", ylabel="top-1 (%)")
        plots.append(_plot("probe_top1", "Probe top-1 accuracy",
                           "Plot of the online probe's top-1 accuracy in percent against the step", fig))
    return plots


def _spread_schedule_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """The projections' spread against a uniform one, and the lr and tau schedules."""
    plots: list[Plot] = []
    std, uniform = _series(rows, "proj_std"), _series(rows, "proj_std_uniform")
    if std:
        fig, (ax,) = _figure(1)
        ax.plot(*std, label="std of the normalised projections")
        if uniform:
            # 1/sqrt(d) is the std of a uniform spread on the unit sphere; collapse drives proj_std towards 0.
            ax.plot(*uniform, linestyle="--", color="grey", label="uniform on the sphere (1/√d)")
        ax.set(title="Projection spread (collapse check)", xlabel="step", ylabel="std per dimension")
        ax.set_ylim(bottom=0)
        ax.legend()
        plots.append(_plot("proj_std", "Projection spread",
                           "Plot of the projection standard deviation against the step, with the uniform level", fig))

    lr, tau = _series(rows, "lr"), _series(rows, "tau")
    schedules = [(s, label) for s, label in ((lr, "learning rate"), (tau, "target EMA τ")) if s]
    if schedules:
        fig, axes = _figure(len(schedules))
        for ax, (s, label) in zip(axes, schedules):
            ax.plot(*s)
            ax.set(title=label, xlabel="step", ylabel=label)
        fig.suptitle("Schedules")
        plots.append(_plot("schedules", "Schedules",
                           "Plots of " + " and ".join(label for _, label in schedules) + " against the step", fig))
    return plots


def _throughput_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """Images per second (and MFU), and the share of time spent waiting for data."""
    plots: list[Plot] = []
    img_s, per_gpu, mfu = _series(rows, "img_per_s"), _series(rows, "img_per_s_per_gpu"), _series(rows, "mfu_pct")
    if img_s or per_gpu or mfu:
        fig, axes = _figure(2 if (img_s or per_gpu) and mfu else 1)
        if img_s or per_gpu:
            ax = axes[0]
            if img_s:
                ax.plot(*img_s, label="all GPUs")
            if per_gpu and not (img_s and np.allclose(img_s[1], per_gpu[1], equal_nan=True)):  # one GPU: same line
                ax.plot(*per_gpu, linestyle="--", label="per GPU")
            ax.set(title="Throughput", xlabel="step", ylabel="images/s")
            ax.set_ylim(bottom=0)
            ax.legend()
        if mfu:
            ax = axes[-1]
            ax.plot(*mfu, color="C2")
            ax.set(title="Model FLOP utilisation", xlabel="step", ylabel="MFU (% of peak)")
            ax.set_ylim(bottom=0)
        plots.append(_plot("throughput", "Throughput", "Plot of training throughput in images per second"
                           + (" and MFU in percent" if mfu else "") + " against the step", fig))

    wait = _series(rows, "data_wait_frac", scale=100.0)
    if wait:
        fig, (ax,) = _figure(1)
        ax.plot(*wait, color="C3")
        ax.set(title="Data-wait share (input pipeline stalls)", xlabel="step", ylabel="share of wall time (%)")
        ax.set_ylim(bottom=0)
        plots.append(_plot("data_wait", "Data-wait share",
                           "Plot of the share of wall time spent waiting for data, in percent, against the step", fig))
    return plots


def _phase_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """Milliseconds per step by phase, stacked."""
    plots: list[Plot] = []
    phase_rows = [r for r in rows if isinstance(r.get("phase_ms"), dict) and _num(r.get("step")) is not None]
    phase_names = [p for p in _PHASES if any(_num(r["phase_ms"].get(p)) is not None for r in phase_rows)]
    phase_names += sorted({str(k) for r in phase_rows for k in r["phase_ms"]} - set(_PHASES))
    if phase_names:
        x = np.asarray([_num(r["step"]) for r in phase_rows], dtype=float)

        def ms(row: dict[str, Any], phase: str) -> float:
            value = _num(row["phase_ms"].get(phase))
            return value if value is not None and math.isfinite(value) else 0.0  # absent (e.g. ema fused): none

        fig, (ax,) = _figure(1)
        ax.stackplot(x, [[ms(r, p) for r in phase_rows] for p in phase_names],
                     labels=[p.replace("_", " ") for p in phase_names], alpha=0.85)
        ax.set(title="Time per step by phase (mean over each log interval)", xlabel="step", ylabel="ms per step")
        ax.legend(loc="upper left", ncols=len(phase_names), fontsize="small")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # head room for the legend
        plots.append(_plot("phases", "Time per step by phase",
                           "Stacked plot of milliseconds per step spent in " + ", ".join(phase_names), fig))
    return plots

def curve_plot(series: dict[str, list[tuple[float, float, float]]], baselines: dict[str, tuple[float, float]],
               k: int, subtitle: str) -> Plot:
    """Learning curves (``fastbyol eval curve``): kNN-``k`` and linear-probe top-1 against the epoch, one line per
    run (``series``: label -> [(epoch, knn, linear)]), each baseline (label -> (knn, linear)) a horizontal line."""
    fig, axes = _figure(2, height=4.2)
    epochs = [e for points in series.values() for e, _, _ in points]
    log_x = bool(epochs) and min(epochs) > 0 and max(epochs) / min(epochs) >= 20  # 1, 3, 10, 30, 100: even spacing
    for panel, (ax, title) in enumerate(zip(axes, (f"kNN-{k} top-1", "linear probe top-1"))):
        for i, (label, points) in enumerate(series.items()):
            ax.plot([p[0] for p in points], [p[1 + panel] for p in points], marker="o", markersize=4,
                    color=f"C{i}", label=label)
        for j, (label, values) in enumerate(baselines.items()):
            ax.axhline(values[panel], linestyle=("--", ":", "-.")[j % 3], color="grey", label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set(title=title, xlabel="epoch" + (" (log scale)" if log_x else ""), ylabel="top-1 (%)")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize="small", loc="upper left")
    fig.suptitle(f"Learning curves: {subtitle}")
    return _plot("curve", "Learning curve", f"Plots of kNN-{k} and linear-probe top-1 accuracy in percent against the "
                 "epoch for " + ", ".join(series) + ", with the baselines as horizontal lines", fig)


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def curve_section(run_dir: Path) -> tuple[Plot | None, str]:
    """The learning curve ``fastbyol eval curve`` wrote to RUN/curve/ (its PNG and markdown table), or (None, '')."""
    png_path, table_path = run_dir / "curve" / "curve.png", run_dir / "curve" / "curve.md"
    if not png_path.is_file():
        return None, ""
    png = png_path.read_bytes()
    try:
        width, height = _png_size(png)
    except ValueError:
        return None, f'<p class="note">{_e(str(png_path))} is not a PNG: run fastbyol eval curve again</p>'
    plot = Plot("curve", "Learning curve", "Plot of the run's kNN and linear-probe accuracy against the epoch, with "
                "the baselines (fastbyol eval curve)", png, width, height)
    table = table_path.read_text(encoding="utf-8", errors="replace") if table_path.is_file() else ""
    return plot, (f"<details open><summary>curve.md</summary><pre>{_e(table)}</pre></details>" if table else "")


def _eval_summary(result: dict[str, Any]) -> str:
    """'kNN-20 41.2 / 80.0; kNN-200 ...' (top-1 / top-5 %) of one eval result file."""
    parts = []
    for key in sorted(k for k in result if re.fullmatch(r"knn\d+", k)):
        r = result[key]
        parts.append(f"kNN-{key[3:]} {_value_text(r.get('top1'))} / {_value_text(r.get('top5'))}")
    for key, name in (("finetune", "fine-tune"), ("linear", "linear")):
        r = result.get(key)
        if isinstance(r, dict) and "top1" in r:
            parts.append(f"{name} {_value_text(r.get('top1'))} / {_value_text(r.get('top5'))}")
    return "; ".join(parts)


def eval_section(run_dir: Path) -> str:
    """A table of the results ``fastbyol eval knn|linear|finetune`` kept in RUN/eval/ (oldest first), or ''."""
    rows = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict):
            continue
        rows.append((str(result.get("date", "")), result, path.name))
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("protocol", "step", "epoch", "data", "top-1 / top-5 (%)", "date", "file"))
    body = []
    for date, r, name in sorted(rows, key=lambda row: row[0]):
        protocol = str(r.get("protocol", ""))
        if protocol == "finetune" and r.get("fraction") is not None:
            protocol += f" ({r['fraction']:g} of the labels)"
        cells = [protocol, _value_text(r.get("step")), _value_text(r.get("epoch")), str(r.get("data", "")),
                 _eval_summary(r), date, name]
        body.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f'<table id="eval-results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def gpu_plots(timeline: Timeline, from_samples: bool, power_limits: dict[int, float]) -> list[Plot]:
    xlabel = "seconds since the first sample" if from_samples else "step"
    source = "gpu_samples.jsonl" if from_samples else "per log interval, metrics.jsonl"
    gpus = sorted(timeline)
    plots: list[Plot] = []
    for name, title, unit, panels in _GPU_FIGURES:
        present = [(key, label) for key, label in panels if any(key in timeline[g] for g in gpus)]
        if not present:
            continue
        fig, axes = _figure(len(present))
        for ax, (key, label) in zip(axes, present):
            for i, gpu in enumerate(gpus):
                if key in timeline[gpu]:
                    ax.plot(*timeline[gpu][key], color=f"C{i % 10}", linewidth=1.0, label=f"GPU {gpu}")
                if key == "power_w" and gpu in power_limits:
                    ax.axhline(power_limits[gpu], color=f"C{i % 10}", linestyle=":", linewidth=1.0,
                               label=f"GPU {gpu} limit")
            # One panel: the figure's title goes on it (a suptitle above a panel title repeats itself).
            ax.set(title=label if len(present) > 1 else f"{title} ({source})", xlabel=xlabel,
                   ylabel=f"{label} ({unit})")
            if unit in ("%", "W", "GiB", "MB/s"):
                ax.set_ylim(bottom=0)
            ax.legend(fontsize="small", ncols=max(1, len(gpus) // 4))
        if len(present) > 1:
            fig.suptitle(f"{title} ({source})")
        plots.append(_plot(name, title, f"Plot of {title.lower()} in {unit}, one line per GPU, against {xlabel}",
                           fig))
    return plots


# -- page ---------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d1d1f;
       margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 1040px; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
h3 { font-size: 1.05rem; margin-bottom: 0.3rem; }
.meta { color: #555; margin-top: 0; }
.meta b { color: #1d1d1f; font-weight: 600; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.5rem 0.8rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.wide { overflow-x: auto; }
figure { margin: 1rem 0; }
img.plot { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
details pre { background: #f7f7f9; padding: 0.6rem; overflow-x: auto; font-size: 0.85rem; }
code { font-size: 0.9em; }
"""

_e = html.escape


def _cell(text: str, numeric: bool | None = None) -> str:
    if numeric is None:
        numeric = bool(_NUMBER.fullmatch(text.strip())) or text.strip() in ("nan", "inf", "-inf")
    return f'<td class="num">{_e(text)}</td>' if numeric else f"<td>{_e(text)}</td>"


def _value_text(value: object, scale: float = 1.0) -> str:
    number = _num(value)
    if number is not None:
        return fmt_number(number * scale)
    return "—" if value is None else str(value)


_SUMMARY = (  # (key, label, unit, scale): the row's fields a reader looks at first
    ("loss", "loss", "", 1.0),
    ("img_per_s", "throughput", "img/s", 1.0),
    ("img_per_s_per_gpu", "throughput per GPU", "img/s", 1.0),
    ("mfu_pct", "MFU", "% of peak", 1.0),
    ("tflop_per_s", "achieved compute", "TFLOP/s", 1.0),
    ("peak_mem_gib", "peak memory", "GiB", 1.0),
    ("peak_rss_gib", "peak host memory (RSS, CPU runs)", "GiB", 1.0),
    ("data_wait_frac", "data-wait share", "% of wall time", 100.0),
    ("probe_top1", "probe top-1", "%", 1.0),
    ("skipped_images", "skipped images", "", 1.0),
)
_SUMMARY_ALWAYS = {"loss", "img_per_s", "img_per_s_per_gpu", "mfu_pct", "peak_mem_gib", "data_wait_frac"}


def _summary_table(rows: list[dict[str, Any]]) -> str:
    """The last row's values; a field the last row lacks (probe metrics are logged every few steps) comes from
    the latest row that has it, with that row's step."""
    last_step = rows[-1].get("step")
    lines = ["<table><tr><th>metric</th><th>value</th><th>unit</th><th>at step</th></tr>"]
    for key, label, unit, scale in _SUMMARY:
        row = next((r for r in reversed(rows) if r.get(key) is not None), None)
        if row is None and key not in _SUMMARY_ALWAYS:
            continue
        value = "—" if row is None else _value_text(row[key], scale)
        step = "" if row is None or row.get("step") == last_step else _value_text(row.get("step"))
        lines.append(f"<tr><td>{_e(label)}</td>{_cell(value, True)}<td>{_e(unit)}</td>{_cell(step, True)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _figure_html(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    # No caption: the PNG carries its title (it is also a file of its own), and a caption would repeat it.
    return (f'<figure id="plot-{_e(plot.name)}"><img class="plot" src="data:image/png;base64,{data}" '
            f'alt="{_e(plot.alt)}" title="{_e(plot.title)}" width="{plot.width}" height="{plot.height}"></figure>')


def _devices_table(devices: list[Any]) -> str:
    lines = ["<table><tr><th>GPU</th><th>name</th><th>memory (GiB)</th><th>power limit (W)</th></tr>"]
    for d in devices:
        if not isinstance(d, dict):
            continue
        mem = _num(d.get("mem_total_mib"))
        lines.append(f"<tr>{_cell(_value_text(d.get('gpu')), True)}<td>{_e(str(d.get('name') or '—'))}</td>"
                     f"{_cell('—' if mem is None else fmt_number(mem / 1024), True)}"
                     f"{_cell(_value_text(d.get('power_limit_w')), True)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _clock_events_html(counts: dict[str, tuple[int, list[int]]] | None, intervals: int) -> str:
    if counts is None:
        return ""
    head = "<h3>Clock-event reasons (why the GPU clocks were held down)</h3>"
    if not counts:
        return head + f"<p>No clock-event reason was reported in any of the {intervals} log intervals.</p>"
    lines = [head, f"<table><tr><th>reason</th><th>log intervals (of {intervals})</th><th>GPUs</th></tr>"]
    for reason, (n, gpus) in counts.items():
        lines.append(f"<tr><td><code>{_e(reason)}</code></td>{_cell(str(n), True)}"
                     f"<td>{_e(', '.join(str(g) for g in gpus))}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _bench_html(table: BenchTable) -> str:
    parts = [f"<h3>{_e(table.path.name)}</h3>"]
    if table.env:
        env = ", ".join(f"{_e(k)} <b>{_e(v) or '—'}</b>" for k, v in table.env.items())
        parts.append(f'<p class="meta env">Environment (same in every row): {env}</p>')
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    parts.append(f'<div class="wide"><table class="bench"><tr>{head}</tr>\n{body}</table></div>')
    if not table.rows:
        parts.append("<p>No rows.</p>")
    return "\n".join(parts)


def build_report(run_dir: Path, bench_csvs: Sequence[Path] = (), out_dir: Path | None = None) -> Path:
    """Write out_dir/index.html (default run_dir/report/) — a self-contained page (PNGs embedded as data: URIs,
    no external CSS/JS/fonts) — and the same plots as out_dir/*.png; return the index.html path."""
    run_dir = Path(run_dir)
    rows, notes = _read_rows(run_dir)
    tables = _bench_tables(run_dir, bench_csvs)  # first: a garbled CSV the user named fails before any plot
    telemetry = _read_telemetry(run_dir / "telemetry.json", notes)
    timeline, from_samples = _gpu_timeline(run_dir, rows, notes)
    devices = telemetry.get("devices") if isinstance(telemetry.get("devices"), list) else []
    power_limits = {int(g): w for g, w in ((_num(d.get("gpu")), _num(d.get("power_limit_w")))
                                           for d in devices or [] if isinstance(d, dict))
                    if g is not None and w is not None and math.isfinite(w)}
    plots = training_plots(rows)
    gpu = gpu_plots(timeline, from_samples, power_limits) if timeline else []
    curve, curve_table = curve_section(run_dir)
    all_plots = plots + gpu + ([curve] if curve is not None else [])
    parts = _head_html(run_dir, rows, telemetry, notes, len(all_plots))
    parts += ["<h2>Summary (last log step)</h2>", _summary_table(rows), "<h2>Training</h2>"]
    parts += [_figure_html(p) for p in plots] or ["<p>No plottable field in metrics.jsonl.</p>"]
    evals = eval_section(run_dir)
    if evals:
        parts += ["<h2>Evaluations</h2>", evals]
    if curve is not None or curve_table:
        parts.append("<h2>Learning curve</h2>")
        parts += ([_figure_html(curve)] if curve is not None else []) + [curve_table]
    parts += _gpu_html(devices or [], gpu, telemetry, rows)
    if tables:
        parts.append("<h2>Benchmarks</h2>")
        parts += [_bench_html(t) for t in tables]
    parts += _config_html(run_dir / "config.yaml")
    return _write_report(Path(out_dir) if out_dir is not None else run_dir / "report", all_plots, parts)


def _read_rows(run_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The run's metrics rows, and the notes on what was skipped; one line for a folder that is not a run."""
    if not run_dir.is_dir():
        raise FastByolError(f"run directory {run_dir} does not exist: pass the directory train wrote "
                            "(<run.out_dir>/<run.name>)")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FastByolError(f"no metrics.jsonl in {run_dir}: is it a fastbyol run directory? "
                            "(train writes one at the first log step)")
    rows, bad = _read_jsonl(metrics_path)
    if not rows:
        raise FastByolError(f"{metrics_path} has no complete row yet: run the report after the first log step")
    notes: list[str] = []
    if bad:
        notes.append(f"skipped {bad} line(s) of metrics.jsonl that are not complete JSON objects "
                     "(a killed run leaves its last line half-written)")
    return rows, notes


def _bench_tables(run_dir: Path, bench_csvs: Sequence[Path]) -> list[BenchTable]:
    """RUN/bench/*.csv and the CSVs named, each once."""
    seen: set[Path] = set()
    tables: list[BenchTable] = []
    for path in sorted((run_dir / "bench").glob("*.csv")) + [Path(p) for p in bench_csvs]:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            tables.append(read_bench_csv(path))
    return tables


def _gpu_timeline(run_dir: Path, rows: list[dict[str, Any]], notes: list[str]) -> tuple[Timeline, bool]:
    """The GPU timeline from gpu_samples.jsonl (and True), or else from the metrics rows' per-GPU fields."""
    samples_path = run_dir / "gpu_samples.jsonl"
    if samples_path.is_file():
        samples, bad_samples = _read_jsonl(samples_path)
        if bad_samples:
            notes.append(f"skipped {bad_samples} line(s) of gpu_samples.jsonl that are not complete JSON objects")
        timeline = timeline_from_samples(samples)
        if timeline:
            return timeline, True
    return timeline_from_metrics(rows), False


def _head_html(run_dir: Path, rows: list[dict[str, Any]], telemetry: dict[str, Any], notes: list[str],
               plot_count: int) -> list[str]:
    """The page's head, title line, run facts and notes."""
    name = run_dir.resolve().name
    last = rows[-1]
    world = telemetry.get("world")
    if world is None and isinstance(last.get("gpus"), list):
        world = len(last["gpus"])
    meta = [("run directory", str(run_dir)), ("device", _value_text(telemetry.get("device"))),
            ("world size", _value_text(world)), ("steps logged", str(len(rows))),
            ("last step", _value_text(last.get("step"))), ("epoch", _value_text(last.get("epoch"))),
            ("plots", str(plot_count))]
    plot_id = ' id="plot-count"'
    meta_html = " · ".join(f'{_e(k)} <b{plot_id if k == "plots" else ""}>{_e(v)}</b>' for k, v in meta)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="fastbyol-plot-count" content="{plot_count}">',
        f"<title>fastbyol report: {_e(name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>fastbyol run <code>{_e(name)}</code></h1>",
        f'<p class="meta">{meta_html}</p>',
    ]
    return parts + [f'<p class="note">{_e(n)}</p>' for n in notes]


def _gpu_html(devices: list[Any], gpu: list[Plot], telemetry: dict[str, Any], rows: list[dict[str, Any]]
              ) -> list[str]:
    parts = ["<h2>GPUs</h2>"]
    if devices:
        parts.append(_devices_table(devices))
    if gpu:
        parts += [_figure_html(p) for p in gpu]
    else:
        reason = telemetry.get("reason")
        why = f": {reason}" if reason else " (no gpu_samples.jsonl and no per-GPU fields in metrics.jsonl)"
        parts.append(f'<p class="note" id="no-gpu">No GPU telemetry in this run{_e(str(why))}</p>')
    parts.append(_clock_events_html(clock_event_counts(rows), len(rows)))
    return parts


def _config_html(config_path: Path) -> list[str]:
    config_text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else None
    parts = ["<h2>Config</h2>"]
    if config_text is None:
        parts.append("<p>No config.yaml in the run directory.</p>")
    else:
        parts.append(f"<details><summary>config.yaml (the run's resolved config)</summary>"
                     f"<pre>{_e(config_text)}</pre></details>")
    return parts + ["</body></html>\n"]


def _write_report(out_dir: Path, all_plots: list[Plot], parts: list[str]) -> Path:
    """The page and its plots as PNGs (stale ones of an earlier report removed); one line if it cannot."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for plot in all_plots:
            atomic_write_bytes(out_dir / f"{plot.name}.png", plot.png)
        made = {p.name for p in all_plots}
        for stale in PLOT_NAMES:  # from an earlier report of this run: the directory should match the page
            if stale not in made:
                (out_dir / f"{stale}.png").unlink(missing_ok=True)
        index = out_dir / "index.html"
        atomic_write_text(index, "\n".join(parts))
    except OSError as e:
        raise FastByolError(f"cannot write the report to {out_dir}: {e.strerror or e}: pass --out a writable "
                            "folder") from None
    return index
