"""Multi-crop KD: crops, soft-label files (full and top-k), and training with them."""
import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import qvit
from qvit.qat import QATTrainer, TrainConfig, copy_teacher
from qvit.qat.multicrop import SoftLabels, apply_crops, random_boxes, save_soft_labels


def test_full_box_crop_is_the_image_and_flip_mirrors_it():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(2, 2, 4)
    flips = torch.tensor([[False, True], [False, True]])
    out = apply_crops(x, boxes, flips)
    assert out.shape == (4, 1, 6, 6)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], x[0].flip(-1))
    torch.testing.assert_close(out[2], x[1])
    # a 3x3 corner resized to 6x6 is torchvision's bilinear resized crop (no antialiasing), except on the far
    # border, where the continuous box also reads the pixels just outside it instead of repeating the edge
    half = apply_crops(x[:1], torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), torch.tensor([[False]]))
    from torchvision.transforms.functional import resized_crop
    ref = resized_crop(x[0], 0, 0, 3, 3, [6, 6], antialias=False)
    torch.testing.assert_close(half[0, :, :5, :5], ref[:, :5, :5])


def test_random_boxes_respect_scale_and_image():
    b = random_boxes(2000, torch.Generator().manual_seed(0), scale=(0.25, 0.5))
    y0, x0, h, w = b.unbind(1)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 1 + 1e-6).all() and (x0 + w <= 1 + 1e-6).all()
    area = h * w
    assert area.max() <= 0.5 + 1e-5 and (area >= 0.25 - 1e-5).float().mean() > 0.9   # clipping may shrink a few


@pytest.mark.parametrize("topk", [None, 2])
def test_soft_label_file_round_trip(tmp_path, topk):
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    data = TensorDataset(torch.randn(6, 1, 4, 4), torch.zeros(6, dtype=torch.long))
    path = save_soft_labels(teacher, data, tmp_path / "soft.safetensors", crops=3, topk=topk, batch_size=4,
                            progress=False)
    sl = SoftLabels(path)
    assert len(sl) == 6 and sl.crops_per_image == 3 and sl.num_classes == 4
    index, crop = torch.tensor([1, 4]), torch.tensor([[0, 2], [1, 1]])
    probs = sl.labels(index, crop)
    assert probs.shape == (2, 2, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2), atol=2e-3, rtol=0)
    x = torch.stack([data[i][0] for i in (1, 4)])
    with torch.no_grad():
        exact = teacher(apply_crops(x, sl.boxes[index[:, None], crop], sl.flips[index[:, None], crop])).softmax(-1)
    exact = exact.reshape(2, 2, 4)
    if topk is None:
        torch.testing.assert_close(probs, exact, atol=2e-3, rtol=0)
    else:   # the two largest kept, the rest shared evenly
        top = exact.topk(2, -1)
        torch.testing.assert_close(probs.gather(-1, top.indices), top.values, atol=2e-3, rtol=0)
    with pytest.raises(FileNotFoundError):
        SoftLabels(tmp_path / "missing.safetensors")


def _setup():
    torch.manual_seed(0)
    fp = timm.create_model("test_vit", img_size=32, num_classes=4).eval()
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 4, (16,), generator=gen))
    teacher = copy_teacher(fp)
    model = qvit.prepare(fp, {"weight": {"kind": "lsq"}, "activation": {"kind": "lsq", "symmetric": True},
                              "w_bits": 4, "a_bits": 4})
    qvit.calibrate(model, data.tensors[0][:8], progress=False)
    return model, teacher, data


def test_training_with_online_and_file_soft_labels(tmp_path):
    model, teacher, data = _setup()
    cfg = dict(epochs=1, batch_size=4, lr=1e-3, loss="kd", crops=3, log_every=1)
    result = QATTrainer(model, teacher, data, config=TrainConfig(**cfg), out_dir=tmp_path / "online",
                        progress=False).fit()
    assert result["steps"] == 4
    path = save_soft_labels(teacher, data, tmp_path / "soft.safetensors", crops=5, progress=False)
    model, _, data = _setup()
    trainer = QATTrainer(model, None, data, config=TrainConfig(**cfg, soft_labels=str(path)),
                         out_dir=tmp_path / "file", progress=False)
    assert trainer.fit()["steps"] == 4
    with pytest.raises(ValueError, match="stores 5"):
        QATTrainer(model, None, data, config=TrainConfig(**{**cfg, "crops": 6}, soft_labels=str(path)),
                   out_dir=tmp_path / "x", progress=False)
