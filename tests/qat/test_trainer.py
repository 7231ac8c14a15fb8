"""The QAT loop: it learns, it checkpoints, and a resumed run ends with the same weights."""
import pytest
import timm
import torch
from torch.utils.data import TensorDataset

import qvit
from qvit.qat import Callback, QATTrainer, TrainConfig, copy_teacher, create_callback

LSQ = {"weight": {"kind": "lsq", "granularity": "tensor"}, "activation": {"kind": "lsq", "symmetric": True, "init": "minmax"},
       "w_bits": 4, "a_bits": 4}


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    fp = timm.create_model("test_vit", img_size=32, num_classes=4).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, 32, 32, generator=gen)
    y = torch.randint(0, 4, (48,), generator=gen)
    teacher = copy_teacher(fp)
    model = qvit.prepare(fp, LSQ)
    qvit.calibrate(model, x[:16], progress=False)
    return model, teacher, TensorDataset(x, y)


def _config(**kw):
    base = dict(epochs=2, batch_size=16, lr=1e-3, quant_lr=1e-4, loss="kd", augment=True, crops=2, checkpoint_every=2,
                log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _task_loss(model, data):
    x, y = data.tensors
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model.eval()(x), y).item()


def test_a_few_qat_steps_lower_the_loss(tmp_path):
    model, teacher, data = _setup()
    before = _task_loss(model, data)
    trainer = QATTrainer(model, teacher, data, config=_config(epochs=4, augment=False, loss="ce"), out_dir=tmp_path,
                         progress=False, callbacks=[create_callback("track_oscillations", {"max_bits": 4})])
    result = trainer.fit()
    assert result["steps"] == 12
    assert _task_loss(model, data) < before - 0.05
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 13 and "osc_fraction" in rows[0] and "lr" in rows[0]
    assert (tmp_path / "oscillation.jsonl").read_text().count("\n") == 4      # one per epoch


class _Recorder(Callback):
    def __init__(self, name, log, order=0):
        self.name, self.log, self.order = name, log, order

    def after_step(self, trainer):
        self.log.append((trainer.step, self.name))

    def teardown(self, trainer):
        self.log.append(("teardown", self.name))


def test_trackers_run_after_the_other_callbacks_and_every_callback_is_torn_down(tmp_path):
    model, teacher, data = _setup()
    log = []
    tracker = create_callback("track_oscillations", {"max_bits": 4})
    recorders = [_Recorder("first", log), _Recorder("last", log, order=20), _Recorder("second", log)]
    trainer = QATTrainer(model, teacher, data, config=_config(epochs=1, loss="ce"), out_dir=tmp_path, progress=False,
                         callbacks=[recorders[0], tracker, recorders[1], recorders[2], _Interrupt(2)])
    assert [type(cb).__name__ for cb in trainer.callbacks][:2] == ["_Recorder", "_Recorder"]
    assert trainer.callbacks.index(tracker) == 3           # order 10: after every order-0 callback, before order 20
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert log[:3] == [(1, "first"), (1, "second"), (1, "last")]
    assert [e for e in log if e[0] == "teardown"] == [("teardown", "first"), ("teardown", "second"),
                                                      ("teardown", "last")]      # also when training stops


class _Interrupt(Callback):
    def __init__(self, at: int):
        self.at = at

    def after_step(self, trainer):
        if trainer.step == self.at:
            raise KeyboardInterrupt


def test_resume_equals_uninterrupted(tmp_path):
    callbacks = lambda: [create_callback("track_oscillations", {"freeze_threshold": 0.05}),  # noqa: E731
                         create_callback("dampen", {"weight": 0.1})]
    model_a, teacher, data = _setup()
    QATTrainer(model_a, teacher, data, config=_config(), out_dir=tmp_path / "a", progress=False,
               callbacks=callbacks()).fit()

    model_b, teacher, data = _setup()
    with pytest.raises(KeyboardInterrupt):       # killed mid-epoch 2, after the step-4 checkpoint
        QATTrainer(model_b, teacher, data, config=_config(), out_dir=tmp_path / "b", progress=False,
                   callbacks=callbacks() + [_Interrupt(at=5)]).fit()
    model_c, teacher, data = _setup()
    trainer = QATTrainer(model_c, teacher, data, config=_config(), out_dir=tmp_path / "b", progress=False,
                         callbacks=callbacks())
    assert trainer.fit(resume=True)["steps"] == 6
    sa, sc = model_a.state_dict(), model_c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k


def test_trainer_refuses_to_overwrite_and_checks_settings(tmp_path):
    model, teacher, data = _setup()
    QATTrainer(model, teacher, data, config=_config(epochs=1), out_dir=tmp_path, progress=False).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        QATTrainer(model, teacher, data, config=_config(epochs=1), out_dir=tmp_path, progress=False).fit()
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="mse")
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"epochs": 1, "lr_decay": 2})
    with pytest.raises(ValueError, match="teacher"):
        QATTrainer(model, None, data, config=_config(), out_dir=tmp_path / "x", progress=False)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    """`qvit qat` killed with SIGKILL after a mid-epoch checkpoint, then --resume, ends with the same weights and
    no duplicated log rows."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from tests.helpers import make_image_folder

    folder = make_image_folder(tmp_path / "data", per_class=12, size=32)   # 24 images: 6 steps per epoch
    common = [sys.executable, "-m", "qvit", "qat", "--model", "test_vit", "--data", str(folder), "--num-classes", "2",
              "--recipe", "nagel_freeze", "--w-bits", "3", "--a-bits", "3", "--epochs", "3",
              "--train-batch-size", "4", "--calib-images", "4", "--checkpoint-every", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(common + ["--out", str(tmp_path / "a")], check=True, env=env, capture_output=True)

    proc = subprocess.Popen(common + ["--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.name == "step_00000008" for p in ckpts.glob("step_*")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "result.json").exists()       # it really died before the end (of 18 steps)
    subprocess.run(common + ["--out", str(tmp_path / "b"), "--resume"], check=True, env=env, capture_output=True)

    def final(run):
        last = sorted((tmp_path / run / "checkpoints").glob("step_*"))[-1]
        files = list(last.glob("*.safetensors")) or list(last.glob("pytorch_model*.bin"))
        path = files[0]
        return load_file(str(path)) if path.suffix == ".safetensors" else __import__("torch").load(path)

    a, b = final("a"), final("b")
    assert a.keys() == b.keys() and all(__import__("torch").equal(a[k], b[k]) for k in a)
    steps = [__import__("json").loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_learnable_steps_stay_positive(tmp_path):
    """A huge quantizer lr would drive LSQ steps negative; the trainer keeps them >= 1e-5."""
    model, teacher, data = _setup()
    QATTrainer(model, teacher, data, config=_config(epochs=1, quant_lr=10.0, quant_optimizer="sgd", crops=1),
               out_dir=tmp_path, progress=False).fit()
    scales = [q.scale for q in model.modules() if isinstance(q, qvit.quantizers.Quantizer) and hasattr(q, "scale")]
    assert scales and all(bool((s >= 1e-5).all()) for s in scales)


class _LRProbe(Callback):
    """Records each optimizer's learning rate as the step about to run uses it."""

    def __init__(self):
        self.lrs = []

    def after_backward(self, trainer):
        self.lrs.append(tuple(opt.param_groups[0]["lr"] for opt in trainer.optimizers))


def test_an_epoch_wise_cosine_and_a_constant_quantizer_lr(tmp_path):
    import math
    model, teacher, data = _setup()
    probe = _LRProbe()
    cfg = _config(epochs=4, augment=False, loss="ce", crops=1, schedule_unit="epoch", quant_lr_schedule="constant")
    QATTrainer(model, teacher, data, config=cfg, out_dir=tmp_path, progress=False, callbacks=[probe]).fit()
    # 3 steps per epoch; torch's CosineAnnealingLR(T_max=4) stepped at each epoch's end: 0.5 (1 + cos(pi e / 4))
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (s // 3) / 4)) for s in range(12)]
    assert [w for w, _ in probe.lrs] == pytest.approx(expected)
    assert [q for _, q in probe.lrs] == pytest.approx([1e-4] * 12)
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, 4)
    per_epoch = []
    for _ in range(4):
        per_epoch.append(ref.param_groups[0]["lr"])
        ref.step()
        sched.step()
    assert per_epoch == pytest.approx(expected[::3])
    with pytest.raises(ValueError, match="schedule_unit"):
        TrainConfig(schedule_unit="batch")
    with pytest.raises(ValueError, match="quant_lr_schedule"):
        TrainConfig(quant_lr_schedule="linear")


def _decayed(trainer):
    """Ids of the weight optimizer's parameters that decay, and of those that do not."""
    groups = trainer.optimizers[0].param_groups
    return ({id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]},
            {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]})


def test_weight_decay_skips_norms_biases_and_tokens_unless_weight_decay_all(tmp_path):
    model, teacher, data = _setup()
    named = dict(model.named_parameters())
    qids = {id(p) for p in qvit.quantizers.quantizer_parameters(model.modules())}
    kept = [n for n, p in named.items() if id(p) not in qids]
    matrices = {n for n in kept if named[n].ndim > 1 and "pos_embed" not in n and "token" not in n}
    assert "blocks.0.norm1.weight" in kept and "cls_token" in kept and "pos_embed" in kept
    cfg = _config(weight_decay=1e-3)
    decay, no_decay = _decayed(QATTrainer(model, teacher, data, config=cfg, out_dir=tmp_path / "a", progress=False))
    assert decay == {id(named[n]) for n in matrices}
    assert no_decay == {id(named[n]) for n in kept if n not in matrices}
    cfg = _config(weight_decay=1e-3, weight_decay_all=True)
    trainer = QATTrainer(model, teacher, data, config=cfg, out_dir=tmp_path / "b", progress=False)
    decay, no_decay = _decayed(trainer)
    assert decay == {id(named[n]) for n in kept}
    assert not no_decay
    quant_groups = trainer.optimizers[1].param_groups   # step sizes and offsets keep quant_weight_decay (0)
    assert {id(p) for g in quant_groups for p in g["params"]} == qids and quant_groups[0]["weight_decay"] == 0
