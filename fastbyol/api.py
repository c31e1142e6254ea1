"""The Python API: fastbyol's trainer from a notebook or a script, on your own encoder and images.

    import fastbyol
    run_dir = fastbyol.train("smoke", model=net, dataset=images, optim__batch_size=32)
    encoder = fastbyol.load_encoder(run_dir, model=Net())

``train`` builds the config as ``fastbyol train`` does (a preset, a YAML file or a ``Config``, then overrides) and
runs the same ``Trainer``: the same steps, metrics, checkpoints and resume. A ``model`` takes the place of the
encoder that ``model.arch`` names and a ``dataset`` that of the images ``data.source`` names; the run's config
records both (``model.arch=custom:<module>.<class>``, ``data.source=dataset``), so a run that needs them cannot
be continued or evaluated without them, and says so in one line.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from torch import nn

from fastbyol.config import Config
from fastbyol.config_parse import build_config, set_key, valid_keys
from fastbyol.data.dataset import DatasetImages
from fastbyol.engine import checkpoint
from fastbyol.engine.distributed import shutdown
from fastbyol.engine.evaluate import encoder_from_checkpoint
from fastbyol.engine.trainer import UserParts, auto_resume, resume_run, start_run
from fastbyol.engine.update import state_mismatch
from fastbyol.errors import FastByolError
from fastbyol.eval.export import online_encoder_state
from fastbyol.model.backbone import custom_arch

__all__ = ["train", "load_encoder"]


def train(config_or_preset: str | Path | Config | None = None, model: nn.Module | None = None,
          dataset: object | None = None, *, resume: str | Path | None = None, **overrides: Any) -> Path:
    """Pretrain with BYOL (or the config's ``method``) and return the run directory.

    ``config_or_preset``: a preset name (``fastbyol presets``), a YAML file as ``--config`` takes (a ``Path``,
    or a name ending in .yaml/.yml), a ``fastbyol.config.Config``, or None for the CLI's default preset.

    ``model``: any ``nn.Module`` mapping images [B, 3, H, W] (the views, normalised with ImageNet's mean and
    std) to features [B, D], global-pooled; other output shapes are refused. D is found by one forward of a
    batch [2, 3, S, S] at the run's data.image_size S, in eval mode without gradients, the modules' modes then
    restored. It becomes the online encoder, trained in place (afterwards it holds the final online weights, on
    the run's device, in training mode), with its own initialisation and BatchNorm settings; the target's
    encoder starts as a deep copy (model.target_init=copy). The projector and predictor come from the config
    (model.proj_hidden, model.proj_dim) on D. The run records model.arch=custom:<module>.<class>: continuing
    it, or loading its encoder, needs a model of that class again (``resume``, ``load_encoder(model=...)``).
    On a GPU, run.compile=auto compiles the step with ``fullgraph=True``: pass run__compile="off" for a model
    with graph breaks. With run.telemetry=on its FLOPs are counted on a ``meta`` copy (MFU left out if the meta
    device cannot run it).

    ``dataset``: a map-style ``torch.utils.data.Dataset`` (``__len__``, ``__getitem__``) whose items are PIL
    images or image tensors ([3, H, W] float in [0, 1], or uint8), alone or as ``(image, label)``; any size (the
    random crop resizes to data.image_size). An integer label is the online probe's target
    (model.online_probe=true; data.num_classes from the Dataset's ``classes`` where it has them), otherwise
    unused. One epoch is ``len(dataset)`` images (data.num_images). It is read by the torch DataLoader path
    (data.loader=auto picks it; data.loader=dali, which decodes files, is refused in one line), in data.workers
    processes: forked on Linux; where workers are spawned (macOS, Windows) a Dataset class defined in a notebook
    cannot be imported by them, so use data__workers=0 there.

    ``resume``: None starts a new run (run.out_dir/run.name, by default <preset>-<time>); "auto" continues the
    run at run.out_dir/run.name if it has a checkpoint, else starts it, as ``--resume auto`` (the same call
    twice: the config must match the saved one outside the keys a resumed run may change); a run directory or
    checkpoint file continues that run with its saved config, as ``--resume PATH`` (``config_or_preset`` must
    then be None). Pass the run's model class and dataset again: a model whose parameter shapes differ from the
    checkpoint's, or a dataset of another length, stops in one line.

    ``overrides``: config keys, ``section__field=value`` (double underscore for the dot: ``optim__batch_size=32``,
    a dict entry ``model__timm_kwargs__drop_path_rate=0.1``) or the dotted key through a dict
    (``**{"optim.batch_size": 32}``); ``fastbyol.config.valid_keys()`` lists them. An unknown key, an invalid
    value or a key the model or dataset sets to another value stops before any work, in one line
    (``FastByolError``). A stop signal (SIGTERM, Ctrl-C) ends the run after a checkpoint with
    ``fastbyol.errors.RunStopped``.
    """
    values = _dotted(overrides)
    images = DatasetImages(dataset) if dataset is not None else None
    parts = UserParts(model, images)
    if resume is not None and str(resume) != "auto":
        if config_or_preset is not None:
            raise FastByolError(f"resume={str(resume)!r} continues a run with its saved config: pass "
                                "config_or_preset=None (overrides of run.* and data.workers/path are allowed), or "
                                "use resume='auto' with run__name")
        trainer = resume_run(str(resume), [f"{key}={_text(value)}" for key, value in values.items()], parts)
    else:
        cfg = _config(config_or_preset, {**values, **_given(values, model, images)})
        if cfg.model.online_probe and images is not None and not images.labelled:
            raise FastByolError("model.online_probe=true needs labels: the dataset's items are images without an "
                                "integer label; return (image, label) pairs, or set model__online_probe=False")
        trainer = auto_resume(cfg, parts)[0] if resume is not None else start_run(cfg, parts)
    try:
        trainer.train()
    finally:
        shutdown(trainer.ctx)
    return trainer.run_dir


def load_encoder(run_dir_or_checkpoint: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The ONLINE encoder of a run directory (its newest valid checkpoint) or checkpoint file, never the
    target: in eval mode, on the CPU, mapping images [B, 3, H, W] (normalised with ImageNet's mean and std) to
    features [B, D].

    Without ``model``, the encoder ``model.arch`` names (a ``fastbyol.model.backbone.Encoder``: a torchvision
    ResNet or a timm model). With ``model``, the checkpoint's online encoder weights are loaded into it (under
    its own parameter names, strictly) and it is returned: needed for a run trained on a model of your own
    (model.arch=custom:...), whose encoder the config cannot build. A checkpoint that does not fit the model
    stops in one line (``FastByolError``).
    """
    target = str(run_dir_or_checkpoint)
    if model is None:
        encoder, _ = encoder_from_checkpoint(target)
        return encoder.eval()
    _, state = checkpoint.resolve_resume(target)
    weights = {k.removeprefix("net."): v for k, v in online_encoder_state(state["model"]).items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise FastByolError(f"checkpoint {target} does not fit the model given ({type(model).__qualname__}): "
                            f"{state_mismatch(e)}") from None
    return model.cpu().eval()


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """``optim__batch_size`` or ``optim.batch_size`` -> ``optim.batch_size``; an unknown key stops in one line,
    naming the nearest valid one as it was written."""
    keys = valid_keys()
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        key = name.replace("__", ".")
        if ".".join(key.split(".")[:2]) not in keys:
            near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            spelt = [k.replace(".", "__") if "." not in name else k for k in near]
            hint = f"did you mean {spelt[0]}? " if spelt else ""
            raise FastByolError(f"unknown config key {name!r}: {hint}keys are section__field, e.g. "
                                "optim__batch_size=32 (or **{'optim.batch_size': 32}); "
                                "fastbyol.config.valid_keys() lists them")
        out[key] = value
    return out


def _given(values: dict[str, Any], model: nn.Module | None, images: DatasetImages | None) -> dict[str, Any]:
    """The keys the model and the dataset decide; an override that says otherwise stops in one line."""
    given: dict[str, Any] = {}
    if model is not None:
        given["model.arch"] = custom_arch(model)
        given["model.target_init"] = "copy"  # a given model has one initialisation: the target copies it
    if images is not None:
        given["data.source"] = "dataset"
        given["data.num_images"] = len(images)
        if images.classes is not None:
            given["data.num_classes"] = len(images.classes)
    for key, value in given.items():
        if key in values and _text(values[key]) != _text(value):
            what = "model" if key.startswith("model.") else "dataset"
            raise FastByolError(f"{key}={values[key]!r} does not go with the {what} given, which sets "
                                f"{key}={value!r}: drop that override")
    return given


def _config(config_or_preset: str | Path | Config | None, values: dict[str, Any]) -> Config:
    """A preset, a YAML file or a Config, then ``values``; validated, as ``fastbyol train`` builds it."""
    if isinstance(config_or_preset, Config):
        cfg = copy.deepcopy(config_or_preset)
        for key, value in values.items():
            set_key(cfg, key, value)
        return cfg.validate()
    texts = [f"{key}={_text(value)}" for key, value in _entries(values).items()]
    if config_or_preset is None:
        return build_config(None, None, texts)
    if isinstance(config_or_preset, Path) or config_or_preset.endswith((".yaml", ".yml")):
        return build_config(None, str(config_or_preset), texts)
    return build_config(config_or_preset, None, texts)


def _entries(values: dict[str, Any]) -> dict[str, Any]:
    """A dict given for a dict field (``model.timm_kwargs``) as its entries, the form key=value text takes."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key.count(".") == 1:
            out.update({f"{key}.{entry}": v for entry, v in value.items()})
        else:
            out[key] = value
    return out


def _text(value: Any) -> str:
    """A Python value as the command line writes it; ``set_key`` reads it back to the field's type (YAML reads
    the JSON of a list or a dict entry's value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)
