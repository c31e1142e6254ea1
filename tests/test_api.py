"""The Python API: ``fastbyol.train`` on a model and a Dataset defined here (tensor and PIL items), checkpoints
and resume like a CLI run, ``fastbyol.load_encoder`` giving the online encoder, one-line errors, a preset
alone built as the CLI builds it, and the README's example run as written (its steps capped)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

import fastbyol
from fastbyol import cli
from fastbyol.config_parse import build_config
from fastbyol.engine import checkpoint
from fastbyol.errors import FastByolError
from fastbyol.model.backbone import custom_arch
from fastbyol.telemetry.sinks import read_metrics

ROOT = Path(__file__).resolve().parents[1]


class TinyCNN(nn.Module):
    """Images [B, 3, H, W] -> features [B, width]."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pool(self.bn(self.conv(x)))
        return out


class Blobs(Dataset[Any]):
    """``n`` seeded images of 20 x 24 px (not the run's size) with integer labels: CHW float tensors in [0, 1],
    uint8 tensors, or PIL images (some grayscale)."""

    classes = ["a", "b", "c", "d"]

    def __init__(self, n: int = 32, kind: str = "float") -> None:
        self.n, self.kind = n, kind

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(i))
        if self.kind == "uint8":
            return (x * 255).to(torch.uint8), i % 4
        if self.kind == "pil":
            img = Image.fromarray((x * 255).to(torch.uint8).permute(1, 2, 0).numpy())
            return (img.convert("L") if i % 2 else img), i % 4
        return x, i % 4


# 16 px, 8-image batches, 32 images: 4 steps an epoch; no progress bar, no worker processes.
TINY: dict[str, Any] = {"data__image_size": 16, "optim__batch_size": 8, "model__proj_hidden": 32,
                        "model__proj_dim": 16, "data__workers": 0, "run__progress": "off", "run__log_every": 1,
                        "run__ckpt_every": 2}


def _train(tmp_path: Path, name: str, **kwargs: Any) -> Path:
    return fastbyol.train("smoke", run__out_dir=str(tmp_path), run__name=name, **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyCNN]:
    """A run of TinyCNN on Blobs, in three sessions: 2 steps (telemetry on: the FLOPs counted on a meta copy
    of the model), resumed from its directory to step 3, then the same call with resume='auto' to its end."""
    tmp = tmp_path_factory.mktemp("api")
    net, data = TinyCNN(), Blobs()
    run_dir = _train(tmp, "tiny", model=net, dataset=data, run__max_steps=2, run__telemetry="on")
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [2]
    assert fastbyol.train(model=net, dataset=data, resume=run_dir, run__max_steps=3) == run_dir
    assert _train(tmp, "tiny", model=net, dataset=data, resume="auto") == run_dir
    return run_dir, net


def test_a_user_model_on_a_user_dataset_trains_checkpoints_and_resumes(trained: tuple[Path, TinyCNN]) -> None:
    run_dir, net = trained
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["arch"] == custom_arch(net) == f"custom:{__name__}.TinyCNN"
    assert saved["model"]["target_init"] == "copy"
    assert saved["data"].items() >= {"source": "dataset", "num_images": 32, "num_classes": 4}.items()
    assert json.loads((run_dir / "telemetry.json").read_text())["gflop_per_image"] > 0
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # continued each time, never restarted
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [4, 3]  # run.keep_last=2
    state = checkpoint.load(run_dir / "checkpoints" / "ckpt-00000004.pt")
    assert state["step"] == 4 and state["position"] == 32
    for name, value in net.state_dict().items():  # trained in place: the online encoder at step 4
        assert torch.equal(value.cpu(), state["model"][f"online.encoder.net.{name}"]), name


def test_load_encoder_gives_the_online_encoder_not_the_target(trained: tuple[Path, TinyCNN]) -> None:
    run_dir, _ = trained
    encoder = fastbyol.load_encoder(run_dir, model=TinyCNN())
    assert isinstance(encoder, TinyCNN) and not encoder.training
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir / "checkpoints")[0][1])["model"]
    for name, value in encoder.state_dict().items():
        assert value.device.type == "cpu"
        assert torch.equal(value, state[f"online.encoder.net.{name}"]), name
    weight = encoder.state_dict()["conv.weight"]
    assert not torch.equal(weight, state["target.encoder.net.conv.weight"])
    assert encoder(torch.rand(2, 3, 16, 16)).shape == (2, 8)
    with pytest.raises(FastByolError, match=r"model=TinyCNN\(...\)") as e:
        fastbyol.load_encoder(run_dir)  # the config cannot build a custom model
    assert "\n" not in str(e.value)
    with pytest.raises(FastByolError, match="does not fit the model given") as e:
        fastbyol.load_encoder(run_dir, model=TinyCNN(width=4))
    assert "\n" not in str(e.value)


def test_a_custom_run_needs_its_model_and_dataset_again(trained: tuple[Path, TinyCNN], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = trained
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": TinyCNN(width=4), "dataset": Blobs()}, "size mismatch for online.encoder.net.conv.weight"),
        ({"model": nn.Sequential(nn.Flatten()), "dataset": Blobs()}, "the model given is custom:torch"),
        ({"model": TinyCNN(), "dataset": Blobs(n=40)}, "the dataset has 40 images"),
        ({"model": TinyCNN()}, "data.source=dataset reads a Dataset given to the Python API"),
        ({"dataset": Blobs()}, "is a model given to the Python API"),
    ]
    for kwargs, message in cases:
        with pytest.raises(FastByolError, match=re.escape(message)) as e:
            fastbyol.train(resume=run_dir, **kwargs)
        assert "\n" not in str(e.value)
    # The command line says the same in one line.
    assert cli.main(["export", str(run_dir), str(tmp_path / "out")]) != 0
    assert "is a model given to the Python API" in capsys.readouterr().err


class ReadsValues(TinyCNN):
    """A forward that reads a tensor's value: the meta device cannot run it, so its FLOPs are not counted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (1.0 if float(x.mean()) < 1e9 else 0.0)


def test_pil_and_uint8_items_of_any_size_train(tmp_path: Path) -> None:
    """Grayscale PIL and uint8 tensor items of 20 x 24 px; with telemetry on, a model the meta device cannot
    run trains with its FLOPs (MFU) left out."""
    for kind, model in (("pil", TinyCNN()), ("uint8", ReadsValues())):
        run_dir = _train(tmp_path, kind, model=model, dataset=Blobs(kind=kind), run__max_steps=1,
                         run__telemetry="on" if kind == "uint8" else "off")
        assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [1]
        assert not (run_dir / "skipped.txt").exists()
    assert json.loads((tmp_path / "uint8" / "telemetry.json").read_text())["gflop_per_image"] is None


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)  # [B, 3, H, W] into a Linear of 10 inputs
        return out


def test_mistakes_stop_in_one_line_before_a_step_runs(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"optim__batch_sise": 8}, "unknown config key 'optim__batch_sise': did you mean optim__batch_size?"),
        ({"optim.batch_sise": 8}, "did you mean optim.batch_size?"),
        ({"model": Broken()}, "model Broken failed on a batch of shape [2, 3, 16, 16]"),
        ({"model": nn.Conv2d(3, 4, 1)}, "returned shape [2, 4, 16, 16]"),
        ({"model": TinyCNN(), "model__target_init": "independent"}, "model.target_init='independent' does not go"),
        ({"dataset": ["not an image"]}, "dataset item 0 is a str"),
        ({"dataset": [torch.randn(3, 8, 8)]}, "give float images in [0, 1], not normalised"),
        ({"dataset": [torch.rand(8, 8, 3)]}, "give images [3, H, W]"),
        ({"dataset": Blobs(), "data__loader": "dali"}, "data.loader=dali reads image folders and shards"),
        ({"dataset": [torch.rand(3, 8, 8)], "model__online_probe": True}, "model.online_probe=true needs labels"),
    ]
    for kwargs, message in cases:
        with pytest.raises(FastByolError, match=re.escape(message)) as e:
            _train(tmp_path, "bad", **kwargs)
        assert "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "bad").exists()  # a refused run leaves no directory behind
    with pytest.raises(FastByolError, match="continues a run with its saved config"):
        fastbyol.train("smoke", resume=tmp_path)


def test_a_preset_alone_is_built_as_the_cli_builds_it(tmp_path: Path) -> None:
    """No model, no dataset: the preset's ResNet-18 on its procedural images, the config the CLI writes."""
    overrides = {"data__num_images": 16, "run__max_steps": 1, "run__telemetry": "off", "model__init": "torchvision"}
    run_dir = _train(tmp_path, "preset", **overrides)
    texts = [f"run.out_dir={tmp_path}", "run.name=preset"] + [
        f"{k.replace('__', '.')}={v}" for k, v in {**TINY, **overrides}.items()]
    assert (run_dir / "config.yaml").read_text() == build_config("smoke", None, texts).to_yaml()
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [1]


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "pages").rglob("*.md"))]
PYTHON_BLOCKS = [(doc.relative_to(ROOT).as_posix(), i, block) for doc in DOCS
                 for i, block in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.DOTALL))]
"""Every python block of the README and the documentation site's pages."""


def test_the_docs_have_the_api_example() -> None:
    assert [name for name, _, _ in PYTHON_BLOCKS].count("docs/pages/how-to/python-api.md") >= 1


@pytest.mark.parametrize(("name", "index", "code"), PYTHON_BLOCKS, ids=[f"{n}:{i}" for n, i, _ in PYTHON_BLOCKS])
def test_each_python_example_of_the_docs_runs(name: str, index: int, code: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """As written, in a fresh folder, with any run capped at 2 steps (the pages time whole runs)."""
    real = fastbyol.train

    def capped(*args: Any, **kwargs: Any) -> Path:
        return real(*args, **kwargs, run__max_steps=2, run__progress="off")

    monkeypatch.setattr(fastbyol, "train", capped)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code, f"{name}, python block {index}", "exec"), namespace)
    if name != "docs/pages/how-to/python-api.md" or index != 0:
        return
    assert namespace["features"].shape[0] == 8
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "runs" / "squares" / "checkpoints")] == [2]
