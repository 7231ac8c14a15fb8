"""The same command twice gives the same numbers: PTQ with block reconstruction and QAT, in fresh processes.

Both runs use the same thread count; the fake-quantization kernels that a run compiles (and, on the CPU, the
statically compiled graphs that take over a call signature after a fixed number of calls) come into use at the same
call in every run, so their results do not depend on timing.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_image_folder


def _qvit(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "qvit", *args, "--threads", "2", "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), per_class=4, size=32)


@pytest.mark.slow
def test_ptq_with_reconstruction_is_bit_reproducible(folder, tmp_path):
    common = ["ptq", "--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--recipe", "isvit",
              "--budget", "quick", "--w-bits", "4", "--a-bits", "4", "--calib-images", "8"]
    for run in ("a", "b"):
        _qvit(*common, "--save", str(tmp_path / f"{run}.safetensors"), "--output", str(tmp_path / f"{run}.json"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    a, b = (json.loads((tmp_path / f"{run}.json").read_text()) for run in ("a", "b"))
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]


@pytest.mark.slow
def test_qat_is_bit_reproducible_across_the_static_kernel_takeover(folder, tmp_path):
    # 40 steps of a 6-block model: each kernel signature repeats 6 times a step, so the statically compiled graphs
    # take over in the middle of the run
    common = ["qat", "--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--recipe", "lsq",
              "--w-bits", "4", "--a-bits", "4", "--epochs", "10", "--train-batch-size", "2", "--calib-images", "4"]
    for run in ("a", "b"):
        _qvit(*common, "--out", str(tmp_path / run))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 2          # logged every 20 steps
