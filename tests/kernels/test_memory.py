"""Freed memory goes back to the OS after calibration."""
import os
import sys

import pytest
import torch

import qvit
from qvit.kernels.memory import release_freed_memory


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_shrinks_the_resident_set():
    assert release_freed_memory()
    before = _resident_mb()
    tensors = [torch.ones(16 * 1024) for _ in range(4000)]     # 64 KiB each (heap, not mmap): 250 MiB
    last = tensors[-1]                                           # pins the top of the heap: no plain brk shrink
    del tensors
    grown = _resident_mb()
    assert grown > before + 200                                  # freed, but still resident
    release_freed_memory()
    assert _resident_mb() < before + 50 and float(last[0]) == 1.0


class _Recording(qvit.backend.Backend):
    def __init__(self):
        self.released = 0

    def release(self):
        self.released += 1


def test_calibration_and_training_hand_memory_back_through_the_backend(tmp_path):
    import timm
    from torch.utils.data import TensorDataset
    from qvit.qat import QATTrainer, TrainConfig
    recording = _Recording()
    previous = qvit.set_backend(recording)
    try:
        model = qvit.prepare(timm.create_model("test_vit", img_size=32, num_classes=4),
                             qvit.load_recipe("lsq").quant_config(4, 4))
        qvit.calibrate(model, torch.randn(4, 3, 32, 32), progress=False)
        assert recording.released == 1
        data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
        QATTrainer(model, None, data, config=TrainConfig(epochs=1, batch_size=4, loss="ce"), out_dir=tmp_path,
                   progress=False).fit()
        assert recording.released == 2
    finally:
        qvit.set_backend(previous)
