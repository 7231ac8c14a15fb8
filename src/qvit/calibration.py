"""Calibration: run data through a prepared model so every quantizer sets its parameters."""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Iterator, List, Optional, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .backend import get_backend
from .models.prepare import iter_quantizers

Batches = Union[torch.Tensor, Iterable, Callable[[nn.Module], Any]]


def iter_batches(data: Batches, batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Inputs from a tensor ``[N, C, H, W]`` (split into batches) or an iterable of ``x`` / ``(x, y)``."""
    if callable(data) and not torch.is_tensor(data):
        raise TypeError("these steps need the calibration images themselves, not a forward loop")
    if torch.is_tensor(data):
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def calibrate(model: nn.Module, data: Batches, *, sequential: bool = False, batch_size: int = 32,
              weights_only: bool = False, progress: bool = True, device: Optional[torch.device] = None) -> nn.Module:
    """Calibrate every uncalibrated quantizer of a prepared ``model`` on ``data``.

    ``sequential=False`` (default): all activation quantizers observe the float network on every batch,
    then set their parameters from what they saw. ``sequential=True``: each quantizer calibrates on the
    first batch that reaches it, so later sites see the already-quantized outputs of earlier ones
    (RepQ-ViT's single-batch initialisation); a tensor ``data`` is then run as one batch, and of an
    iterable only the first batch is used. Weight quantizers always calibrate on the weights
    themselves. Quantizers that are already calibrated are left as they are (``reset`` them first to
    re-calibrate). With ``weights_only`` activation quantizers are not touched.

    ``data`` may also be a forward loop ``fn(model)`` that runs the calibration data through the model itself
    (``sequential``: its first batch calibrates the sites it reaches).
    """
    pending = [(site, q) for site, _, q in iter_quantizers(model) if not bool(q.calibrated)]
    if weights_only:
        pending = [(s, q) for s, q in pending if q.for_weights]
    if not pending:
        return model
    was_training = model.training
    model.eval()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for _, q in pending:
        if sequential:
            q.calibrate_lazily = True
        else:
            q.observing = True
    try:
        seen = 0
        if weights_only:
            pass
        elif callable(data) and not torch.is_tensor(data):
            data(model)
            seen = 1
        else:
            if sequential and torch.is_tensor(data):
                batch_size = data.shape[0]
            total = (data.shape[0] + batch_size - 1) // batch_size if torch.is_tensor(data) else None
            batches = iter_batches(data, batch_size)
            for x in tqdm(batches, total=total, desc="calibrate", disable=not progress, file=sys.stderr,
                          leave=False):
                model(x.to(device))
                seen += 1
                if sequential:
                    break
        if seen == 0 and not weights_only:
            raise ValueError("calibrate() got no data")
        for site, q in pending:
            if q.for_weights and not bool(q.calibrated):
                module_weight = _weight_of(model, site)
                if module_weight is not None:
                    q.calibrate(module_weight.detach())
            if q.observing and not q.for_weights:
                if q.has_observations():
                    q.finalize()
                elif not weights_only:
                    warnings.warn(f"quantizer {site} saw no calibration data (its module never ran)")
    finally:
        for _, q in pending:
            q.observing = False
            q.calibrate_lazily = False
        model.train(was_training)
        get_backend().release()      # the observed samples and range searches are gone: give their memory back
    return model


def _weight_of(model: nn.Module, site: str) -> Optional[torch.Tensor]:
    module_name, _, slot = site.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, slot, None) if isinstance(getattr(module, slot, None), torch.Tensor) else None


def uncalibrated_sites(model: nn.Module) -> List[str]:
    """Sites whose quantizer is enabled but not calibrated."""
    return [site for site, _, q in iter_quantizers(model) if not bool(q.calibrated)]
