"""Build the evaluation / calibration data sets: the embedded Fashion-MNIST or an ImageNet-style folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .fashion_mnist import FashionMNIST

#: Sub-folder names tried for each split of an ImageNet-style folder.
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "test")}


def resolve_split_dir(root: os.PathLike, split: str) -> Path:
    """The folder of ``split`` inside ``root`` (``root/train``, ``root/val`` ...), or ``root`` itself if it
    directly holds class folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    for name in SPLIT_DIRS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if subdirs and not any(p.name in ("train", "val", "validation", "test") for p in subdirs):
        return root
    raise FileNotFoundError(f"no '{split}' split in {root} (looked for {', '.join(SPLIT_DIRS.get(split, (split,)))})")


def build_dataset(data: Optional[os.PathLike], split: str, transform: Optional[Callable]) -> Dataset:
    """``data=None``: the embedded Fashion-MNIST (``split`` ``train`` or ``val``/``test``);
    otherwise an ImageNet-style folder of class sub-folders (``root/<split>/<class>/<image>``)."""
    if data is None:
        return FashionMNIST("train" if split == "train" else "test", transform=transform)
    from torchvision.datasets import ImageFolder

    folder = resolve_split_dir(data, split)
    dataset = ImageFolder(str(folder), transform=transform)
    if len(dataset) == 0:
        raise FileNotFoundError(f"no images found in {folder}")
    return dataset


def subset(dataset: Dataset, num: Optional[int], seed: int = 0) -> Dataset:
    """A seeded random subset of ``num`` items (the whole set when ``num`` is None or too large)."""
    if num is None or num >= len(dataset):
        return dataset
    if num <= 0:
        raise ValueError(f"subset size must be positive, got {num}")
    gen = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=gen)[:num].tolist())


def create_loader(dataset: Dataset, batch_size: int = 128, workers: int = 0, shuffle: bool = False,
                  seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=gen)


def calibration_batch(dataset: Dataset, num: int = 32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num`` images from ``dataset`` (the first ``num`` of a seeded shuffle, as the PTQ papers do),
    stacked as ``(images [num, C, H, W], labels [num])``."""
    items = subset(dataset, num, seed)
    xs, ys = zip(*(items[i] for i in range(len(items))))
    return torch.stack(xs), torch.tensor(ys)
