"""qvit.quantize: one verb for PTQ recipes, QAT recipes and bare configs; save/load/export at the top level."""
import copy

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import qvit
from qvit.nn import QuantModule


def _model():
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, num_classes=4).eval()


def _images(n=16, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _is_quantized(model):
    return any(isinstance(m, QuantModule) for m in model.modules())


def test_a_ptq_recipe_gives_what_quantize_ptq_gives_and_leaves_the_float_model_alone():
    fp, x = _model(), _images()
    before = copy.deepcopy(fp.state_dict())
    result = qvit.quantize(fp, "minmax", x, w_bits=4, a_bits=4, progress=False)
    assert not _is_quantized(fp) and all(torch.equal(before[k], v) for k, v in fp.state_dict().items())
    assert result.recipe.name == "minmax" and result.training is None and result.log[0]["step"] == "calibrate"
    assert qvit.quant_state(result.model).log is result.log
    direct = qvit.quantize_ptq(fp, "minmax", x, w_bits=4, a_bits=4, progress=False)
    with torch.no_grad():
        assert torch.equal(result.model(x), direct(x))


def test_a_config_with_a_forward_loop_calibrates_like_the_images_themselves():
    fp, x = _model(), _images()
    config = {"w_bits": 8, "a_bits": 8}
    from_images = qvit.quantize(fp, config, x, progress=False).model

    def forward_loop(model):
        for batch in x.split(8):
            model(batch)
    from_loop = qvit.quantize(fp, config, forward_loop, a_bits=6, progress=False).model
    assert {q.bits for _, r, q in qvit.iter_quantizers(from_loop) if not q.for_weights} >= {6}
    same_bits = qvit.quantize(fp, config, forward_loop, progress=False).model
    with torch.no_grad():
        assert torch.equal(same_bits(x), from_images(x))      # min-max ranges do not depend on the batching
    assert qvit.uncalibrated_sites(from_loop) == []


def test_a_qat_recipe_trains_a_copy_and_inplace_quantizes_the_model_itself(tmp_path):
    fp = _model()
    data = TensorDataset(_images(32), torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2)))
    result = qvit.quantize(fp, "lsq", data, w_bits=4, a_bits=4, progress=False, out_dir=tmp_path / "run",
                           train_overrides={"epochs": 1, "batch_size": 16})
    assert result.training["steps"] == 2 and result.recipe.name == "lsq" and not _is_quantized(fp)
    assert not result.model.training
    inplace = qvit.quantize(fp, "minmax", _images(), inplace=True, progress=False)
    assert inplace.model is fp and _is_quantized(fp)


def test_save_load_and_bad_arguments(tmp_path):
    result = qvit.quantize(_model(), "minmax", _images(), w_bits=4, a_bits=4, progress=False)
    path = qvit.save(result.model, tmp_path / "m.safetensors")
    loaded = qvit.load(path)
    x = _images(4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))
    assert qvit.quant_state(loaded).packed["recipe"]["name"] == "minmax"
    with pytest.raises(TypeError, match="takes no options"):
        qvit.quantize(_model(), "minmax", _images(), epochs=3)
    with pytest.raises(TypeError, match="recipe must be"):
        qvit.quantize(_model(), 42, _images())
    with pytest.raises(KeyError, match="no_such_recipe"):
        qvit.quantize(_model(), "no_such_recipe", _images())
