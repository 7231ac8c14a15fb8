import numpy as np
import pytest
import timm
import torch

import qvit
from qvit.data import (DatasetMissingError, FashionMNIST, build_dataset, calibration_batch, create_eval_transform,
                       load_fashion_mnist, resolve_split_dir)
from qvit.data.fashion_mnist import read_idx
from tests.helpers import make_fashion_mnist, make_image_folder, write_idx


def test_fashion_mnist_reader(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm")
    images, labels = load_fashion_mnist("train", root)
    assert images.shape == (40, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(40)]
    with qvit.settings(fashion_mnist=root):
        ds = FashionMNIST("test")
        train = FashionMNIST("train")
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == 3
    expected = (images[0].float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(train.tensors()[0][0, 0], expected)


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with qvit.settings(fashion_mnist=tmp_path), \
            pytest.raises(DatasetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNIST("test")


def test_truncated_idx_file_is_rejected(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    write_idx(path, np.zeros((3, 2, 2)))
    import gzip
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_image_folder_with_timm_eval_transform(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    model = timm.create_model("test_vit", num_classes=2)
    tf = create_eval_transform(model)
    ds = build_dataset(root, "val", tf)
    assert len(ds) == 8 and ds.classes == ["cat", "dog"]
    x, y = ds[5]
    assert x.shape == model.pretrained_cfg["input_size"] and y == 1
    # a 1-channel model gets grayscale input from the same RGB folder
    gray = timm.create_model("qvit_vit_tiny_fmnist")
    x1, _ = build_dataset(root, "train", create_eval_transform(gray))[0]
    assert x1.shape == (1, 28, 28)


def test_split_resolution(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    assert resolve_split_dir(root, "val").name == "val"
    assert resolve_split_dir(root / "train", "val") == root / "train"  # a folder of class folders
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_split_dir(tmp_path / "nope", "val")


def test_calibration_batch_is_seeded(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    tf = create_eval_transform(timm.create_model("test_vit"))
    ds = build_dataset(root, "train", tf)
    a, la = calibration_batch(ds, 3, seed=1)
    b, lb = calibration_batch(ds, 3, seed=1)
    c, _ = calibration_batch(ds, 3, seed=2)
    assert a.shape[0] == 3 and torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
