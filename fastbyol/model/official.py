"""The official BYOL code's checkpoints (deepmind-research, ``byol/``), read into fastbyol's names.

The file (``utils/checkpointing.py``) is ``dill.dump(dict(experiment_state=..., step=..., rng=...), protocol=2)``;
``experiment_state`` is a ``_ByolExperimentState`` (``byol_experiment.py``: ``online_params``, ``target_params``,
``online_state``, ``target_state``, ``opt_state``), each leaf the numpy array of device 0. Params and state are
Haiku's two-level mappings, module name -> {leaf: array} (Haiku's ``FlatMapping`` of 2020, or dicts). It is read
without dill, JAX or Haiku, by an unpickler that builds numpy arrays, mappings and namedtuples and nothing else: an
object of any other class (the optimizer's state, a JAX array) comes back inert and unread.

Haiku names a module by its snake-cased class (``ResNet50`` -> ``res_net50``, ``BatchNorm`` -> ``batch_norm``),
joined with ``/~/`` when built in a constructor and ``/`` when built in a call (the MLPs build their layers in
``__call__``); a second ``Linear`` is ``linear_1``. The names, and where they go (``online.`` or ``target.``):

  res_net50/~/initial_conv                          w [7, 7, 3, 64] (HWIO)      encoder.net.conv1.weight (OIHW)
  res_net50/~/initial_batchnorm                     scale, offset [1, 1, 1, C]  encoder.net.bn1.weight, .bias
  res_net50/~/initial_batchnorm/~/mean_ema          average, counter, hidden    bn1.running_mean, .num_batches_tracked
  res_net50/~/initial_batchnorm/~/var_ema           average, counter, hidden    bn1.running_var
  res_net50/~/block_group_G/~/block_B/~/conv_I      w                           layer{G+1}.B.conv{I+1}.weight
  res_net50/~/block_group_G/~/block_B/~/batchnorm_I (+ /~/mean_ema, var_ema)    layer{G+1}.B.bn{I+1}
  .../block_B/~/shortcut_conv, shortcut_batchnorm                               layer{G+1}.B.downsample.0, .1
  projector/linear (w [in, out], b), projector/batch_norm, projector/linear_1  projector.0, .1, .3 (w -> [out, in])
  predictor/linear, predictor/batch_norm, predictor/linear_1                   predictor.0, .1, .3 (online only)
  classifier                                        w [D, classes], b           probe (online only)

Read and left out by name: the target's ``predictor`` and ``classifier`` (the official forward builds them for the
target too and its EMA moves them, but nothing reads them; fastbyol's target has none), each EMA's ``hidden`` (its
un-debiased accumulator: ``average`` is the statistic Haiku normalises with) and the ``var_ema``'s ``counter`` (the
``mean_ema``'s twin). Any other leaf is an error, as is one fastbyol's network has and the file lacks.
"""

from __future__ import annotations

import collections
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fastbyol.errors import FastByolError

OFFICIAL_ARCHS = {"res_net18": "resnet18", "res_net34": "resnet34", "res_net50": "resnet50",
                  "res_net101": "resnet101", "res_net152": "resnet152", "res_net200": "resnet200"}
"""The official ``utils/networks.py`` encoders (v1, ``resnet_v2=False``) by their Haiku module name, and the
fastbyol arch that builds the same network under ``model.init=haiku model.padding=same``."""
STATE_FIELDS = ("online_params", "target_params", "online_state", "target_state")
"""The first four fields of ``_ByolExperimentState``, in its order (``opt_state`` follows and is not read)."""


class OfficialCheckpoint(NamedTuple):
    """The four trees of an official checkpoint (module name -> {leaf: array}) and its step."""

    online_params: dict[str, dict[str, np.ndarray]]
    target_params: dict[str, dict[str, np.ndarray]]
    online_state: dict[str, dict[str, np.ndarray]]
    target_state: dict[str, dict[str, np.ndarray]]
    step: int


@dataclass
class OfficialModel:
    """What the checkpoint's shapes say about its network."""

    arch: str
    proj_hidden: int
    proj_dim: int
    classes: int
    """Outputs of the online ``classifier`` (0: none in the file)."""


@dataclass
class OfficialImport:
    """Every tensor of the file accounted for: ``state`` under fastbyol's ByolPair names, ``mapped`` (official leaf,
    fastbyol name) pairs, ``dropped`` (official leaf, why) and ``unmapped`` official leaves."""

    model: OfficialModel
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


# -- reading the pickle --------------------------------------------------------------------------------------------

class _Inert:
    """An object of a class the reader does not build (optax and LARS states, JAX arrays, ...): its arguments are
    kept, nothing of it runs."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_NAMEDTUPLES: dict[tuple[str, tuple[str, ...]], type] = {}


def _create_namedtuple(name: str, fieldnames: Any, modulename: str = "", *defaults: Any) -> type:
    """dill's ``_create_namedtuple``: dill pickles a namedtuple class (``_ByolExperimentState``) as its name and
    fields, so the class need not be importable."""
    key = (str(name), tuple(str(f) for f in fieldnames))
    if key not in _NAMEDTUPLES:
        _NAMEDTUPLES[key] = collections.namedtuple(re.sub(r"\W", "_", key[0]) or "T", key[1],  # type: ignore[misc]
                                                   rename=True)
    return _NAMEDTUPLES[key]


def _mapping(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    """Haiku's ``FlatMapping`` and ``frozendict`` pickle as ``(cls, (a_dict,))``: a dict here."""
    return dict(*args, **kwargs)


_BUILTIN_TYPES = {"dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "int": int,
                  "float": float, "str": str, "bytes": bytes, "bool": bool, "NoneType": type(None)}


def _numpy_global(name: str) -> Any:
    """numpy's array and scalar rebuilders, which a 2020 file names numpy.core.multiarray and numpy 2 moved."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


def _find_class(module: str, name: str) -> Any:
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return _numpy_global(name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if (module, name) == ("_codecs", "encode"):  # protocol 2's bytes
        import codecs

        return codecs.encode
    if module in ("dill._dill", "dill.dill"):
        if name == "_create_namedtuple":
            return _create_namedtuple
        if name == "_load_type":
            return lambda type_name: _BUILTIN_TYPES.get(type_name, _Inert)
    if module.startswith("haiku") and name in ("FlatMapping", "frozendict"):
        return _mapping
    if (module, name) in (("collections", "OrderedDict"), ("builtins", "dict")):
        return dict
    if module in ("builtins", "__builtin__") and name in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[name]
    return _Inert


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _find_class(module, name)


def _not_official(path: Path, why: str) -> FastByolError:
    return FastByolError(f"{path} is not a checkpoint of the official BYOL code ({why}): pass a pretraining "
                         "checkpoint of deepmind-research/byol, e.g. pretrain_res50x1.pkl")


def _tree(path: Path, name: str, value: Any) -> dict[str, dict[str, np.ndarray]]:
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise _not_official(path, f"its {name} is a {type(value).__name__}, not Haiku's module -> leaves mapping")
    return {str(module): {str(k): np.asarray(v) if isinstance(v, (np.ndarray, np.generic)) else v
                          for k, v in leaves.items()} for module, leaves in value.items()}


def read_official(path: str | Path) -> OfficialCheckpoint:
    """The online and target trees and the step of an official checkpoint file (``FastByolError`` if it is not one)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = _Unpickler(f).load()
    except FileNotFoundError:
        raise FastByolError(f"{path} does not exist: pass the official checkpoint file, e.g. "
                            "pretrain_res50x1.pkl") from None
    except IsADirectoryError:
        raise _not_official(path, "it is a folder") from None
    except Exception as e:  # any byte sequence: what the unpickler met, in one line
        raise _not_official(path, f"not a pickle: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            ) from None
    if not isinstance(data, Mapping) or "experiment_state" not in data:
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise _not_official(path, f"no experiment_state: it holds {keys}")
    state = data["experiment_state"]
    if _field(state, "backbone_params", -1) is not None:
        raise _not_official(path, "a linear-evaluation checkpoint (backbone_params): pass the pretraining one, "
                                  "pretrain.pkl")
    trees = {name: _tree(path, name, _field(state, name, i)) for i, name in enumerate(STATE_FIELDS)}
    step = data.get("step", -1)
    try:
        step = int(np.asarray(step))
    except (TypeError, ValueError):
        step = -1
    return OfficialCheckpoint(**trees, step=step)


def _field(state: Any, name: str, position: int) -> Any:
    """A field of ``_ByolExperimentState`` by name (a namedtuple, or a dict), or by position (an inert object
    whose class was not built: its constructor arguments, in the class's field order)."""
    if isinstance(state, Mapping):
        return state.get(name)
    if hasattr(state, "_fields"):
        return getattr(state, name, None)
    args = state.args if isinstance(state, _Inert) else state if isinstance(state, tuple) else ()
    return args[position] if 0 <= position < len(args) else None


# -- names ---------------------------------------------------------------------------------------------------------

_ENCODER_MODULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"initial_conv"), lambda m: "conv1"),
    (re.compile(r"initial_batchnorm"), lambda m: "bn1"),
    (re.compile(r"block_group_(\d+)/~/block_(\d+)/~/conv_(\d+)"),
     lambda m: f"layer{int(m[1]) + 1}.{int(m[2])}.conv{int(m[3]) + 1}"),
    (re.compile(r"block_group_(\d+)/~/block_(\d+)/~/batchnorm_(\d+)"),
     lambda m: f"layer{int(m[1]) + 1}.{int(m[2])}.bn{int(m[3]) + 1}"),
    (re.compile(r"block_group_(\d+)/~/block_(\d+)/~/shortcut_conv"),
     lambda m: f"layer{int(m[1]) + 1}.{int(m[2])}.downsample.0"),
    (re.compile(r"block_group_(\d+)/~/block_(\d+)/~/shortcut_batchnorm"),
     lambda m: f"layer{int(m[1]) + 1}.{int(m[2])}.downsample.1"),
]
_MLP_LAYERS = {"linear": "0", "batch_norm": "1", "linear_1": "3"}


def _hwio_to_oihw(a: np.ndarray) -> torch.Tensor:
    return _tensor(a.transpose(3, 2, 0, 1))


def _in_out_to_out_in(a: np.ndarray) -> torch.Tensor:
    return _tensor(a.T)


def _vector(a: np.ndarray) -> torch.Tensor:
    return _tensor(a.reshape(-1))


def _count(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(int(a), dtype=torch.long)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


_DROP = "drop"
# leaf -> (fastbyol leaf, conversion) per kind of module; _DROP: read and left out (the module docstring says why).
_LEAVES: dict[str, dict[str, tuple[str, Callable[[np.ndarray], torch.Tensor]] | str]] = {
    "conv": {"w": ("weight", _hwio_to_oihw)},
    "linear": {"w": ("weight", _in_out_to_out_in), "b": ("bias", _vector)},
    "batchnorm": {"scale": ("weight", _vector), "offset": ("bias", _vector)},
    "mean_ema": {"average": ("running_mean", _vector), "counter": ("num_batches_tracked", _count), "hidden": _DROP},
    "var_ema": {"average": ("running_var", _vector), "counter": _DROP, "hidden": _DROP},
}
_WHY = {"hidden": "the EMA's un-debiased accumulator (average is the statistic)",
        "counter": "the var_ema's counter, the mean_ema's twin"}


def _module(tower: str, module: str, encoder: str) -> tuple[str, str] | str | None:
    """(fastbyol module, kind) of an official module of ``tower`` ('online' or 'target'), a reason to leave it out,
    or None (not a module of the official network)."""
    ema = ""
    if m := re.fullmatch(r"(.*)/~/(mean_ema|var_ema)", module):
        module, ema = m[1], m[2]
    head, sep, rest = module.partition("/")
    if head == encoder and rest.startswith("~/"):
        for pattern, name in _ENCODER_MODULES:
            if match := pattern.fullmatch(rest[2:]):
                kind = ema or ("conv" if "conv" in rest.rsplit("/", 1)[-1] else "batchnorm")
                return f"{tower}.encoder.net.{name(match)}", kind
        return None
    if head in ("projector", "predictor") and rest in _MLP_LAYERS:
        if head == "predictor" and tower == "target":
            return "the official target's predictor: built by the shared forward, never read; fastbyol's has none"
        kind = ema or ("batchnorm" if rest == "batch_norm" else "linear")
        where = "predictor" if head == "predictor" else f"{tower}.projector"
        return f"{where}.{_MLP_LAYERS[rest]}", kind
    if module == "classifier" and not ema:
        if tower == "target":
            return "the official target's classifier: built by the shared forward, never read; fastbyol's has none"
        return "probe", "linear"
    return None


def official_model(ckpt: OfficialCheckpoint, path: str | Path = "checkpoint") -> OfficialModel:
    """The arch and head sizes of ``ckpt``'s online network; ``FastByolError`` for one fastbyol does not build."""
    params = ckpt.online_params
    encoders = sorted({m.split("/", 1)[0] for m in params if m.startswith("res_net")})
    if len(encoders) != 1 or encoders[0] not in OFFICIAL_ARCHS:
        found = ", ".join(encoders) or "none"
        raise FastByolError(f"{path}: unknown encoder ({found}): fastbyol imports the official "
                            f"{', '.join(n.replace('res_net', 'ResNet') for n in OFFICIAL_ARCHS)}")
    encoder = encoders[0]
    if f"{encoder}/~/final_batchnorm" in params or f"{encoder}/~/initial_batchnorm" not in params:
        raise FastByolError(f"{path}: a ResNet v2 ({encoder} with resnet_v2=True): fastbyol builds v1 ResNets only")
    try:
        stem = params[f"{encoder}/~/initial_conv"]["w"].shape
        hidden = int(params["projector/linear"]["w"].shape[1])
        proj_dim = int(params["projector/linear_1"]["w"].shape[1])
        pred_hidden = int(params["predictor/linear"]["w"].shape[1])
    except (KeyError, IndexError, AttributeError) as e:
        raise FastByolError(f"{path}: the online network lacks {e} (initial_conv, projector/linear, "
                            "projector/linear_1, predictor/linear): not an official BYOL network") from None
    if len(stem) != 4 or stem[3] != 64:
        width = f"{stem[3] / 64:g}x" if len(stem) == 4 else f"shape {list(stem)}"
        raise FastByolError(f"{path}: a {encoder.replace('res_net', 'ResNet')} of width {width} (initial_conv "
                            f"{list(stem)}): fastbyol builds the 1x networks only (torchvision's wide ResNets widen "
                            "the bottlenecks alone, not the official width_multiplier); import a 1x checkpoint, e.g. "
                            "pretrain_res50x1.pkl")
    if pred_hidden != hidden:
        raise FastByolError(f"{path}: predictor hidden width {pred_hidden} differs from the projector's {hidden}: "
                            "fastbyol's model.proj_hidden sets both")
    classes = int(params["classifier"]["w"].shape[1]) if "classifier" in params else 0
    return OfficialModel(OFFICIAL_ARCHS[encoder], hidden, proj_dim, classes)


def map_official(ckpt: OfficialCheckpoint, path: str | Path = "checkpoint") -> OfficialImport:
    """Every leaf of ``ckpt`` under its fastbyol ByolPair name (converted: HWIO -> OIHW, [in, out] -> [out, in],
    BatchNorm vectors flat), or left out by name, or listed as unmapped; see the module docstring."""
    model = official_model(ckpt, path)
    encoder = next(k for k, v in OFFICIAL_ARCHS.items() if v == model.arch)
    out = OfficialImport(model)
    for tree in STATE_FIELDS:
        tower = tree.split("_")[0]
        for module, leaves in getattr(ckpt, tree).items():
            where = _module(tower, module, encoder)
            for leaf, value in leaves.items():
                official = f"{tree}/{module}/{leaf}"
                if isinstance(where, str):
                    out.dropped.append((official, where))
                    continue
                rule = _LEAVES[where[1]].get(leaf) if where is not None else None
                if where is None or rule is None or not isinstance(value, np.ndarray):
                    out.unmapped.append(official)
                elif isinstance(rule, str):  # _DROP
                    out.dropped.append((official, _WHY[leaf]))
                else:
                    name, convert = rule
                    key = f"{where[0]}.{name}"
                    if key in out.state:
                        raise FastByolError(f"{path}: {official} and another leaf both map to {key}")
                    out.state[key] = convert(value)
                    out.mapped.append((official, key))
    return out
