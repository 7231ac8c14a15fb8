"""Every QAT recipe trains end to end on timm's test_vit."""
import copy
import json

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import qvit
from qvit.qat import cosine_schedule, quantize_qat
from qvit.recipes import list_recipes, load_recipe


def _data(n: int = 32):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 4, (n,), generator=gen))


@pytest.mark.parametrize("name", list_recipes("qat"))
def test_every_qat_recipe_runs(name, tmp_path):
    fp = timm.create_model("test_vit", img_size=32, num_classes=4).eval()
    data = _data()
    recipe = load_recipe(name)
    recipe.calibration = {**recipe.calibration, "num_images": 8}
    qmodel, result = quantize_qat(fp, recipe, data, eval_loader=[data.tensors], w_bits=3, a_bits=3,
                                  train_overrides={"epochs": 2, "batch_size": 8, "warmup_epochs": 0,
                                                                "log_every": 1},
                                  out_dir=tmp_path, progress=False)
    assert result["steps"] == 8 and len(result["history"]) == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and "osc_fraction" in rows[-1]
    callbacks = dict(recipe.callbacks)
    if "dampen" in callbacks:      # the weight used by step s was scheduled at s - 1: 0 until 25 %, cosine to 0.1
        assert [r["dampen_weight"] for r in rows] == pytest.approx(
            [cosine_schedule(s - 1, 8, 0.0, 0.1) for s in range(1, 9)])
        assert rows[0]["dampen_weight"] == 0.0 and rows[-1]["dampen_weight"] > 0.09
    if callbacks["track_oscillations"].get("freeze_threshold"):
        assert [r["freeze_threshold"] for r in rows] == pytest.approx(
            [cosine_schedule(s, 8, 0.1, 0.011) for s in range(1, 9)])
        assert rows[0]["freeze_threshold"] == 0.0 and rows[-1]["freeze_threshold"] == pytest.approx(0.011)
    if "confidence_guided_annealing" in callbacks:   # its last 30 of 340 epochs, scaled to the 2-epoch budget
        assert rows[0]["cga_trainable_fraction"] == 1.0 and rows[-1]["cga_trainable_fraction"] < 0.2
    if "query_key_reparameterization" in recipe.config.get("transforms", []):
        assert qmodel.blocks[0].attn.qkr and qmodel.blocks[0].attn.qkx_quantizer.calibrated
        assert not qmodel.blocks[0].attn.qk_weight_quantizer._forward_hooks     # CGA's gate left with the trainer
    rows_sites = {r.site: r for r in qvit.describe(qmodel)}
    assert rows_sites["blocks.0.mlp.fc1.weight"].bits == 3 and rows_sites["head.weight"].bits == 8


def test_qat_rejects_a_ptq_recipe(tmp_path):
    with pytest.raises(ValueError, match="not a QAT one"):
        quantize_qat(timm.create_model("test_vit", img_size=32), "minmax", _data(), out_dir=tmp_path)


def test_per_bit_training_settings_resolve_by_weight_bits():
    import yaml

    from qvit.recipes import resolve_by_bits
    table = yaml.safe_load("lr: {3: 0.01, default: 0.0033}")["lr"]          # YAML gives integer keys
    assert resolve_by_bits(table, 3) == 0.01 and resolve_by_bits(table, 2) == 0.0033
    assert resolve_by_bits({"3": 0.01, "4": 0.02}, 4) == 0.02                # and JSON string keys
    assert resolve_by_bits(0.5, 3) == 0.5 and resolve_by_bits({"kind": "lsq"}, 3) == {"kind": "lsq"}
    with pytest.raises(ValueError, match="no value for 2 bits"):
        resolve_by_bits({3: 0.01}, 2)


def test_batch_override_scales_lr_linearly_unless_lr_given(tmp_path):
    fp = timm.create_model("test_vit", img_size=32, num_classes=4).eval()
    recipe = load_recipe("lsq")
    recipe.calibration = {**recipe.calibration, "num_images": 8}
    base = recipe.train["lr"] / recipe.train["batch_size"]
    for overrides, lr in (({"batch_size": 8}, 8 * base), ({"batch_size": 8, "lr": 0.5}, 0.5)):
        _, result = quantize_qat(fp, recipe, _data(8), w_bits=3, a_bits=3, out_dir=tmp_path / str(lr),
                                 progress=False, train_overrides={"epochs": 1, "warmup_epochs": 0, **overrides})
        assert result["config"]["lr"] == pytest.approx(lr) and result["config"]["batch_size"] == 8


def test_sequential_calibration_initialises_on_the_quantized_network():
    from qvit.data import calibration_batch
    from qvit.qat import initialise_qat
    fp = timm.create_model("test_vit", img_size=32, num_classes=4).eval()
    data = _data(16)
    recipe = load_recipe("nagel_lsq")
    assert recipe.calibration["sequential"] is True
    qconfig = recipe.quant_config(2, 2)
    scales = {}
    for sequential in (False, True):
        recipe.calibration = {"num_images": 8, "seed": 0, "sequential": sequential}
        qmodel = initialise_qat(fp, recipe, data, qconfig, progress=False)
        scales[sequential] = {n: q.scale.detach() for n, _, q in qvit.iter_quantizers(qmodel)}
    # the same initialisation by hand: one batch, each site on the quantized outputs of the sites before it
    ref = qvit.prepare(copy.deepcopy(fp), qconfig)
    calib, _ = calibration_batch(data, 8, 0)
    qvit.calibrate(ref, calib, sequential=True, progress=False)
    expected = {n: q.scale.detach() for n, _, q in qvit.iter_quantizers(ref)}
    assert set(expected) == set(scales[True])
    for name in expected:
        torch.testing.assert_close(scales[True][name], expected[name], rtol=0, atol=0)
    act = "blocks.0.mlp.fc2.input"
    assert not torch.allclose(scales[False][act], expected[act], rtol=0.05)


def test_a_qat_recipe_rejects_unknown_calibration_keys():
    from qvit.recipes import Recipe
    with pytest.raises(ValueError, match="unknown calibration keys"):
        Recipe.from_dict({"name": "x", "pipeline": "qat", "calibration": {"sequentail": True}})
    with pytest.raises(ValueError, match="unknown calibration keys"):
        Recipe.from_dict({"name": "x", "pipeline": "ptq", "calibration": {"sequential": True}})


def test_a_recipe_names_its_pipeline_not_a_kind():
    from qvit.recipes import Recipe
    assert Recipe.from_dict({"name": "x", "pipeline": "qat"}).pipeline == "qat"
    with pytest.raises(ValueError, match="unknown keys \\['kind'\\].*'pipeline'"):
        Recipe.from_dict({"name": "x", "kind": "qat"})
    with pytest.raises(ValueError, match="pipeline must be one of"):
        Recipe.from_dict({"name": "x", "pipeline": "train"})
