import pytest
import timm
import torch

import qvit
from qvit.data import FashionMNIST
from qvit.models.reference import (REFERENCE_MODEL, reference_weights_id, reference_weights_metadata,
                                   reference_weights_path)

#: The shipped weights' recorded Fashion-MNIST test top-1 must reach this (%).
MIN_REFERENCE_TOP1 = 90.0


def test_reference_model_is_a_registered_timm_vit():
    model = timm.create_model(REFERENCE_MODEL)
    assert type(model).__name__ == "VisionTransformer"
    assert model.embed_dim == 192 and model.blocks[0].attn.num_heads == 3
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_shipped_weights_and_their_metadata():
    assert reference_weights_path() is not None, "run scripts/train_reference.py"
    meta = reference_weights_metadata()
    assert meta["test_top1"] >= MIN_REFERENCE_TOP1
    assert meta["model"] == REFERENCE_MODEL and meta["history"][-1]["test_top1"] == meta["test_top1"]


def test_weights_id_is_the_files_sha256_prefix():
    import hashlib
    digest = hashlib.sha256(reference_weights_path().read_bytes()).hexdigest()
    assert reference_weights_id() == digest[:16]


@pytest.mark.slow
def test_reference_accuracy_and_w8a8_ptq():
    model = qvit.create_reference_model()
    x, y = FashionMNIST("test").tensors()
    x, y = x[:2000], y[:2000]
    with torch.no_grad():
        fp = (model(x).argmax(-1) == y).float().mean().item() * 100
    assert fp >= 88.0
    calib = FashionMNIST("train").tensors()[0][:32]
    q = qvit.quantize_ptq(model, "minmax", calib, w_bits=8, a_bits=8, progress=False)
    with torch.no_grad():
        acc8 = (q(x).argmax(-1) == y).float().mean().item() * 100
    assert abs(acc8 - fp) <= 1.0
