"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: qvit's embedded default data."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..runtime import get_settings

INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN = (0.2860,)
STD = (0.3530,)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissingError(FileNotFoundError):
    """Raised when the Fashion-MNIST files cannot be found."""


def fashion_mnist_root(root: Optional[os.PathLike] = None) -> Path:
    """The folder holding the idx files: ``root``, else the ``fashion_mnist`` setting (``$QVIT_FASHION_MNIST``, by
    default Debian's path)."""
    return Path(root) if root is not None else get_settings().fashion_mnist


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        path = root / name
        if path.is_file():
            return path
    raise DatasetMissingError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in {root}. Install the embedded default data with "
        f"'{INSTALL_HINT}', or point $QVIT_FASHION_MNIST at a folder holding the idx files.")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type 0x{dtype_code:02x})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: truncated idx file ({len(data) - offset} of {expected} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(split: str, root: Optional[os.PathLike] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load a split as ``(images uint8 [N, 28, 28], labels int64 [N])``."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = fashion_mnist_root(root)
    img_stem, lbl_stem = _FILES[split]
    images = torch.from_numpy(read_idx(_find(folder, img_stem)).copy())
    labels = torch.from_numpy(read_idx(_find(folder, lbl_stem)).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels in split {split!r}")
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST split as a map-style dataset of ``(image, label)``.

    Without a transform an image is a float tensor [1, 28, 28] normalized with the data set's mean/std.
    With one, the transform receives a ``PIL.Image`` (mode ``L``), as torchvision transforms expect.
    """

    classes = CLASSES

    def __init__(self, split: str = "train", root: Optional[os.PathLike] = None,
                 transform: Optional[Callable] = None) -> None:
        self.split = split
        self.images, self.labels = load_fashion_mnist(split, root)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is None:
            x = (image.float().div(255.0).unsqueeze(0) - MEAN[0]) / STD[0]
        else:
            from PIL import Image
            x = self.transform(Image.fromarray(image.numpy(), mode="L"))
        return x, int(self.labels[index])

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All images normalized as ``float [N, 1, 28, 28]`` and labels ``int64 [N]`` (no transform)."""
        x = (self.images.float().div(255.0).unsqueeze(1) - MEAN[0]) / STD[0]
        return x, self.labels.clone()
