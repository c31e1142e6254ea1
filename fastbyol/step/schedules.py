"""Learning-rate and target-decay schedules (BYOL.md, "Schedules"; official ``utils/schedules.py``).

Schedules are data: precomputed per optimizer step, so resume is exact and tests read them directly.
k is the optimizer step (0-based), K the total number of steps.
"""

from __future__ import annotations

import numpy as np

from fastbyol.lr import half_cosine


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    peak_lr = base_lr * batch_size / 256 (the caller scales it)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    k = min(step - warmup_steps, decay_steps)
    return peak_lr * half_cosine(k, decay_steps)


def tau_at(step: int, *, total_steps: int, tau_base: float) -> float:
    """tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2: tau_base at k=0, 1 at k=K."""
    return 1.0 - (1.0 - tau_base) * half_cosine(step, total_steps)


def lr_schedule(total_steps: int, warmup_steps: int, peak_lr: float) -> np.ndarray:
    return np.array([lr_at(k, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr)
                     for k in range(total_steps + 1)], dtype=np.float64)


def tau_schedule(total_steps: int, tau_base: float) -> np.ndarray:
    return np.array([tau_at(k, total_steps=total_steps, tau_base=tau_base)
                     for k in range(total_steps + 1)], dtype=np.float64)


def warmup_steps_for(warmup_epochs: float, images_per_epoch: int, batch_size: int) -> int:
    """Official: ``warmup_epochs * num_examples // batch_size``."""
    return int(warmup_epochs * images_per_epoch) // batch_size
