import json

import pytest
import timm
import torch

import qvit
from qvit.cli import main
from tests.helpers import make_fashion_mnist, make_image_folder


@pytest.fixture()
def folder(tmp_path):
    return make_image_folder(tmp_path / "imgs", per_class=4, size=32)


def test_ptq_end_to_end_on_an_image_folder(folder, tmp_path, capsys):
    """The command reports the numbers of the model the Python API builds from the same weights and images, and
    saves that very model."""
    from qvit.data import build_dataset, calibration_batch, create_eval_transform, create_loader
    torch.manual_seed(1)
    model = timm.create_model("test_vit", num_classes=2).eval()
    ckpt = tmp_path / "w.pth"
    torch.save(model.state_dict(), ckpt)
    out, packed = tmp_path / "res.json", tmp_path / "q.safetensors"
    rc = main(["ptq", "--model", "test_vit", "--checkpoint", str(ckpt), "--data", str(folder), "--num-classes", "2",
               "--w-bits", "4", "--a-bits", "4", "--calib-images", "4", "--no-progress", "--describe",
               "--output", str(out), "--save", str(packed)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "minmax W4A4" in text and "blocks.0.attn.probs" in text
    res = json.loads(out.read_text())
    assert (res["recipe"], res["w_bits"], res["a_bits"], res["eval_images"], res["calib_images"]) == (
        "minmax", 4, 4, 8, 4)

    transform = create_eval_transform(model)
    val = create_loader(build_dataset(folder, "val", transform), batch_size=8)
    calib, _ = calibration_batch(build_dataset(folder, "train", transform), 4, 0)
    expected = qvit.quantize(model, "minmax", calib, w_bits=4, a_bits=4, progress=False).model
    assert res["fp_top1"] == qvit.evaluate(model, val, progress=False).top1
    quantized = qvit.evaluate(expected, val, progress=False)
    assert (res["top1"], res["top5"]) == (quantized.top1, quantized.top5)
    saved = qvit.load(packed)
    x = next(iter(val))[0]
    with torch.no_grad():
        assert torch.equal(saved(x), expected(x))          # the saved model is the one the API builds
        assert not torch.equal(expected(x), model(x))      # and it is quantized


def test_eval_with_local_checkpoint(folder, tmp_path, capsys):
    model = timm.create_model("test_vit", num_classes=2)
    ckpt = tmp_path / "w.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    assert main(["eval", "--model", "test_vit", "--checkpoint", str(ckpt), "--data", str(folder),
                 "--num-classes", "2", "--no-progress"]) == 0
    assert "FP32: top-1" in capsys.readouterr().out
    assert main(["eval", "--model", "test_vit", "--checkpoint", str(tmp_path / "missing.pth"),
                 "--data", str(folder), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_prints_a_table(folder, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--bits", "8", "4",
               "--recipes", "minmax", "percentile", "--calib-images", "4", "--no-progress", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| minmax |" in text and "| percentile |" in text and "W4A4" in text
    assert set(json.loads(out.read_text())["top1"]) == {"minmax", "percentile"}


def test_demo_runs_recipes_on_their_quick_budget(folder, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--bits", "4",
               "--recipes", "ptq4vit", "--calib-images", "4", "--no-progress", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| ptq4vit |" in text
    assert "ptq4vit: interval_search num_candidates 100 -> 20; interval_search rounds 3 -> 1" in text
    record = json.loads(out.read_text())
    assert record["budget"] == "quick" and set(record["quick"]) == {"ptq4vit"}


def test_default_data_is_fashion_mnist(tmp_path, capsys):
    root = make_fashion_mnist(tmp_path / "fm")
    with qvit.settings(fashion_mnist=root):
        assert main(["ptq", "--w-bits", "4", "--a-bits", "4", "--calib-images", "8", "--no-progress"]) == 0
    assert "(20 images)" in capsys.readouterr().out
    with qvit.settings(fashion_mnist=tmp_path / "empty"):
        assert main(["eval", "--no-progress"]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_bad_arguments_give_clear_errors(folder, capsys):
    assert main(["ptq", "--model", "test_vit", "--data", str(folder), "--w-bits", "9", "--no-progress"]) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["ptq", "--model", "no_such_model", "--no-progress"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["ptq", "--model", "test_vit", "--data", str(folder), "--recipe", "nope", "--no-progress"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


def test_pretrained_offline_error_points_to_checkpoint(monkeypatch, capsys):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no network")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    assert main(["eval", "--model", "test_vit", "--pretrained", "--no-progress"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_recipes_and_describe_commands(capsys):
    assert main(["recipes"]) == 0
    assert "minmax" in capsys.readouterr().out
    assert main(["describe", "--model", "test_vit", "--w-bits", "4", "--a-bits", "4"]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.mlp.fc2.input" in text and "stem.weight" in text


def test_qat_end_to_end_and_resume(folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["qat", "--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--recipe", "lsq",
            "--w-bits", "4", "--a-bits", "4", "--epochs", "1", "--train-batch-size", "4", "--calib-images", "4",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "lsq W4A4" in text and (out / "result.json").exists() and (out / "metrics.csv").exists()
    assert (out / "model.safetensors").is_file()
    assert main(args) == 2                                   # refuses to overwrite a run
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0                    # already finished: resumes at the end
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "# QAT run report" in text and "| blocks.0.mlp.fc1.weight |" in text
    assert {p.name for p in (out / "report").iterdir()} >= {"report.md", "loss.png", "oscillation_per_layer.png",
                                                             "frequency_histogram.png"}
    assert main(["report", str(tmp_path)]) == 2
    assert main(["qat", "--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--recipe", "minmax",
                 "--no-progress"]) == 2
    assert "runs: lsq" in capsys.readouterr().err


def test_softlabels_then_qat_with_them(folder, tmp_path, capsys):
    soft = tmp_path / "soft.safetensors"
    common = ["--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--no-progress"]
    assert main(["softlabels", *common, "--out", str(soft), "--crops", "5", "--topk", "1"]) == 0
    assert "x 5 crops" in capsys.readouterr().out
    assert main(["qat", *common, "--recipe", "vvtq", "--w-bits", "4", "--a-bits", "4", "--epochs", "1",
                 "--train-batch-size", "4", "--calib-images", "4", "--soft-labels", str(soft),
                 "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["recipe"] == "vvtq" and record["train_overrides"]["soft_labels"] == str(soft)


def test_ptq_save_then_export_the_packed_file_to_onnx(folder, tmp_path, capsys):
    from qvit.data import build_dataset, create_eval_transform, create_loader
    from qvit.evaluate import evaluate
    from qvit.export import load_quantized, read_metadata
    common = ["--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--no-progress"]
    packed, res = tmp_path / "m.safetensors", tmp_path / "res.json"
    assert main(["ptq", *common, "--recipe", "repq", "--w-bits", "4", "--a-bits", "4", "--calib-images", "4",
                 "--save", str(packed), "--output", str(res)]) == 0
    assert "packed W4A4 checkpoint written to" in capsys.readouterr().out
    assert read_metadata(packed)["recipe"] == {"name": "repq", "version": 1, "w_bits": 4, "a_bits": 4}
    loaded = load_quantized(packed)                # the file names its timm architecture and classes
    val = build_dataset(folder, "val", create_eval_transform(loaded))
    assert evaluate(loaded, create_loader(val, batch_size=8), progress=False).top1 == json.loads(
        res.read_text())["top1"]
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", *common, "--quantized", str(packed), "--out", str(onnx_path)]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("max |logit difference| ")[1].split()[0])
    fused = float(text.split("(ONNX semantics), ")[1].split()[0])
    assert onnx_path.is_file() and diff < 1e-3 and fused < 5e-2
    again = tmp_path / "again.safetensors"           # qvit format: the same model, the same recipe record
    assert main(["export", *common, "--quantized", str(packed), "--out", str(again)]) == 0
    assert read_metadata(again)["recipe"] == read_metadata(packed)["recipe"]
    with pytest.raises(SystemExit) as exit_:                      # export converts; it does not quantize
        main(["export", *common, "--recipe", "repq", "--out", str(again)])
    assert exit_.value.code == 2 and "--quantized" in capsys.readouterr().err
    packed.write_bytes(packed.read_bytes()[:100])
    assert main(["export", *common, "--quantized", str(packed), "--out", str(onnx_path)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_qat_prints_its_plan_and_writes_a_packed_model_that_exports(folder, tmp_path, capsys):
    from qvit.export import read_metadata
    common = ["--model", "test_vit", "--data", str(folder), "--num-classes", "2"]
    out = tmp_path / "run"
    assert main(["qat", *common, "--recipe", "nagel_freeze", "--w-bits", "3", "--a-bits", "3", "--epochs", "3",
                 "--train-batch-size", "2", "--calib-images", "4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "qat: 12 optimizer steps (3 epochs of 4 steps, batch 2)" in captured.err
    assert "s per step, about" in captured.err                          # the ETA, measured on the first steps
    record = json.loads((out / "result.json").read_text())
    assert record["packed"] == str(out / "model.safetensors")
    meta = read_metadata(out / "model.safetensors")
    version = qvit.load_recipe("nagel_freeze").version
    assert meta["recipe"] == {"name": "nagel_freeze", "version": version, "w_bits": 3, "a_bits": 3}
    assert meta["packed"]["blocks.0.mlp.fc1.weight"]["bits"] == 3
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", *common, "--no-progress", "--quantized", str(out / "model.safetensors"),
                 "--out", str(onnx_path)]) == 0
    assert float(capsys.readouterr().out.split("max |logit difference| ")[1].split()[0]) < 1e-3


def test_qat_quick_budget_and_the_hint_for_the_published_one(folder, tmp_path, capsys, monkeypatch):
    import qvit.qat
    seen = {}

    def fake_quantize_qat(model, recipe, train_set, **kw):
        seen.update(recipe=recipe, train_overrides=kw["train_overrides"])
        raise KeyboardInterrupt                              # the plan is all this test needs
    monkeypatch.setattr(qvit.qat, "quantize_qat", fake_quantize_qat)
    common = ["--model", "test_vit", "--data", str(folder), "--num-classes", "2", "--no-progress"]
    assert main(["qat", *common, "--recipe", "ofq", "--budget", "quick"]) == 130
    assert seen["recipe"].name == "ofq-quick" and seen["recipe"].train["epochs"] == 0.5
    assert "--budget quick" not in capsys.readouterr().err
    assert main(["qat", *common, "--recipe", "ofq"]) == 130
    assert "ofq trains for its published 340 epochs; --budget quick trains 0.5" in capsys.readouterr().err
