"""Learning curves: run.keep_epochs keeps checkpoints for good; `fastbyol eval curve` evaluates them beside the
baselines, writes CSV / markdown / PNG, resumes, reads folders of exported encoders, and feeds the run's report."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch

from fastbyol.config_checks import ConfigError
from fastbyol.config_parse import build_config
from fastbyol.data.builders import make_synthetic
from fastbyol.engine import checkpoint
from fastbyol.engine.curve import evaluate_curve, find_runs, first_passing
from fastbyol.engine.evaluate import export_checkpoint
from fastbyol.engine.trainer import keep_steps_for, start_run
from fastbyol.errors import FastByolError
from fastbyol.telemetry.report import build_report

TINY = ["data.num_images=32", "optim.batch_size=8", "model.proj_hidden=32", "model.proj_dim=16",
        "model.small_stem=true", "data.image_size=16", "data.workers=0", "run.progress=off", "run.telemetry=off",
        "optim.warmup_epochs=0.5", "run.log_every=2", "run.kernels=off"]


def test_keep_steps_for_epochs() -> None:
    # 100 images, batch 32: epoch 1 ends inside step 4 (128 images), epoch 0.5 at step 2 (64 >= 50); 9 steps in all.
    assert keep_steps_for([1, 0.5, 2, 2, 50], 100, 32, 9) == {2: [0.5], 4: [1], 7: [2]}
    assert keep_steps_for([0.01], 100, 32, 9) == {1: [0.01]}  # never step 0: the first step is the earliest
    assert keep_steps_for([3], 96, 32, 9) == {9: [3]}  # exactly the last step
    # 200 epochs of 1,500 at batch 64: 4,687 steps, 32 images short of epoch 200 (the schedule drops the partial
    # batch). The run's last epoch is kept at its last step; one past run.epochs is not.
    assert keep_steps_for([150, 200, 201], 1500, 64, 4687) == {3516: [150]}
    assert keep_steps_for([150, 200, 201], 1500, 64, 4687, last_epoch=200) == {3516: [150], 4687: [200]}


@pytest.mark.parametrize("value", ["0", "-1", "nan", "1,x"])
def test_keep_epochs_rejects_bad_values(value: str) -> None:
    with pytest.raises(ConfigError, match="run.keep_epochs"):
        build_config("smoke", overrides=[f"run.keep_epochs={value}"])


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run (8 steps of 8) that keeps epochs 1 and 2 (and would keep 5, past its end), keep_last=1."""
    root = tmp_path_factory.mktemp("curve")
    cfg = build_config("smoke", overrides=[f"run.out_dir={root}", "run.name=run-a", "run.epochs=2",
                                           "run.keep_epochs=1,2,5", "run.keep_last=1", "run.ckpt_every=3", *TINY])
    start_run(cfg).train()
    return root / "run-a"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curve-data") / "d"
    make_synthetic(str(root), num_classes=3, train_per_class=8, val_per_class=4, size=16)
    return root


def test_keep_epochs_survive_keep_last(curve_run: Path) -> None:
    ckpts = curve_run / "checkpoints"
    assert [s for s, _ in checkpoint.list_checkpoints(ckpts)] == [8]  # keep_last=1 pruned the rolling ones
    kept = checkpoint.list_epoch_checkpoints(ckpts)
    assert [e for e, _ in kept] == [1.0, 2.0]  # epoch 5 is past the run's end
    states = [checkpoint.load(p) for _, p in kept]
    assert [s["step"] for s in states] == [4, 8]
    assert [s["epoch"] for s in states] == [1.0, 2.0]
    # Epoch 2 is the last step: the same complete file as ckpt-00000008.pt (a hard link here).
    assert kept[1][1].read_bytes() == (ckpts / checkpoint.checkpoint_name(8)).read_bytes()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_curve_evaluates_resumes_and_reports(curve_run: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    log = io.StringIO()
    results = evaluate_curve([str(curve_run)], str(data), out, torch.device("cpu"), k=3, linear_epochs=3,
                             baseline_seeds=2, stream=log)
    rows = _rows(out / "curve.csv")
    points = [r for r in rows if r["run"] != "baseline"]
    assert [(r["label"], r["epoch"], r["method"], r["seed"]) for r in points] == [
        ("run-a", "1", "byol", "0"), ("run-a", "2", "byol", "0")]
    baselines = [r["label"] for r in rows if r["run"] == "baseline"]
    assert baselines == ["raw pixels", *["random init, torchvision resnet18 (BN cal.)"] * 2]
    for r in rows:
        for col in ("knn3_top1", "linear_top1"):
            assert 0.0 <= float(r[col]) <= 100.0
    # The two kept checkpoints differ, so do their features; raw pixels differ from every network.
    assert results["points"][0]["identity"] != results["points"][1]["identity"]
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "curve.md").read_text()
    assert "| run-a |" in table and "first epoch above every baseline" in table
    assert set(first_passing(results)) == {"run-a"}
    assert "[2/2] run-a epoch 2" in log.getvalue()

    # Killed after its first point: results.json holds only that one. The rerun evaluates only what is missing.
    saved = json.loads((out / "results.json").read_text())
    saved["points"] = saved["points"][:1]
    saved["baselines"] = saved["baselines"][:1]
    (out / "results.json").write_text(json.dumps(saved))
    log = io.StringIO()
    again = evaluate_curve([str(curve_run)], str(data), out, torch.device("cpu"), k=3, linear_epochs=3,
                           baseline_seeds=2, stream=log)
    text = log.getvalue()
    assert "[1/2] run-a epoch 1" in text and "(done before)" in text.splitlines()[0]
    assert "(done before)" not in text.splitlines()[1]
    assert "baseline raw pixels" not in text and text.count("baseline random init") == 2
    for a, b in zip(results["points"] + results["baselines"], again["points"] + again["baselines"]):
        assert math.isclose(a["knn"]["top1"], b["knn"]["top1"]) and math.isclose(a["linear"]["top1"],
                                                                                   b["linear"]["top1"])

    # Other settings start over, with one line saying so.
    log = io.StringIO()
    evaluate_curve([str(curve_run)], str(data), out, torch.device("cpu"), k=2, linear_epochs=3, baseline_seeds=0,
                   stream=log)
    assert "other settings" in log.getvalue() and "(done before)" not in log.getvalue()

    # The run's own points went to RUN/curve/, and its report shows them.
    assert (curve_run / "curve" / "curve.png").is_file()
    page = build_report(curve_run).read_text(encoding="utf-8")
    assert "<h2>Learning curve</h2>" in page and 'id="plot-curve"' in page and "run-a" in page


def test_curve_reads_a_folder_of_exported_encoders(curve_run: Path, data: Path, tmp_path: Path) -> None:
    """A public BYOL's checkpoints (benchmarks/public_byol.py): torchvision state_dicts + curve.json."""
    folder = tmp_path / "public"
    folder.mkdir()
    for epoch in (1, 2):
        export_checkpoint(str(curve_run / "checkpoints" / f"epoch-{epoch}.pt"), str(tmp_path / f"e{epoch}"))
        (folder / f"epoch-{epoch}.pth").write_bytes((tmp_path / f"e{epoch}.pth").read_bytes())
    (folder / "curve.json").write_text(json.dumps({"label": "public BYOL", "arch": "resnet18", "small_stem": True,
                                                   "image_size": 16}))
    out = tmp_path / "both"
    results = evaluate_curve([str(curve_run), str(folder)], str(data), out, torch.device("cpu"), k=3,
                             linear_epochs=3, baseline_seeds=1, stream=io.StringIO())
    by_label = {(p["label"], p["epoch"]): p for p in results["points"]}
    # The same weights through either door give the same features, so the same accuracies.
    for epoch in (1.0, 2.0):
        ours, theirs = by_label[("run-a", epoch)], by_label[("public BYOL", epoch)]
        assert ours["knn"] == theirs["knn"] and ours["linear"] == theirs["linear"]
    assert len(results["baselines"]) == 2  # one architecture at one size: pixels + one random seed


def test_curve_joins_earlier_evaluations(curve_run: Path, data: Path, tmp_path: Path) -> None:
    """--with: a run evaluated elsewhere (its checkpoints gone, its folder moved) joins the curve as measured."""
    import shutil

    first = evaluate_curve([str(curve_run)], str(data), tmp_path / "a", torch.device("cpu"), k=3, linear_epochs=3,
                           baseline_seeds=0, stream=io.StringIO())
    moved = tmp_path / "elsewhere" / "d"  # the same images in another place: the same dataset
    shutil.copytree(data, moved)
    earlier = tmp_path / "earlier.json"
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    for p in saved["points"]:
        p["label"], p["run"], p["checkpoint"] = "gone", "/nowhere/gone", "/nowhere/gone/epoch.pt"
    earlier.write_text(json.dumps(saved))
    log = io.StringIO()
    both = evaluate_curve([str(curve_run)], str(moved), tmp_path / "b", torch.device("cpu"), k=3, linear_epochs=3,
                          baseline_seeds=0, stream=log, with_results=[str(earlier)])
    assert [(p["label"], p["epoch"]) for p in both["points"]] == [("run-a", 1.0), ("run-a", 2.0), ("gone", 1.0),
                                                                   ("gone", 2.0)]
    assert [p["knn"] for p in both["points"][2:]] == [p["knn"] for p in first["points"]]
    assert "2 points of 1 runs from earlier evaluations" in log.getvalue()
    rows = _rows(tmp_path / "b" / "curve.csv")
    assert [r["label"] for r in rows if r["run"] == "/nowhere/gone"] == ["gone", "gone"]
    # Only earlier files: nothing is evaluated but the baselines, for the architecture the points name.
    only = evaluate_curve([], str(data), tmp_path / "c", torch.device("cpu"), k=3, linear_epochs=3,
                          baseline_seeds=1, stream=io.StringIO(), with_results=[str(earlier)])
    assert [b["label"] for b in only["baselines"]] == ["raw pixels", "random init, torchvision resnet18 (BN cal.)"]
    # A run this call evaluates wins over the same label in an earlier file.
    same = evaluate_curve([str(curve_run)], str(data), tmp_path / "d", torch.device("cpu"), k=3, linear_epochs=3,
                          baseline_seeds=0, stream=io.StringIO(), with_results=[str(tmp_path / "a" / "results.json")])
    assert [p["label"] for p in same["points"]] == ["run-a", "run-a"]

    with pytest.raises(FastByolError, match="k=3, this curve with k=2"):
        evaluate_curve([], str(data), tmp_path / "e", torch.device("cpu"), k=2, linear_epochs=3,
                       with_results=[str(earlier)])
    with pytest.raises(FastByolError, match="in both --with"):
        evaluate_curve([], str(data), tmp_path / "e", torch.device("cpu"), k=3, linear_epochs=3,
                       with_results=[str(earlier), str(tmp_path / "b" / "results.json")])
    with pytest.raises(FastByolError, match="does not read as a curve's results.json"):
        evaluate_curve([], str(data), tmp_path / "e", torch.device("cpu"), k=3, linear_epochs=3,
                       with_results=[str(tmp_path / "b" / "curve.csv")])
    with pytest.raises(FastByolError, match="nothing to evaluate"):
        evaluate_curve([], str(data), tmp_path / "e", torch.device("cpu"))
    files = sorted(f for f in (moved / "val").rglob("*") if f.is_file())
    files[0].write_bytes(files[1].read_bytes())  # other images: another dataset
    with pytest.raises(FastByolError, match="made with dataset="):
        evaluate_curve([], str(moved), tmp_path / "e", torch.device("cpu"), k=3, linear_epochs=3,
                       with_results=[str(earlier)])


def test_curve_errors_name_the_fix(curve_run: Path, data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(FastByolError, match="run.keep_epochs"):
        find_runs([str(empty)])
    with pytest.raises(FastByolError, match="neither a fastbyol run directory"):
        find_runs([str(tmp_path)])
    with pytest.raises(FastByolError, match="no such run directory"):
        find_runs([str(tmp_path / "missing")])
    with pytest.raises(FastByolError, match="--k 0"):
        evaluate_curve([str(curve_run)], str(data), tmp_path / "o", torch.device("cpu"), k=0)
    with pytest.raises(FastByolError, match="larger than the 24 training images"):
        evaluate_curve([str(curve_run)], str(data), tmp_path / "o", torch.device("cpu"), k=25)


def test_cli_curve_errors_are_one_line(curve_run: Path, data: Path, tmp_path: Path) -> None:
    from test_cli import assert_one_line_error, fastbyol

    assert_one_line_error(fastbyol("eval", "curve", str(curve_run), str(curve_run), "--data", str(data), cwd=tmp_path),
                          "pass --out DIR")
    assert_one_line_error(fastbyol("eval", "curve", str(tmp_path), "--data", str(data), cwd=tmp_path),
                          "neither a fastbyol run directory")
    assert_one_line_error(fastbyol("eval", "curve", "--data", str(data), cwd=tmp_path), "nothing to evaluate")
    assert_one_line_error(fastbyol("eval", "curve", str(curve_run), "--with", "r.json", "--data", str(data),
                                   cwd=tmp_path), "pass --out DIR")
