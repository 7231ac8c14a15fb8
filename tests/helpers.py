"""Small data sets and models the tests make on the fly."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """A Fashion-MNIST-shaped folder of random 28x28 images with labels 0..9."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """An ImageNet-style folder: ``root/{train,val}/<class>/<i>.png`` with class-coloured RGB images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                img[..., c % 3] += 150
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def softmax_data(shape=(2, 3, 16, 16), seed: int = 0, temperature: float = 2.5):
    """Seeded attention-probability-like data: softmax over the last dim of Gaussian logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * temperature).softmax(-1)


def rebuild_and_compare(q, y):
    """Rebuild ``q`` from its config and state_dict; check the copy quantizes ``y`` identically. Returns it."""
    import torch

    from qvit.quantizers import create_quantizer

    fresh = create_quantizer(q.config())
    assert type(fresh) is type(q) and fresh.config() == q.config()
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(y), q(y))
    assert torch.equal(fresh.quantize(y), q.quantize(y))
    return fresh


def statsq_test_vit(w_bits: int = 2, a_bits: int = 4, qkr: bool = True):
    """timm's ``test_vit`` (32 px) prepared with StatsQ weights and LSQ activations and, with ``qkr``, OFQ's
    query-key reparameterization (``transforms``), calibrated on random images."""
    import timm
    import torch

    import qvit
    torch.manual_seed(0)
    model = qvit.prepare(timm.create_model("test_vit", img_size=32), {
        "weight": {"kind": "statsq", "granularity": "channel", "axis": 0},
        "activation": {"kind": "lsq", "symmetric": True, "init": "lsq"}, "w_bits": w_bits, "a_bits": a_bits,
        "roles": {"attn.qkx": {"granularity": "channel", "axis": 1}},
        "transforms": ["query_key_reparameterization"] if qkr else []})
    qvit.calibrate(model, torch.randn(4, 3, 32, 32), progress=False)
    return model
