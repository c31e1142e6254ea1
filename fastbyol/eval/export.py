"""Export the online encoder as a torchvision or timm state_dict (``.pth``) and as safetensors.

``torchvision.models.resnet50().load_state_dict(torch.load(path), strict=False)`` accepts a ResNet's file
with only ``fc.weight``/``fc.bias`` missing; for ``model.arch=timm:<name>``,
``timm.create_model(name, pretrained=False, img_size=...)`` (the ``image_size`` the metadata records, for
models that take one) accepts it with only the classifier missing. The online encoder is exported, never the
target (BYOL.md, Pitfalls).
"""

from __future__ import annotations

import torch

from fastbyol.model.backbone import Encoder

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
