"""Config: presets, YAML and key=value layering, and every invalid value rejected with its key named."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from fastbyol.config import BUILTIN_METHODS, RESUMABLE, Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from fastbyol.config_checks import ConfigError, literal_values
from fastbyol.config_parse import build_config, config_from_dict, describe_keys, resumable_keys, set_key, valid_keys
from fastbyol.presets import PRESETS


@pytest.mark.parametrize("name,epochs,lr,wd,tau", [
    ("byol-r50-1000ep", 1000, 0.2, 1.5e-6, 0.996),
    ("byol-r50-300ep", 300, 0.3, 1e-6, 0.99),
    ("byol-r50-100ep", 100, 0.45, 1e-6, 0.99),
    ("byol-r50-40ep", 40, 0.45, 1e-6, 0.97),
])
def test_paper_presets_follow_the_spec_table(name: str, epochs: int, lr: float, wd: float, tau: float) -> None:
    cfg = build_config(name, overrides=["data.path=/data/train"])
    assert (cfg.run.epochs, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.byol.tau_base) == (epochs, lr, wd, tau)
    assert cfg.model.arch == "resnet50" and cfg.optim.batch_size == 4096 and cfg.data.image_size == 224
    assert (cfg.model.proj_hidden, cfg.model.proj_dim) == (4096, 256)
    assert (cfg.optim.momentum, cfg.optim.eta, cfg.optim.warmup_epochs) == (0.9, 1e-3, 10.0)
    assert cfg.model.bn_momentum == 0.1 and cfg.model.bn_eps == 1e-5
    assert cfg.data.resize == "official"  # tf.image.resize's bicubic, as the official code (issue 30)


def test_only_the_paper_presets_take_the_official_resize() -> None:
    """data.resize defaults to 'pil', so the demo presets and the bitwise golden streams are unchanged."""
    for name in PRESETS:
        overrides = ["data.path=/x"] if PRESETS[name]["data"]["source"] == "folder" else []
        want = "official" if name.startswith("byol-r50-") else "pil"
        assert build_config(name, overrides=overrides).data.resize == want, name


def test_every_preset_validates() -> None:
    for name in PRESETS:
        build_config(name, overrides=["data.path=/x"] if PRESETS[name]["data"]["source"] == "folder" else [])


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\noptim:\n  batch_size: 16\nrun:\n  seed: 3\n")
    cfg = build_config(None, str(f), ["run.seed=5", "model.small_stem=false", "optim.base_lr=0.5"])
    assert cfg.preset == "smoke" and cfg.optim.batch_size == 16 and cfg.run.seed == 5
    assert cfg.model.small_stem is False and cfg.optim.base_lr == 0.5
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,needle", [
    ("optim.batch_size=0", "optim.batch_size=0"),
    ("optim.batch_size=-8", "positive integer"),
    ("optim.batch_size=abc", "optim.batch_size"),
    ("optim.batch_size=2.5", "not an integer"),
    ("optim.accum_steps=3", "not divisible"),
    ("optim.base_lr=-1", "optim.base_lr"),
    ("optim.base_lr=nan", "out of range"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("byol.tau_base=1.5", "byol.tau_base"),
    ("model.arch=resnet51", "did you mean 'resnet50'"),
    ("model.small_stem=maybe", "boolean"),
    ("data.image_size=8", "16..1024"),
    ("data.source=dali", "data.source"),
    ("data.resize=bicubic", "data.resize='bicubic' is not allowed: use one of official, pil"),
    ("run.device=tpu", "run.device"),
    ("run.epochs=0", "run.epochs"),
    ("run.log_every=0", "run.log_every"),
    ("optim.batchsize=8", "did you mean optim.batch_size"),
    ("nonsense", "key=value"),
    ("model=3", "unknown config key"),
])
def test_invalid_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config("smoke", overrides=[override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_missing_data_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'smok': did you mean smoke"):
        build_config("smok")
    with pytest.raises(ConfigError, match="data.path is empty"):
        build_config("byol-r50-100ep")
    with pytest.raises(ConfigError, match="not found"):
        build_config(None, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(None, str(bad))


def test_every_key_is_documented() -> None:
    text = describe_keys()
    for key in valid_keys():
        line = next(line for line in text.splitlines() if line.strip().startswith(key + " "))
        following = text.splitlines()[text.splitlines().index(line) + 1].strip()
        assert following, f"{key} has no docstring"


def _literal_keys() -> list[tuple[str, tuple[object, ...]]]:
    cfg = Config()
    out: list[tuple[str, tuple[object, ...]]] = [("method", BUILTIN_METHODS)]  # and custom:<module>.<Class>
    for key in valid_keys()[1:]:
        section, name = key.split(".")
        allowed = literal_values(typing.get_type_hints(type(getattr(cfg, section)))[name])
        if allowed:
            out.append((key, allowed))
    return out


def test_choice_fields_are_literals_and_each_value_is_checked_from_the_type() -> None:
    """The type lists a choice's values once: every value of it is accepted, anything else is refused
    naming the key and the values (at set time, and by validate() for a value set in code)."""
    keys = _literal_keys()
    assert {"method", "model.init", "data.loader", "run.engine", "run.zero_stage", "run.kernels"} <= dict(keys).keys()
    for key, allowed in keys:
        for value in allowed:
            cfg = Config()
            set_key(cfg, key, str(value))
            section, _, name = key.rpartition(".")
            assert getattr(getattr(cfg, section) if section else cfg, name) == value
        with pytest.raises(ConfigError, match=f"{key}=.*use one of {', '.join(map(str, allowed))}"):
            set_key(Config(), key, "7" if isinstance(allowed[0], int) else "bogus")
    cfg = build_config("smoke")
    cfg.run.kernels = "sometimes"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="run.kernels='sometimes' is not allowed"):
        cfg.validate()


def test_each_section_validates_itself_under_its_own_name() -> None:
    with pytest.raises(ConfigError, match="optim.batch_size=0"):
        OptimConfig(batch_size=0).validate("optim")
    with pytest.raises(ConfigError, match="data.path is empty"):
        DataConfig().validate("data")
    with pytest.raises(ConfigError, match="run.zero_stage=2 needs run.engine=deepspeed"):
        RunConfig(zero_stage=2).validate("run")
    ModelConfig().validate("model")


def test_resumable_keys_come_from_field_metadata() -> None:
    keys = resumable_keys()
    assert {"run.max_steps", "run.kernels", "data.path", "run.profile"} <= keys
    assert not keys & {"optim.base_lr", "optim.batch_size", "byol.tau_base", "run.seed", "model.arch", "method"}
    for key in keys:
        section, name = key.split(".")
        cls = type(getattr(Config(), section))
        assert next(f for f in dataclasses.fields(cls) if f.name == name).metadata == RESUMABLE


def test_every_preset_has_a_one_line_description() -> None:
    from fastbyol.presets import PRESET_DESCRIPTIONS, PRESETS

    assert set(PRESET_DESCRIPTIONS) == set(PRESETS)
    assert all(0 < len(text) <= 100 and "\n" not in text for text in PRESET_DESCRIPTIONS.values())
