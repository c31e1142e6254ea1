"""The config's checks: ``ConfigError`` and the helpers each section's ``validate`` calls, each raising one line
that names the key and what it accepts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Literal, get_args, get_origin

from fastbyol.errors import FastByolError


class ConfigError(FastByolError):
    """An invalid config value, key, preset or file."""


def choice(key: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint}: use one of {', '.join(map(str, allowed))}")


_WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in project and entity names


def check_wandb(prefix: str, project: str, entity: str, tags: list[str]) -> None:
    """W&B's own limits, checked before the run starts rather than at wandb.init."""
    for key, value, example in ((f"{prefix}.wandb", project, "byol-r50"),
                                (f"{prefix}.wandb_entity", entity, "my-team")):
        bad = sorted({c for c in value if c in _WANDB_FORBIDDEN})
        if bad or len(value) > 128:
            why = f"contains {' '.join(bad)}" if bad else "is longer than 128 characters"
            raise ConfigError(f"{key}={value!r} {why}, which W&B refuses: use a plain name, e.g. {key}={example}")
    for tag in tags:
        if not 1 <= len(tag) <= 64:
            raise ConfigError(f"{prefix}.wandb_tags has the tag {tag!r}: W&B takes tags of 1 to 64 characters, "
                              f"e.g. {prefix}.wandb_tags=baseline,r50")


def check_choices(section: object, prefix: str) -> None:
    """Every ``Literal[...]`` field of ``section`` holds one of its values."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        allowed = literal_values(hints[f.name])
        if allowed:
            choice(f"{prefix}.{f.name}" if prefix else f.name, getattr(section, f.name), allowed)


def literal_values(typ: Any) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` type (empty for any other type)."""
    return get_args(typ) if get_origin(typ) is Literal else ()


def positive_int(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value} is invalid: must be a positive integer (>= 1)")


def non_negative_int(key: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{key}={value} is invalid: must be an integer >= 0")


def in_range(key: str, value: float, low: float, high: float, what: str,
              low_ok: bool = False, high_ok: bool = True) -> None:
    ok = math.isfinite(value) and (value >= low if low_ok else value > low) and (
        value <= high if high_ok else value < high)
    if not ok:
        lo, hi = ("[" if low_ok else "("), ("]" if high_ok else ")")
        raise ConfigError(f"{key}={value} is out of range {lo}{low:g}, {high:g}{hi}: use {what}")


def raise_all(errors: list[ConfigError]) -> None:
    """One ConfigError carrying every message (one line each joined by '; '), or nothing when there is none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigError(f"{len(errors)} config errors: " + "; ".join(f"({i}) {e}" for i, e in enumerate(errors, 1)))


def parse_profile_window(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), the optimizer steps A..B-1 that run.profile traces."""
    try:
        first, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"run.profile={text!r} is not a step window: use A:B, e.g. run.profile=10:15 "
                          "(steps 10 to 14)") from None
    if not 0 <= first < end:
        raise ConfigError(f"run.profile={text!r} is empty or negative: use A:B with 0 <= A < B, e.g. 10:15")
    return first, end
