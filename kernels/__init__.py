"""Fused Triton kernels, installed as ``fastbyol.kernels``; each file holds a kernel beside its
plain-PyTorch reference with the same signature, registered as a torch.library custom op:

- ``byol_loss``: normalise + 2 - 2cos for both directions, forward and backward (``byol_loss_ref``).
- ``ema``: the target EMA over one flat buffer in one launch, tau read from a device tensor
  (``ema_flat_ref``).
- ``ntxent``: SimCLR's NT-Xent, normalise + tiled logits + masked logsumexp, forward and backward (``ntxent_ref``).

They are tested against their references under ``TRITON_INTERPRET=1``; the training step does not call
them yet (issue 4 wires them in behind a ``kernels=on|off`` switch).
"""
