"""Building a Config: a preset, then a YAML file, then ``key=value`` overrides, each coerced to its field's type
with one-line errors that name the key; and the key listing ``--help`` prints."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from fastbyol.config import Config, check_method, sections
from fastbyol.config_checks import ConfigError, choice, literal_values, raise_all
from fastbyol.presets import PRESETS, preset_names


def valid_keys() -> list[str]:
    keys = ["method"]
    for name, cls in sections().items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def resumable_keys() -> frozenset[str]:
    """The keys whose field carries ``RESUMABLE``: what ``--resume`` may change."""
    return frozenset(f"{name}.{f.name}" for name, cls in sections().items() for f in dataclasses.fields(cls)
                     if f.metadata.get("resumable"))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise naming the key."""
    allowed = literal_values(typ)
    if allowed:
        value = _coerce(key, value, type(allowed[0]))
        choice(key, value, allowed)
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no", "1", "0"):
            return value.lower() in ("true", "on", "yes", "1")
        raise ConfigError(f"{key}={value!r} is not a boolean: use true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}={value!r} is not an integer")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not an integer") from None
        if not f.is_integer():
            raise ConfigError(f"{key}={value!r} is not an integer")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if get_origin(typ) is list:  # YAML's list, or the command line's a,b (or [a, b]); '' is the empty list
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}={value!r} is not a YAML list: write {key}=a,b") from None
        elif isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is not a list: write {key}=a,b (or a YAML list)")
        return [_coerce(key, v, get_args(typ)[0]) for v in value]
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string")
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off/yes/no as a boolean
            return "on" if value else "off"
        return "" if value is None else str(value)
    raise TypeError(f"unsupported config type {typ} for {key}")


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"did you mean {near[0]}? " if near else ""
    return ConfigError(f"unknown config key {key!r}: {hint}(`fastbyol train --help` lists the keys)")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.field`` to ``value`` coerced to the field's type (``section.field.entry`` of a dict field,
    the text read as YAML: ``model.timm_kwargs.drop_path_rate=0.1``); unknown keys suggest the nearest."""
    if key == "method":
        cfg.method = _coerce(key, value, str)
        check_method(cfg.method)
        return
    section_name, _, name = key.partition(".")
    if section_name not in sections() or not name:
        raise _unknown_key(key)
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    name, _, entry = name.partition(".")
    if name not in hints:
        raise _unknown_key(key)
    if get_origin(hints[name]) is dict:
        if entry:
            getattr(section, name)[entry] = yaml.safe_load(value) if isinstance(value, str) else value
        elif isinstance(value, dict):
            setattr(section, name, dict(value))
        else:
            raise ConfigError(f"{key}={value!r} is not a mapping: set its entries, e.g. {key}.drop_path_rate=0.1")
        return
    if entry:
        raise _unknown_key(key)
    setattr(section, name, _coerce(key, value, hints[name]))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.batch_size=256`` -> ("optim.batch_size", "256"); ``set_key`` turns the text into the field type."""
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise ConfigError(f"override {text!r} is not key=value: write e.g. optim.batch_size=256")
    return key.strip(), raw  # set_key coerces the text to the field's type


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing YAML file to --config")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    return tree


def build_config(preset: str | None = None, yaml_path: str | None = None,
                 overrides: list[str] | None = None) -> Config:
    """Preset (or the file's ``preset:``), then the YAML file, then ``key=value`` overrides; validated."""
    tree = load_yaml(yaml_path) if yaml_path else {}
    file_preset = tree.pop("preset", None)
    name = preset or file_preset or "byol-r50-1000ep"
    if name not in PRESETS:
        near = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(f"unknown preset {name!r}: {hint}choose one of {', '.join(preset_names())}")
    cfg = Config(preset=name)
    for key, value in _flatten(PRESETS[name]).items():
        set_key(cfg, key, value)
    for key, value in _flatten(tree).items():
        set_key(cfg, key, value)
    errors: list[ConfigError] = []
    for text in overrides or []:  # every bad override at once, then every section's first error
        try:
            set_key(cfg, *parse_override(text))
        except ConfigError as e:
            errors.append(e)
    raise_all(errors)
    return cfg.validate()


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (checkpoints, config.yaml of a run directory)."""
    tree = dict(tree)
    cfg = Config(preset=str(tree.pop("preset", "byol-r50-1000ep")))
    for key, value in _flatten(tree).items():
        set_key(cfg, key, value)
    return cfg.validate()


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as ``--help`` and the documentation site's reference show it."""

    key: str
    """Dotted name: method, model.arch, ..."""
    type: str
    """Its annotation as written in the dataclass (``Literal[...]`` lists the values)."""
    default: Any
    """The base config's default (presets change some)."""
    doc: str
    """The field's docstring, on one line."""
    resumable: bool
    """Whether a resumed run may change it (``RESUMABLE``)."""


def config_keys() -> list[KeyDoc]:
    """Every key of the config, in section order: the one source of ``--help``'s key list and the site's
    config reference (``docs/hooks.py``)."""
    hints = typing.get_type_hints(Config)
    keys = [KeyDoc("method", _type_name(hints["method"]), Config.method, _field_docs(Config)["method"], False)]
    for name, cls in sections().items():
        docs, section_hints = _field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            keys.append(KeyDoc(f"{name}.{f.name}", _type_name(section_hints[f.name]), default,
                               docs.get(f.name, ""), bool(f.metadata.get("resumable"))))
    return keys


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "Literal[" + ", ".join(repr(v) for v in typing.get_args(hint)) + "]"
    if typing.get_origin(hint) is not None:  # list[float], dict[str, Any]
        return str(hint).replace("typing.", "")
    return str(hint.__name__)


def describe_keys() -> str:
    """Every key with its default and docstring, for ``--help``."""
    return "\n".join(f"  {k.key} = {k.default!r}\n      {k.doc}" for k in config_keys())


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) read from the source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(
                nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
