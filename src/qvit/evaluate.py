"""Top-1 / top-5 evaluation with a progress bar."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm


@dataclass
class EvalResult:
    """Accuracy in percent over ``n`` images."""

    top1: float
    top5: float
    n: int

    def __str__(self) -> str:
        return f"top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%  ({self.n} images)"


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: Optional[torch.device] = None, progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Top-1 and top-5 accuracy (%) of ``model`` over ``(images, labels)`` batches."""
    was_training = model.training
    model.eval()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct1 = correct5 = n = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    try:
        bar = tqdm(loader, total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False)
        for x, y in bar:
            logits = model(x.to(device))
            y = y.to(logits.device)
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(-1).sum().item()
            n += y.shape[0]
            bar.set_postfix(top1=f"{100.0 * correct1 / n:.2f}", refresh=False)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no data")
    return EvalResult(100.0 * correct1 / n, 100.0 * correct5 / n, n)
