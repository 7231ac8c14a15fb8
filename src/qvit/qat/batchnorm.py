"""Batch-norm re-estimation (Nagel et al. 2022): after QAT moved the weights, the running statistics of batch-norm
layers no longer match the quantized network; recompute them before evaluating."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable, num_batches: int = 50) -> int:
    """Replace every batch-norm layer's running mean/var by their average over ``num_batches`` batches.

    Only the batch-norm layers run in training mode (dropout and friends stay in eval); momentum is set to ``None``
    (cumulative average) for the pass and restored after. Returns the number of batches used (0 when the model has
    no batch-norm layer).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
            used += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError("reestimate_bn got no batches")
    return used
