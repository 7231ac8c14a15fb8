import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_reference.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_cnn_shape_and_size(script):
    cnn = script.cnn_fmnist()
    assert cnn(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in cnn.parameters()) == 288170


def test_hard_distillation_is_cross_entropy_against_the_teachers_top1(script):
    logits = torch.randn(6, 10)
    teacher = torch.randn(6, 10)
    expected = F.cross_entropy(logits, teacher.argmax(-1))
    assert torch.allclose(script.distill_loss(logits, teacher, "hard", 3.0), expected)


def test_soft_distillation_matches_the_tempered_kl(script):
    logits, teacher, t = torch.randn(4, 10), torch.randn(4, 10), 2.0
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits / t, -1))).sum(-1).mean() * t * t
    assert torch.allclose(script.distill_loss(logits, teacher, "soft", t), kl, atol=1e-6)
    assert script.distill_loss(teacher, teacher, "soft", t).abs() < 1e-6


def test_teacher_file_must_come_from_the_cnn_arch(script, tmp_path):
    import json
    cnn = script.cnn_fmnist()
    good = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(good),
              metadata={"qvit": json.dumps({"model": "cnn_fmnist"})})
    teacher, meta = script.load_teacher(good)
    assert meta == {"model": "cnn_fmnist"}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    bad = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(bad),
              metadata={"qvit": json.dumps({"model": "qvit_vit_tiny_fmnist"})})
    with pytest.raises(SystemExit, match="not a teacher"):
        script.load_teacher(bad)
