"""Fused Triton kernels, installed as ``fastbyol.kernels``; each file holds a kernel beside its
plain-PyTorch reference ``<name>_ref`` with the same signature.

The references the kernels must match live with the math today: ``fastbyol.step.ema.ema_ref``,
``fastbyol.step.loss.byol_loss``, ``fastbyol.step.lars.lars_ref``.
"""
