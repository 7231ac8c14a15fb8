import pytest
import timm
import torch

import qvit
from qvit.calibration import calibrate, uncalibrated_sites


def _model():
    return qvit.prepare(timm.create_model("test_vit").eval(), dict(w_bits=4, a_bits=4))


def test_fp_calibration_observes_float_activations():
    model = _model()
    x = torch.randn(4, 3, 160, 160)
    calibrate(model, x, batch_size=2, progress=False)
    assert uncalibrated_sites(model) == []
    # the first block's qkv input quantizer saw exactly the float LayerNorm output
    fp = timm.create_model("test_vit").eval()
    fp.load_state_dict(model.state_dict(), strict=False)
    seen = []
    fp.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        fp(x)
    q = model.blocks[0].attn.qkv.input_quantizer
    lo, hi = seen[0].min().item(), seen[0].max().item()
    assert q.scale.item() == pytest.approx((hi - lo) / 15, rel=1e-5)


def test_sequential_calibration_sees_quantized_upstream():
    x = torch.randn(2, 3, 160, 160)
    fp_mode, seq = _model(), _model()
    seq.load_state_dict(fp_mode.state_dict(), strict=False)
    calibrate(fp_mode, x, progress=False)
    calibrate(seq, x, sequential=True, progress=False)
    first = (fp_mode.patch_embed.proj.input_quantizer.scale, seq.patch_embed.proj.input_quantizer.scale)
    last = (fp_mode.blocks[-1].mlp.fc2.input_quantizer.scale, seq.blocks[-1].mlp.fc2.input_quantizer.scale)
    assert torch.equal(*first)          # the image: nothing is quantized upstream
    assert not torch.equal(*last)       # deep sites see the quantized network's activations


def test_calibrated_quantizers_are_left_alone_and_reset_recalibrates():
    model = _model()
    calibrate(model, torch.randn(2, 3, 160, 160), progress=False)
    q = model.blocks[0].mlp.fc1.input_quantizer
    before = q.scale.clone()
    calibrate(model, 10 * torch.randn(2, 3, 160, 160), progress=False)
    assert torch.equal(q.scale, before)
    q.reset()
    calibrate(model, 10 * torch.randn(2, 3, 160, 160), progress=False)
    assert not torch.equal(q.scale, before)


def test_calibrate_rejects_empty_data():
    with pytest.raises(ValueError, match="no data"):
        calibrate(_model(), [], progress=False)


def test_weights_only_calibration():
    model = _model()
    calibrate(model, None, weights_only=True, progress=False)
    rows = {r.site: r.calibrated for r in qvit.describe(model, include_float=False)}
    assert rows["blocks.0.attn.qkv.weight"] and not rows["blocks.0.attn.qkv.input"]
