import pytest
import timm
import torch

import qvit
from qvit.models.prepare import iter_quantizers
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
    assert qvit.quant_state(q).recipe.name == recipe and qvit.quant_state(q).log[0]["step"] == "calibrate"
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


def _smoke_variant(name: str) -> Recipe:
    """The recipe's quick budget, cut further (2 reconstruction iterations) for the test suite."""
    recipe = load_recipe(name).quick_variant()
    recipe.steps = [(step, {**params, "iters": 2} if step == "reconstruct" else params)
                    for step, params in recipe.steps]
    return recipe


@pytest.mark.parametrize("name", list_recipes("ptq"))
def test_every_recipe_runs_end_to_end_on_test_vit(name):
    fp = timm.create_model("test_vit", img_size=64).eval()
    x = torch.randn(8, 3, 64, 64)
    q = qvit.quantize_ptq(fp, _smoke_variant(name), x, w_bits=4, a_bits=4, progress=False)
    with torch.no_grad():
        out, ref = q(x), fp(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    # W4A4 stays close to the float network: every recipe gives 0.30-0.39 relative error and a per-image cosine of
    # at least 0.89 here; a grid that clips or rounds wrongly gives errors near 1
    assert ((out - ref).norm() / ref.norm()).item() < 0.6
    assert torch.nn.functional.cosine_similarity(out, ref, dim=1).min().item() > 0.8
    enabled = [(site, qz) for site, _, qz in iter_quantizers(q) if qz.enabled]
    assert enabled and all(bool(qz.calibrated) for _, qz in enabled)


def test_quick_variant_patches_calibration_and_steps():
    recipe = load_recipe("isvit")
    quick = recipe.quick_variant()
    assert quick.name == "isvit-quick" and quick.calibration["num_images"] < recipe.calibration["num_images"]
    assert [n for n, _ in quick.steps] == [n for n, _ in recipe.steps]
    assert all(p["iters"] == 40 for n, p in quick.steps if n == "reconstruct")
    assert all(p["lr"] == 4e-5 for n, p in quick.steps if n == "reconstruct")   # untouched keys stay
    assert load_recipe("minmax").quick_variant() is not None
    with pytest.raises(ValueError, match="does not run"):
        Recipe.from_dict({"name": "x", "steps": ["calibrate"], "quick": {"steps": {"reconstruct": {}}}}).quick_variant()
    with pytest.raises(ValueError, match="unknown quick keys"):
        Recipe.from_dict({"name": "x", "steps": ["calibrate"], "quick": {"config": {}}}).quick_variant()


def test_step_parameters_by_activation_bits():
    from qvit.ptq.steps import PTQContext
    ctx = PTQContext(model=torch.nn.Identity(), calib_data=torch.zeros(1), a_bits=6)
    assert ctx.by_bits(5) == 5
    assert ctx.by_bits({6: 200, "default": 1000}) == 200
    assert ctx.by_bits({"6": 7}) == 7
    ctx.a_bits = 3
    assert ctx.by_bits({6: 200, "default": 1000}) == 1000
    with pytest.raises(ValueError, match="no value for 3 bits"):
        ctx.by_bits({6: 200})


def test_calibrate_step_uses_the_first_images_only():
    """``calibrate: {num_images: n}`` calibrates on ``calib_data[:n]``: the result equals calibrating on that slice."""
    fp = timm.create_model("test_vit", img_size=64).eval()
    x = torch.randn(12, 3, 64, 64)
    x[4:] *= 10  # images past the first four would widen every range
    first = Recipe.from_dict({"name": "a", "steps": [{"calibrate": {"num_images": 4}}]})
    whole = Recipe.from_dict({"name": "b", "steps": ["calibrate"]})
    qa = qvit.quantize_ptq(fp, first, x, w_bits=4, a_bits=4, progress=False)
    qb = qvit.quantize_ptq(fp, whole, x[:4], w_bits=4, a_bits=4, progress=False)
    sa, sb = qa.state_dict(), qb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="num_images"):
        qvit.quantize_ptq(fp, Recipe.from_dict({"name": "c", "steps": [{"calibrate": {"num_images": 0}}]}), x,
                          progress=False)


def test_isvit_runs_its_three_stages_in_order():
    fp = timm.create_model("test_vit", img_size=64).eval()
    x = torch.randn(8, 3, 64, 64)
    q = qvit.quantize_ptq(fp, _smoke_variant("isvit"), x, w_bits=4, a_bits=4, progress=False)
    recon = [r for r in qvit.quant_state(q).log if r["step"] == "reconstruct" and "units" in r]
    assert [r["input_source"] for r in recon] == ["fp", "quantized"]
    stage1, stage3 = recon
    # stage 1 runs with float weights: the patch-embedding conv has no active quantizer, so its loss is 0
    assert stage1["units"][0]["unit"] == "patch_embed.proj" and stage1["units"][0]["first_loss"] == 0.0
    assert stage3["units"][0]["first_loss"] > 0.0
    rows = {r.site: r for r in qvit.describe(q)}
    assert rows["blocks.0.attn.qkv.input"].granularity == "tensor"           # reparameterized in stage 2
    assert rows["blocks.0.attn.probs"].kind == "sulq"
    assert all(qz.enabled for _, _, qz in iter_quantizers(q))
