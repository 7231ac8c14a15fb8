"""The QAT training loop, on Hugging Face Accelerate (CPU here; one or many GPUs via ``accelerate launch``).

One optimizer step per batch: forward, task/KD loss plus the callbacks' terms, backward (through Accelerate, with
mixed precision on GPU), the callbacks' gradient hooks, gradient clipping, the step of the weight optimizer and of the
quantizer-parameter optimizer (separate settings: Nagel et al. train the step sizes with Adam 1e-5), per-step cosine
schedules with linear warm-up (learnable step sizes are kept >= 1e-5 after every step), then the callbacks' post-step hooks (oscillation tracking, restores).

Checkpoints (``Accelerator.save_state``: model incl. every quantizer and oscillation buffer, both optimizers and
schedulers, the RNG states) are written every ``checkpoint_every`` steps and at the end of every epoch; ``resume``
continues from the newest one mid-epoch. The data order is a per-epoch seeded permutation and the augmentation of
each step is seeded by its step number, so a resumed run reaches the same weights as an uninterrupted one.
Metrics go to ``metrics.csv`` / ``metrics.jsonl`` (and TensorBoard when installed), per-layer oscillation statistics
to ``oscillation.jsonl``.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..backend import get_backend
from ..evaluate import evaluate
from ..quantizers import Quantizer, quantizer_parameters
from .callbacks import Callback
from .losses import distillation_loss, hard_and_soft_loss, soft_cross_entropy
from .multicrop import SoftLabels, apply_crops, random_boxes

LOSSES = ("ce", "kd", "hard_soft")
OPTIMIZERS = ("adamw", "sgd", "adam")
SCHEDULE_UNITS = ("step", "epoch")
QUANT_LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Training settings (a recipe's ``train`` section; every key can be overridden from the command line).

    ``loss``: ``ce`` (labels), ``kd`` (soft cross-entropy against the online FP teacher at ``temperature``) or
    ``hard_soft`` (OFQ: CE + KD). The learning rate warms up linearly for ``warmup_epochs``, follows a cosine to
    ``min_lr`` and stays there for the last ``cooldown_epochs`` (timm's cool-down; OFQ's CGA stage runs in it).
    ``schedule_unit: epoch`` moves the cosine once per epoch instead of every step (torch's ``CosineAnnealingLR``
    stepped at each epoch's end: epoch ``e`` of ``E`` trains at ``0.5 * (1 + cos(pi * e / E))`` of ``lr``, so
    the last epoch is not at ``min_lr``). ``quant_lr``/``quant_optimizer``/``quant_weight_decay`` apply to
    quantizer parameters (step sizes, offsets); ``quant_lr: null`` trains them with the weights' settings, and
    ``quant_lr_schedule: constant`` keeps ``quant_lr`` fixed instead of following the weights' schedule.
    ``weight_decay`` applies to matrices and kernels only (timm's convention: biases, norms, position embeddings and
    tokens do not decay); ``weight_decay_all: true`` decays every trained parameter except the quantizers' (Nagel
    et al.'s code).
    """

    epochs: float = 1.0
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    cooldown_epochs: float = 0.0
    schedule_unit: str = "step"
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    weight_decay_all: bool = False
    quant_lr: Optional[float] = None
    quant_optimizer: str = "adam"
    quant_weight_decay: float = 0.0
    quant_lr_schedule: str = "cosine"
    grad_clip: Optional[float] = None
    mixed_precision: str = "no"
    loss: str = "kd"
    temperature: float = 1.0
    augment: bool = False
    crops: int = 1
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    soft_labels: Optional[str] = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("optimizer", "quant_optimizer"):
            if getattr(self, name) not in OPTIMIZERS:
                raise ValueError(f"{name} must be one of {OPTIMIZERS}, got {getattr(self, name)!r}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.crops < 1:
            raise ValueError(f"crops must be >= 1, got {self.crops}")
        if self.schedule_unit not in SCHEDULE_UNITS:
            raise ValueError(f"schedule_unit must be one of {SCHEDULE_UNITS}, got {self.schedule_unit!r}")
        if self.quant_lr_schedule not in QUANT_LR_SCHEDULES:
            raise ValueError(f"quant_lr_schedule must be one of {QUANT_LR_SCHEDULES}, got {self.quant_lr_schedule!r}")
        self.crop_scale = tuple(self.crop_scale)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data or {}) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(data or {}))


class IndexedDataset(Dataset):
    """``(image, label, index)`` items of a dataset (the index finds an image's precomputed soft labels)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i][:2]
        return x, y, i


class EpochPermutation(Sampler):
    """A seeded random order of ``n`` indices, a new one every epoch (``set_epoch``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def shift_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (border replicated) and horizontal flip of a batch ``[B, C, H, W]``."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _optimizer(kind: str, groups: List[Dict[str, Any]], lr: float, momentum: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


class ETAClock:
    """The time left in a run, estimated once from the steps after the first few (which include compilation).

    :meth:`tick` after every step returns a line such as ``0.41 s per step, about 17 min for the 2480 steps left``
    at the step where the estimate is made (``skip + measure`` steps after the start, earlier in a short run), else
    None."""

    def __init__(self, start_step: int, total_steps: int, skip: int = 2, measure: int = 10) -> None:
        self.total = total_steps
        self.t_begin: Optional[float] = None
        self.begin_step = start_step + skip
        self.end_step = min(start_step + skip + measure, total_steps - 1)

    def tick(self, step: int) -> Optional[str]:
        if step == self.begin_step:
            self.t_begin = time.perf_counter()
        if step != self.end_step or self.t_begin is None or self.end_step <= self.begin_step:
            return None
        per_step = (time.perf_counter() - self.t_begin) / (self.end_step - self.begin_step)
        left = (self.total - step) * per_step
        when = f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
        return f"{per_step:.2f} s per step, about {when} for the {self.total - step} steps left"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)


class QATTrainer:
    """Trains a prepared, calibrated ``model`` (in place) with the float ``teacher`` for distillation.

    Args:
        model: the prepared model (its quantizers calibrated).
        teacher: the float model (not trained), required by the ``kd`` and ``hard_soft`` losses.
        train_set: a dataset of ``(image, label)``.
        eval_loader: ``(images, labels)`` batches evaluated at the end of every epoch (optional).
        config: :class:`TrainConfig`.
        callbacks: recipe callbacks (:mod:`qvit.qat.callbacks`).
        out_dir: checkpoints and metrics.
    """

    def __init__(self, model: nn.Module, teacher: Optional[nn.Module], train_set: Dataset,
                 eval_loader: Optional[Sequence] = None, config: Optional[TrainConfig] = None,
                 callbacks: Sequence[Callback] = (), out_dir: Path = Path("outputs/qat"),
                 progress: bool = True, cpu: Optional[bool] = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config or TrainConfig()
        if self.config.loss != "ce" and teacher is None and not self.config.soft_labels:
            raise ValueError(f"loss {self.config.loss!r} needs the float teacher model")
        self.out_dir = Path(out_dir)
        self.progress = progress
        cfg = self.config
        cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision if not cpu else "no")
        set_seed(cfg.seed)
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        self.unwrapped_model = model
        self.train_set = train_set
        self.oscillation_tracker = None
        self.sampler = EpochPermutation(len(train_set), cfg.seed)
        loader = DataLoader(IndexedDataset(train_set), batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True)
        self.soft_labels = SoftLabels(cfg.soft_labels) if cfg.soft_labels else None
        if self.soft_labels is not None and len(self.soft_labels) != len(train_set):
            raise ValueError(f"the soft-label file has {len(self.soft_labels)} images, the training set "
                             f"{len(train_set)}")
        if self.soft_labels is not None and cfg.crops > self.soft_labels.crops_per_image:
            raise ValueError(f"crops={cfg.crops} but the soft-label file stores {self.soft_labels.crops_per_image}")
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch ({cfg.batch_size})")
        self.total_steps = max(1, int(round(cfg.epochs * self.steps_per_epoch)))
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.cooldown_steps = int(round(cfg.cooldown_epochs * self.steps_per_epoch))
        if self.warmup_steps + self.cooldown_steps >= self.total_steps:
            raise ValueError(f"warm-up ({cfg.warmup_epochs} epochs) and cool-down ({cfg.cooldown_epochs}) leave no "
                             f"room in {cfg.epochs} epochs")
        for cb in self.callbacks:
            cb.setup(self)

        qparams = quantizer_parameters(model.modules())
        qids = {id(p) for p in qparams}
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in qids:
                continue
            decays = cfg.weight_decay_all or (p.ndim > 1 and "pos_embed" not in name and "token" not in name)
            (decay if decays else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.quant_lr is None:
            groups.append({"params": qparams, "weight_decay": 0.0})
            optimizers = [_optimizer(cfg.optimizer, groups, cfg.lr, cfg.momentum)]
        else:
            optimizers = [_optimizer(cfg.optimizer, groups, cfg.lr, cfg.momentum)]
            if qparams:
                optimizers.append(_optimizer(cfg.quant_optimizer, [{"params": qparams,
                                                                     "weight_decay": cfg.quant_weight_decay}],
                                             cfg.quant_lr, cfg.momentum))
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor) for opt in optimizers]
        if len(optimizers) > 1 and cfg.quant_lr_schedule == "constant":
            schedulers[1] = torch.optim.lr_scheduler.LambdaLR(optimizers[1], lambda step: 1.0)
        teacher = teacher.eval() if teacher is not None else None
        for p in (teacher.parameters() if teacher is not None else ()):
            p.requires_grad_(False)
        prepared = self.accelerator.prepare(model, loader, *optimizers, *schedulers)
        self.model, self.loader = prepared[0], prepared[1]
        self.optimizers = list(prepared[2:2 + len(optimizers)])
        self.schedulers = list(prepared[2 + len(optimizers):])
        self.teacher = teacher.to(self.accelerator.device) if teacher is not None else None
        self.eval_loader = eval_loader
        self.state = TrainState()
        self._tb = None
        self._quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]

    # ------------------------------------------------------------------ schedule
    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        done, span = step - self.warmup_steps, self.total_steps - self.cooldown_steps - self.warmup_steps
        if cfg.schedule_unit == "epoch":          # whole epochs done, of the epochs the cosine spans
            done, span = done // self.steps_per_epoch, span / self.steps_per_epoch
        t = done / max(1, span)
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> List[Path]:
        root = self.out_dir / "checkpoints"
        return sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if root.exists() else []

    def save_checkpoint(self) -> Path:
        path = self.out_dir / "checkpoints" / f"step_{self.state.step:08d}"
        if path.exists():                             # this step is saved already (a finished run resumed)
            return path
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.save_state(str(tmp), safe_serialization=False)
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(self.state)))
        tmp.rename(path)                              # a checkpoint exists only once it is complete
        for old in self._checkpoints()[:-self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return path

    def load_checkpoint(self, path: Optional[Path] = None) -> bool:
        """Load ``path`` or the newest complete checkpoint; False when there is none."""
        if path is None:
            found = self._checkpoints()
            if not found:
                return False
            path = found[-1]
        self.accelerator.load_state(str(path))
        self.state = TrainState(**json.loads((Path(path) / "trainer_state.json").read_text()))
        self._truncate_logs()
        return True

    def _truncate_logs(self) -> None:
        """Drop log rows written after the loaded checkpoint (a killed run logged steps it will now redo)."""
        for name in ("metrics.jsonl", "oscillation.jsonl"):
            path = self.out_dir / name
            if path.exists():
                rows = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= self.state.step]
                path.write_text("".join(r + "\n" for r in rows))
        metrics = self.out_dir / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            (self.out_dir / "metrics.csv").unlink(missing_ok=True)
            for row in rows:
                self._write_csv(row)

    # ------------------------------------------------------------------ training
    def _views(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The step's inputs, labels and (from a soft-label file) target probabilities: the batch itself, or its
        ``crops`` random-resized crops per image, seeded by the step number."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + self.state.step)
        if cfg.augment:
            x = shift_flip(x.cpu(), gen).to(x.device)
        if cfg.crops == 1 and self.soft_labels is None:
            return x, y, None
        b, k = x.shape[0], cfg.crops
        targets = None
        if self.soft_labels is None:
            boxes = random_boxes(b * k, gen, cfg.crop_scale).reshape(b, k, 4)
            flips = torch.rand(b, k, generator=gen) < 0.5
        else:
            sl, cidx = self.soft_labels, idx.cpu().long()
            crop = torch.stack([torch.randperm(sl.crops_per_image, generator=gen)[:k] for _ in range(b)])
            boxes, flips = sl.boxes[cidx[:, None], crop], sl.flips[cidx[:, None], crop]
            targets = sl.labels(cidx, crop).reshape(b * k, -1).to(x.device)
        return apply_crops(x, boxes, flips), y.repeat_interleave(k), targets

    def _loss(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        logits = self.model(x)
        if targets is not None:
            return soft_cross_entropy(logits, targets)
        if cfg.loss == "ce":
            return F.cross_entropy(logits, y)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        if cfg.loss == "kd":
            return distillation_loss(logits, teacher_logits, cfg.temperature)
        return hard_and_soft_loss(logits, y, teacher_logits, cfg.temperature)

    def _log(self, row: Dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv(row)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, row["step"])

    def _write_csv(self, row: Dict[str, Any]) -> None:
        csv_path = self.out_dir / "metrics.csv"
        new = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def _log_oscillation(self) -> None:
        if self.oscillation_tracker is None:
            return
        with open(self.out_dir / "oscillation.jsonl", "a") as f:
            f.write(json.dumps({"step": self.state.step, "layers": self.oscillation_tracker.layer_stats()}) + "\n")

    def evaluate(self) -> Optional[float]:
        if self.eval_loader is None:
            return None
        for cb in self.callbacks:
            cb.before_eval(self)
        return evaluate(self.unwrapped_model, self.eval_loader, progress=False).top1

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        """Train to ``total_steps``; with ``resume`` continue from the newest checkpoint in ``out_dir``."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and self._checkpoints():
            raise FileExistsError(f"{self.out_dir} already has checkpoints: pass resume=True (--resume) to continue, "
                                  "or choose another output directory")
        if resume:
            self.load_checkpoint()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard")) if self.accelerator.is_main_process else None
        except Exception:  # tensorboard is optional
            self._tb = None
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="qat", disable=not self.progress,
                   file=sys.stderr)
        if self.progress:
            bar.write(f"qat: {self.total_steps} optimizer steps ({cfg.epochs:g} epochs of {self.steps_per_epoch} "
                      f"steps, batch {cfg.batch_size})"
                      + (f", resuming after step {self.state.step}" if self.state.step else ""), file=sys.stderr)
        t0 = time.time()
        eta_clock = ETAClock(self.state.step, self.total_steps)
        running = None
        try:
            while self.state.step < self.total_steps:
                epoch = self.state.step // self.steps_per_epoch
                done_in_epoch = self.state.step % self.steps_per_epoch
                self.sampler.set_epoch(epoch)
                self.loader.set_epoch(epoch)
                loader = self.accelerator.skip_first_batches(self.loader, done_in_epoch) if done_in_epoch \
                    else self.loader
                self.model.train()
                for x, y, idx in loader:
                    x, y, targets = self._views(x, y, idx)
                    with self.accelerator.autocast():
                        loss = self._loss(x, y, targets)
                        total = loss
                        for cb in self.callbacks:
                            extra = cb.extra_loss(self)
                            if extra is not None:
                                total = total + extra
                    for opt in self.optimizers:
                        opt.zero_grad(set_to_none=True)
                    self.accelerator.backward(total)
                    for cb in self.callbacks:
                        cb.after_backward(self)
                    if cfg.grad_clip:
                        self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    for opt in self.optimizers:
                        opt.step()
                    for q in self._quantizers:
                        q.project_()
                    for sched in self.schedulers:
                        sched.step()
                    self.state.step += 1
                    for cb in self.callbacks:
                        cb.after_step(self)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise FloatingPointError(f"training loss became {value} at step {self.state.step}")
                    running = value if running is None else 0.95 * running + 0.05 * value
                    bar.update(1)
                    bar.set_postfix_str(f"loss={running:.4f}", refresh=False)
                    estimate = eta_clock.tick(self.state.step)
                    if estimate and self.progress:
                        bar.write(f"qat: {estimate}", file=sys.stderr)
                    if self.state.step % cfg.log_every == 0 or self.state.step == self.total_steps:
                        row = {"step": self.state.step, "epoch": self.state.step / self.steps_per_epoch,
                               "loss": value, "total_loss": float(total.detach()),
                               "lr": self.schedulers[0].get_last_lr()[0], "seconds": time.time() - t0}
                        for cb in self.callbacks:
                            row.update(cb.metrics(self))
                        self._log(row)
                    end_of_epoch = self.state.step % self.steps_per_epoch == 0
                    if end_of_epoch or self.state.step == self.total_steps:
                        top1 = self.evaluate()
                        self.state.epoch = epoch + 1 if end_of_epoch else epoch
                        self.state.history.append({"step": self.state.step, "top1": top1})
                        self._log_oscillation()
                        if top1 is not None:
                            bar.write(f"step {self.state.step}: top-1 {top1:.2f}%")
                        self.model.train()
                    if (self.state.step % cfg.checkpoint_every == 0 or end_of_epoch) \
                            and self.state.step < self.total_steps:
                        self.save_checkpoint()
                    if self.state.step >= self.total_steps:
                        break
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
            for cb in self.callbacks:
                cb.teardown(self)
            get_backend().release()     # e.g. the pooled buffers of training's recomputed products
        self.save_checkpoint()
        return {"steps": self.state.step, "history": self.state.history, "seconds": time.time() - t0,
                "config": asdict(self.config)}


def copy_teacher(model: nn.Module) -> nn.Module:
    """A frozen float copy of ``model`` for distillation."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
