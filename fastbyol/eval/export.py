"""Export the online encoder as a torchvision or timm state_dict (``.pth``) and as safetensors.

``torchvision.models.resnet50().load_state_dict(torch.load(path), strict=False)`` accepts a ResNet's file
with only ``fc.weight``/``fc.bias`` missing; for ``model.arch=timm:<name>``,
``timm.create_model(name, pretrained=False, img_size=...)`` (the ``image_size`` the metadata records, for
models that take one) accepts it with only the classifier missing. The online encoder is exported, never the
target (BYOL.md, Pitfalls).

Two encoders export under torchvision's names but are not torchvision's network, and ``torchvision_notes`` says so
(the file's metadata and ``fastbyol export`` carry the notes): the official ResNet-18/34 (``model.init=haiku``) has
a projection shortcut in layer1[0] (``layer1.0.downsample.*``), which torchvision's model must be given before it
loads the file; and ``model.padding=same`` weights load into torchvision's model as they are but were trained with
TF's asymmetric padding, which torchvision's symmetric padding does not reproduce.
"""

from __future__ import annotations

import torch

from fastbyol.config import ModelConfig
from fastbyol.model.backbone import Encoder, has_official_shortcut

ENCODER_PREFIX = "online.encoder."


def online_encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online encoder's tensors of a ByolPair state_dict, under the Encoder's own names."""
    return {k.removeprefix(ENCODER_PREFIX): v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}


def export_state(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in encoder.export_state_dict().items()}


def export_bytes(encoder: Encoder, metadata: dict[str, str]) -> dict[str, bytes]:
    """The file contents: ``{".pth": torch.save bytes, ".safetensors": safetensors bytes}``."""
    import io

    from safetensors.torch import save as safetensors_save

    state = export_state(encoder)
    buf = io.BytesIO()
    torch.save(state, buf)
    return {".pth": buf.getvalue(), ".safetensors": safetensors_save(state, metadata=metadata)}


def torchvision_notes(cfg: ModelConfig) -> list[str]:
    """How an export of ``cfg``'s encoder differs from torchvision's model of the same name (empty: it does not)."""
    notes = []
    if has_official_shortcut(cfg.arch, cfg.init):
        notes.append(f"the official {cfg.arch} (model.init=haiku) has a projection shortcut in layer1[0] "
                     f"(layer1.0.downsample.*) that torchvision's {cfg.arch} lacks: give it one before loading, "
                     "m.layer1[0].downsample = nn.Sequential(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64)), "
                     "or load the run with fastbyol.load_encoder(RUN_DIR)")
    if cfg.padding == "same":
        notes.append("model.padding=same: torchvision's ResNet loads these weights but pads stride-2 windows "
                     "symmetrically, so its features differ from the trained network's; fastbyol.load_encoder(RUN_DIR) "
                     "pads as TF's SAME")
    return notes
