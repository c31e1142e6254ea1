"""One training step of two runs from the same state: the comparison the kernels-on-against-off tests make."""

from __future__ import annotations

from fastbyol.data.views import Batch
from fastbyol.engine.trainer import IntervalMeter, Trainer


def step_from_the_same_state(off: Trainer, on: Trainer, batch: Batch) -> None:
    """Load the reference run's model and optimizer state into ``on``, then one optimizer step of each on
    ``batch``, so differences between their paths cannot compound across steps."""
    on.pair.load_state_dict(off.pair.state_dict())
    on.optimizer.load_state_dict(off.optimizer.state_dict())
    for t in (off, on):
        t.optimizer.zero_grad(set_to_none=True)
        t.meter = IntervalMeter()
        t.forward_backward_step(batch, 1.0)
        t.update()
        t.step += 1
