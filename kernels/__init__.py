"""Fused Triton kernels, installed as ``fastbyol.kernels``; each file holds a kernel beside its
plain-PyTorch reference with the same signature, registered as a torch.library custom op:

- ``byol_loss``: normalise + 2 - 2cos for both directions, forward and backward (``byol_loss_ref``).
- ``ema``: the target EMA over one flat buffer in one launch, tau read from a device tensor
  (``ema_flat_ref``).
- ``lars``: LARS over one flat buffer in three launches, the target EMA fused into the last
  (``lars_flat_ref``, ``lars_ema_flat_ref``), and its sharded form for ZeRO.
- ``ntxent``: SimCLR's NT-Xent, normalise + tiled logits + masked logsumexp, forward and backward (``ntxent_ref``).
- ``launch``: what the launchers share; ``target_of`` picks interpreter or GPU tiles, ``compiling_for`` lets
  ``benchmarks/aot_compile.py`` capture what a GPU of a given capability would run.

The training step uses them with ``run.kernels=on`` (the default on a GPU). They are tested against their
references under ``TRITON_INTERPRET=1`` and compiled for sm_80..sm_120 ahead of time in CI.
"""
