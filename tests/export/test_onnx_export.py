"""ONNX export: QDQ nodes for uniform grids, faithful float forms for the rest, agreement with PyTorch.

Tolerance: onnxruntime (basic graph optimizations, which keep ONNX semantics) and PyTorch sum matrix products in
different orders, so an activation can land on the other side of a rounding threshold now and then; on these
small models the median logit agrees to 1e-5 and three quarters of the images to 1e-4 on every logit, QDQ-only
W8A8 models included (onnxruntime 1.32 flips one activation of the 8-image batch below by a level).
"""
import collections

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import numpy_helper

import qvit
from qvit.export import load_quantized, save_quantized
from qvit.export.onnx_export import compare_onnx, export_mode, export_onnx, qdq_params
from qvit.quantizers import create_quantizer


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, num_classes=4).eval()


def _images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_qdq_params_of_hand_made_quantizers():
    q = create_quantizer({"kind": "uniform", "bits": 4, "symmetric": False}).calibrate(torch.tensor([-1.0, 2.0]))
    scale, zero, qmin, qmax, axis = qdq_params(q, torch.zeros(3))
    assert scale.item() == pytest.approx(0.2) and zero.item() == 5 and zero.dtype == torch.uint8
    assert (qmin, qmax, axis) == (0, 15, None)
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [4.0, 0.0], [1.0, 1.0]])
    g = create_quantizer({"kind": "uniform", "bits": 8, "granularity": "group", "group_size": 2, "axis": 0})
    g.calibrate(w)
    scale, zero, qmin, qmax, axis = qdq_params(g, w)
    assert axis == 0 and zero.dtype == torch.int8 and (qmin, qmax) == (-128, 127)
    # signed grid [-128, 127]: group 1 spans [-2, 1] -> 2/128; group 2 spans [0, 4] -> 4/127; repeated per channel
    assert scale.tolist() == pytest.approx([2 / 128, 2 / 128, 4 / 127, 4 / 127])
    assert qdq_params(create_quantizer({"kind": "log2", "bits": 4}).calibrate(torch.rand(10)), torch.zeros(3)) is None


def test_w8a8_minmax_is_qdq_with_integer_weights_and_matches_pytorch(tmp_path):
    x = _images()
    q = qvit.quantize_ptq(_vit(), "minmax", x, progress=False).eval()
    path = export_onnx(q, tmp_path / "m.onnx", x)
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["DequantizeLinear"] > ops["QuantizeLinear"] > 0 and ops["Round"] == 0
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    int_weights = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 2]
    assert len(int_weights) >= 4 * 6            # qkv, proj, fc1, fc2 of every block
    float_matrices = [k for k, v in inits.items() if v.dtype == np.float32 and v.ndim == 2 and v.size > 1000]
    assert not float_matrices
    for images in (x, _images(8, seed=5)):                          # the export batch, then another batch size
        diff = compare_onnx(q, path, images, reduce="none")
        assert diff.median() <= 1e-5 and (diff.amax(1) <= 1e-4).float().mean() >= 0.75


@pytest.mark.parametrize("name", qvit.list_recipes("ptq"))
@pytest.mark.parametrize("bits", [8, 4])
def test_every_ptq_recipe_exports_and_agrees(name, bits, tmp_path):
    x = _images(32)
    q = qvit.quantize_ptq(_vit(), qvit.load_recipe(name).quick_variant(), x[:8], w_bits=bits, a_bits=bits,
                          progress=False).eval()
    path = export_onnx(q, tmp_path / "m.onnx", x[:4])
    diff = compare_onnx(q, path, x, reduce="none")                       # [images, classes]
    with torch.no_grad():
        logits = q(x)
    # most elements agree to float precision; a rare rounding flip moves one image's logits by about a level
    assert diff.median() <= 1e-5
    assert (diff.amax(1) <= 1e-4).float().mean() >= 0.75
    assert diff.max() <= (0.02 if bits == 8 else 0.2) * logits.abs().max()
    with export_mode(q), torch.no_grad():           # the export form computes what the quantizers compute
        assert torch.equal(q(x), logits)


def test_packed_checkpoint_exports_like_the_model_it_came_from(tmp_path):
    x = _images()
    q = qvit.quantize_ptq(_vit(), "repq", x, w_bits=4, a_bits=4, progress=False).eval()
    loaded = load_quantized(save_quantized(q, tmp_path / "m.safetensors"))
    path = export_onnx(loaded, tmp_path / "m.onnx", x)
    assert compare_onnx(q, path, x) <= 1e-4
    inits = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    assert sum(v.dtype in (np.int8, np.uint8) and v.ndim == 2 for v in inits) >= 4 * 6


def test_int4_weights_at_opset_21_and_unsigned_weights_on_request(tmp_path):
    x = _images(8)
    q = qvit.quantize_ptq(_vit(), "minmax", x, w_bits=4, a_bits=8, progress=False).eval()
    path = export_onnx(q, tmp_path / "m.onnx", x[:2], opset=21)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 21
    four = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4 and len(i.dims) == 2]
    assert len(four) >= 4 * 6
    codes = numpy_helper.to_array(four[0])
    assert codes.min() >= -8 and codes.max() <= 7
    with torch.no_grad():
        assert compare_onnx(q, path, x) <= 1e-2 * float(q(x).abs().max())
    with torch.no_grad():
        scale = float(q(x).abs().max())
    for unsigned, dtype in ((False, np.int8), (True, np.uint8)):
        path = export_onnx(q, tmp_path / f"u{unsigned}.onnx", x[:2], unsigned_weights=unsigned)
        inits = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
        assert sum(v.dtype == dtype and v.ndim == 2 for v in inits) >= 4 * 6
        assert compare_onnx(q, path, x) <= 1e-4 * scale


def test_uncalibrated_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="never calibrated"):
        export_onnx(qvit.prepare(_vit()), tmp_path / "m.onnx", _images())


@pytest.mark.parametrize("arch", ["swin", "test_efficientnet", "test_resnet"])
def test_swin_and_cnns_pack_and_export(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "swin":      # a two-stage Swin: window attention, shifted windows, patch merging (repq adds its bias)
        fp = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2), num_heads=(1, 2),
                               img_size=56, num_classes=5).eval()
        recipe, x = "repq", torch.randn(8, 3, 56, 56)
    else:
        fp = timm.create_model(arch, num_classes=5).eval()
        recipe, x = "minmax", torch.randn(8, 3, 64, 64)
    q = qvit.quantize_ptq(fp, recipe, x, w_bits=4, a_bits=4, progress=False).eval()
    loaded = load_quantized(save_quantized(q, tmp_path / "m.safetensors"), fp)   # custom shapes: pass the float model
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
        scale = float(q(x).abs().max())
    assert compare_onnx(q, export_onnx(loaded, tmp_path / "m.onnx", x[:2]), x) <= 1e-3 * scale
