"""Linear evaluation on frozen features (BYOL.md, "Evaluation protocol"; official ``configs/eval.py``).

SGD with Nesterov momentum 0.9, lr 0.2 * batch / 256 with cosine decay, no weight decay, 80 epochs.
The fast path trains on features precomputed once from centre views (augmentation off); the spec's
protocol (``epoch_features``) recomputes the training features every epoch from fresh random-resized-crop
+ flip views of the training images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastbyol.eval.knn import topk_accuracy
from fastbyol.lr import half_cosine, set_lr


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 80, batch_size: int = 256, base_lr: float = 0.2,
                 seed: int = 0, epoch_features: Callable[[int], torch.Tensor] | None = None) -> dict[str, float]:
    """Train on ``train_f`` (or ``epoch_features(epoch)``, same row order as ``train_y``); report top-1/5 %."""
    gen = torch.Generator().manual_seed(seed)
    # Standardise with training statistics: a linear map, so the probe class is unchanged, but SGD's
    # lr no longer depends on the feature scale (random-init and trained encoders differ by 10x).
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    train_x, test_x = (train_f - mean) / std, (test_f - mean) / std
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        if epoch_features is not None:
            train_x = (epoch_features(epoch) - mean) / std
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            set_lr(opt, lr * half_cosine(step, total))
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        scores = head(test_x)
        train_scores = head(train_x)
    return {"top1": topk_accuracy(scores, test_y, 1), "top5": topk_accuracy(scores, test_y, 5),
            "train_top1": topk_accuracy(train_scores, train_y, 1)}
