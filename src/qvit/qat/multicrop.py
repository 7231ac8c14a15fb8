"""Multi-crop knowledge distillation (VVTQ, after FKD by Shen & Xing): every image contributes several random-resized
crops per step, each with its own soft label.

Soft labels come from the online float teacher (default) or from a precomputed file (:func:`save_soft_labels`), as
FKD's: for each training image ``S`` stored crops (relative boxes and flip flags) with the teacher's probabilities,
either in full (``probs`` ``[N, S, C]``) or as FKD's top-k "marginal smoothing" (``topk_index``/``topk_prob``
``[N, S, k]``; the remaining mass is spread evenly over the other classes). Each step samples ``crops`` of an image's
stored crops without replacement, re-applies them and uses their labels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torchvision.ops import roi_align


def random_boxes(n: int, generator: torch.Generator, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes ``(y0, x0, h, w)`` in relative units ``[n, 4]`` (area in ``scale``, aspect in
    ``ratio`` log-uniform; sides clipped to the image)."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    y0 = torch.rand(n, generator=generator) * (1 - h)
    x0 = torch.rand(n, generator=generator) * (1 - w)
    return torch.stack([y0, x0, h, w], dim=1)


def apply_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop ``images`` ``[B, C, H, W]`` with relative ``boxes`` ``[B, K, 4]`` (continuous coordinates, bilinear
    sampling at the output pixel centres), resize each crop back to ``H x W``
    (bilinear) and flip where ``flips`` ``[B, K]``; returns ``[B*K, C, H, W]`` (image-major)."""
    b, _, h, w = images.shape
    k = boxes.shape[1]
    rel = boxes.reshape(-1, 4).to(images.dtype)
    idx = torch.arange(b, device=images.device).repeat_interleave(k).to(images.dtype)
    y0, x0 = rel[:, 0] * h, rel[:, 1] * w
    y1, x1 = y0 + rel[:, 2] * h, x0 + rel[:, 3] * w
    rois = torch.stack([idx, x0, y0, x1, y1], dim=1).to(images.device)
    out = roi_align(images, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    flip = flips.reshape(-1).to(torch.bool).to(images.device)
    out[flip] = out[flip].flip(-1)
    return out


class SoftLabels:
    """A precomputed soft-label file (see the module docstring)."""

    def __init__(self, path: Union[str, Path]) -> None:
        from safetensors.torch import load_file
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"soft-label file {path} does not exist")
        data = load_file(str(path))
        if "boxes" not in data or "flips" not in data or not ({"probs"} <= set(data)
                                                              or {"topk_index", "topk_prob", "num_classes"} <= set(data)):
            raise ValueError(f"{path} is not a qvit soft-label file (needs boxes, flips and probs or top-k entries)")
        self.boxes, self.flips = data["boxes"].float(), data["flips"].bool()
        self.probs = data.get("probs")
        self.topk_index, self.topk_prob = data.get("topk_index"), data.get("topk_prob")
        self.num_classes = int(data["num_classes"]) if "num_classes" in data else int(self.probs.shape[-1])

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def crops_per_image(self) -> int:
        return self.boxes.shape[1]

    def labels(self, index: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[B, K, C]`` of stored crops ``crop`` ``[B, K]`` of images ``index`` ``[B]``."""
        if self.probs is not None:
            return self.probs[index[:, None], crop].float()
        k = self.topk_index.shape[-1]
        top_i = self.topk_index[index[:, None], crop].long()
        top_p = self.topk_prob[index[:, None], crop].float()
        rest = ((1 - top_p.sum(-1, keepdim=True)) / max(1, self.num_classes - k)).clamp(min=0)
        out = rest.expand(*top_i.shape[:2], self.num_classes).clone()
        return out.scatter(-1, top_i, top_p)


@torch.no_grad()
def save_soft_labels(teacher: nn.Module, dataset: Dataset, path: Union[str, Path], *, crops: int = 16,
                     scale: Tuple[float, float] = (0.08, 1.0), topk: Optional[int] = None, seed: int = 0,
                     batch_size: int = 64, progress: bool = True) -> Path:
    """Precompute ``crops`` random-resized crops per image of ``dataset`` and the teacher's probabilities for each.

    ``topk``: store only the ``k`` largest probabilities per crop (FKD's marginal smoothing) instead of all of them.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    teacher.eval()
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    n = len(dataset)
    all_boxes, all_flips, all_probs = [], [], []
    for start in tqdm(range(0, n, batch_size), desc="soft labels", disable=not progress):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it[0] for it in items])
        boxes = random_boxes(x.shape[0] * crops, gen, scale).reshape(x.shape[0], crops, 4)
        flips = torch.rand(x.shape[0], crops, generator=gen) < 0.5
        probs = teacher(apply_crops(x, boxes, flips).to(device)).softmax(-1).cpu()
        all_boxes.append(boxes)
        all_flips.append(flips)
        all_probs.append(probs.reshape(x.shape[0], crops, -1))
    probs = torch.cat(all_probs)
    data: Dict[str, torch.Tensor] = {"boxes": torch.cat(all_boxes), "flips": torch.cat(all_flips).to(torch.uint8),
                                     "num_classes": torch.tensor(probs.shape[-1])}
    if topk is None:
        data["probs"] = probs.to(torch.float16)
    else:
        values, index = probs.topk(topk, dim=-1)
        data["topk_index"], data["topk_prob"] = index.to(torch.int32), values.to(torch.float16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(data, str(path))
    return path
