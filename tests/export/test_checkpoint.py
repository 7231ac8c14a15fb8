"""Packed checkpoints: exact round trips for every recipe, sizes, and clear errors on bad files."""
import json
import struct

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

import qvit
from qvit.export import PackedCheckpointError, load_quantized, read_metadata, save_quantized
from qvit.export.checkpoint import encode_metadata
from qvit.qat import quantize_qat


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, num_classes=4, **kw).eval()


def _images(n=8):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", qvit.list_recipes("ptq"))
@pytest.mark.parametrize("bits", [3, 4])
def test_every_ptq_recipe_round_trips_exactly(name, bits, tmp_path):
    x = _images()
    q = qvit.quantize_ptq(_vit(), qvit.load_recipe(name).quick_variant(), x, w_bits=bits, a_bits=bits,
                          progress=False).eval()
    path = save_quantized(q, tmp_path / "m.safetensors")
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    meta = read_metadata(path)
    assert meta["recipe"]["name"].startswith(name) and meta["architecture"] == "test_vit"
    assert meta["packed"]["blocks.0.mlp.fc1.weight"]["bits"] == bits


@pytest.mark.parametrize("name", ["lsq", "ofq", "vvtq"])
def test_qat_models_round_trip_exactly(name, tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 4, (16,), generator=gen))
    recipe = qvit.load_recipe(name)
    recipe.calibration = {**recipe.calibration, "num_images": 8}
    q, _ = quantize_qat(_vit(), recipe, data, w_bits=2, a_bits=2, out_dir=tmp_path / "run", progress=False,
                        train_overrides={"epochs": 1, "batch_size": 8, "warmup_epochs": 0})
    q.eval()
    loaded = load_quantized(save_quantized(q, tmp_path / "m.safetensors"))
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    if name == "ofq":     # QKR reads the float q/k rows of qkv, so that weight stays in float
        assert loaded.blocks[0].attn.qkr and "blocks.0.attn.qkv.weight" not in read_metadata(
            tmp_path / "m.safetensors")["packed"]


def test_packed_weights_shrink_with_bits(tmp_path):
    sizes = {}
    for bits in (2, 4, 8):
        q = qvit.quantize_ptq(_vit(), "minmax", _images(), w_bits=bits, a_bits=8, progress=False)
        path = save_quantized(q, tmp_path / f"w{bits}.safetensors")
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        sizes[bits] = header["blocks.0.mlp.fc1.weight.packed"]["data_offsets"]
    numel = _vit().blocks[0].mlp.fc1.weight.numel()
    for bits, (start, end) in sizes.items():
        assert end - start == numel * bits // 8


def test_load_into_another_model_fails_and_changes_nothing(tmp_path):
    path = save_quantized(qvit.quantize_ptq(_vit(), "minmax", _images(), progress=False), tmp_path / "m.safetensors")
    other = timm.create_model("test_vit", img_size=32, num_classes=7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PackedCheckpointError, match="another model"):
        load_quantized(path, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert not any(isinstance(m, qvit.nn.QuantModule) for m in other.modules())
    with pytest.raises(PackedCheckpointError, match="another model"):
        load_quantized(path, timm.create_model("test_vit2", img_size=32, num_classes=4))


def test_truncated_or_foreign_or_future_files_fail_clearly(tmp_path):
    path = save_quantized(qvit.quantize_ptq(_vit(), "minmax", _images(), progress=False), tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(PackedCheckpointError, match="truncated or corrupt"):
        load_quantized(cut)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(PackedCheckpointError, match="not a qvit packed checkpoint"):
        load_quantized(plain)
    meta, tensors = read_metadata(path), load_file(str(path))
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={"qvit_packed": encode_metadata({**meta, "version": 99})})
    with pytest.raises(PackedCheckpointError, match="version 99 is not supported"):
        load_quantized(future)
    garbled = tmp_path / "garbled.safetensors"
    save_file(tensors, str(garbled), metadata={"qvit_packed": encode_metadata(meta)[:-12]})
    with pytest.raises(PackedCheckpointError, match="corrupt 'qvit_packed' metadata"):
        load_quantized(garbled)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing.safetensors")


def test_uncalibrated_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match="never calibrated"):
        save_quantized(qvit.prepare(_vit()), tmp_path / "m.safetensors")


def test_metadata_is_compressed_and_version_1_plain_json_still_loads(tmp_path):
    q = qvit.quantize_ptq(_vit(), "minmax", _images(), w_bits=4, a_bits=4, progress=False)
    path = save_quantized(q, tmp_path / "m.safetensors")
    meta, tensors = read_metadata(path), load_file(str(path))
    plain = json.dumps({**meta, "version": 1}, separators=(",", ":"))
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()["qvit_packed"]
    assert meta["version"] == 2 and len(stored) * 3 < len(plain)     # the descriptions repeat: zlib takes most
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata={"qvit_packed": plain})
    x = _images()
    with torch.no_grad():
        assert torch.equal(load_quantized(v1)(x), q(x))
