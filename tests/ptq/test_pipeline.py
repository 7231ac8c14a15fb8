import pytest
import timm
import torch

import qvit
from qvit.recipes import Recipe, list_recipes, load_recipe


def test_shipped_recipes_load():
    names = list_recipes("ptq")
    assert {"minmax", "percentile", "mse"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.steps and r.version >= 1


def test_unknown_recipe_and_step():
    with pytest.raises(KeyError, match="unknown recipe"):
        load_recipe("does_not_exist")
    bad = Recipe.from_dict({"name": "x", "steps": ["no_such_step"]})
    with pytest.raises(KeyError, match="unknown PTQ step"):
        qvit.quantize_ptq(timm.create_model("test_vit"), bad, torch.randn(1, 3, 160, 160), progress=False)


@pytest.mark.parametrize("recipe", ["minmax", "percentile", "mse"])
def test_recipes_run_and_keep_the_float_model(recipe):
    fp = timm.create_model("test_vit").eval()
    x = torch.randn(4, 3, 160, 160)
    with torch.no_grad():
        ref = fp(x)
    q = qvit.quantize_ptq(fp, recipe, x, w_bits=4, a_bits=4, progress=False)
    with torch.no_grad():
        out = q(x)
        assert torch.equal(fp(x), ref)  # the input model is not modified
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert q.qvit_recipe.name == recipe and q.qvit_log[0]["step"] == "calibrate"
    rows = {r.role: r for r in qvit.describe(q)}
    assert rows["fc1.weight"].bits == 4 and rows["head.weight"].bits == 8


def test_mse_beats_minmax_at_low_bits():
    """On activations with outliers, searched ranges beat min-max ranges at W4A4 (fixed seed)."""
    torch.manual_seed(0)
    fp = timm.create_model("test_vit").eval()
    x = torch.randn(8, 3, 160, 160)
    x[:, :, :4, :4] *= 20  # a few extreme pixels stretch the min-max ranges
    with torch.no_grad():
        ref = fp(x)
    err = {}
    for name in ("minmax", "mse"):
        q = qvit.quantize_ptq(fp, name, x, w_bits=4, a_bits=4, progress=False)
        with torch.no_grad():
            err[name] = ((q(x) - ref).norm() / ref.norm()).item()
    assert err["mse"] < err["minmax"]
