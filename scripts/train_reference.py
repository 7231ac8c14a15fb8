"""Train qvit's reference FP model (DeiT-Tiny-shaped ViT) on Fashion-MNIST and save it as safetensors.

    python scripts/train_reference.py                     # writes src/qvit/assets/qvit_vit_tiny_fmnist.safetensors
    python scripts/train_reference.py --out ~/.cache/qvit/qvit_vit_tiny_fmnist.safetensors

A checkpoint is written after every epoch in ``--work-dir``; re-running the command resumes from it, so an
interrupted run loses at most one epoch. Resuming with a larger ``--epochs`` continues training on the longer
cosine schedule; every invocation is recorded in the weights' metadata (``commands``).

With ``--ema DECAY`` an exponential moving average of the weights (timm's ``ModelEmaV3``, updated after every
optimizer step) is kept, evaluated after every epoch beside the raw weights, and it is what the run saves.

Distillation (DeiT's recipe for data-limited ViTs: a convnet teacher passes on its inductive bias):

    python scripts/train_reference.py --arch cnn --epochs 10 --lr 2e-3 --augment --work-dir outputs/teacher \
        --out outputs/teacher/cnn_fmnist.safetensors          # the convnet teacher
    python scripts/train_reference.py --init src/qvit/assets/qvit_vit_tiny_fmnist.safetensors \
        --teacher outputs/teacher/cnn_fmnist.safetensors --epochs 14 --lr 2e-4 --augment --label-smoothing 0.1 \
        --drop-path 0.1 --ema 0.999 --work-dir outputs/reference_kd   # the shipped weights (90.68%)

``--init FILE`` starts from saved weights and carries their recorded commands and history forward;
``--teacher FILE`` adds DeiT's hard distillation (the loss is the mean of the cross-entropy against the labels
and against the teacher's top-1 on the same augmented images; ``--distill soft`` uses the temperature-scaled KL).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from tqdm import tqdm

from qvit.data import FashionMNIST
from qvit.models.reference import ARCH, REFERENCE_MODEL, WEIGHTS_NAME, qvit_vit_tiny_fmnist, read_weights_metadata

REPO = Path(__file__).resolve().parent.parent


def cnn_fmnist(widths=(32, 64, 128), num_classes: int = 10) -> torch.nn.Sequential:
    """The distillation teacher: a VGG-style convnet for [B,1,28,28] input (two 3x3 conv-BN-ReLU per stage,
    2x2 max-pooling between stages, global average pooling, dropout, linear head). About 22M MACs per image."""
    layers, cin = [], 1
    for i, w in enumerate(widths):
        if i:
            layers.append(torch.nn.MaxPool2d(2))
        for _ in range(2):
            layers += [torch.nn.Conv2d(cin, w, 3, padding=1, bias=False), torch.nn.BatchNorm2d(w),
                       torch.nn.ReLU(inplace=True)]
            cin = w
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.3),
               torch.nn.Linear(cin, num_classes)]
    return torch.nn.Sequential(*layers)


def load_teacher(path: Path) -> tuple:
    """(the frozen teacher saved by ``--arch cnn``, its training metadata)."""
    meta = read_weights_metadata(path)
    if meta.get("model") != "cnn_fmnist":
        raise SystemExit(f"{path} is not a teacher written by --arch cnn (model: {meta.get('model')!r})")
    teacher = cnn_fmnist()
    teacher.load_state_dict(load_file(str(path)))
    return teacher.eval().requires_grad_(False), meta


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """DeiT's hard distillation (cross-entropy against the teacher's top-1) or soft KL at a temperature.
    logits, teacher_logits: [B, classes]."""
    if kind == "hard":
        return F.cross_entropy(logits, teacher_logits.argmax(-1))
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean",
                    log_target=True) * t * t


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and random horizontal flip. x: [B,1,28,28]."""
    b, _, h, w = x.shape
    background = x.amin()
    padded = F.pad(x, (pad, pad, pad, pad), value=float(background))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, 1, h, w)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, 1, h, w)
    shifted = padded[torch.arange(b)[:, None, None], 0, rows[:, 0], cols[:, 0]].unsqueeze(1)
    flip = torch.rand(b, generator=generator) < 0.5
    shifted[flip] = shifted[flip].flip(-1)
    return shifted


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / x.shape[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random 2-pixel shifts and horizontal flips")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the blocks")
    p.add_argument("--ema", type=float, default=0.0,
                   help="keep an EMA of the weights with this per-step decay and save it (0: off)")
    p.add_argument("--arch", choices=("vit", "cnn"), default="vit",
                   help="vit: the reference model; cnn: the distillation teacher")
    p.add_argument("--init", type=Path, help="start from these saved weights (a file this script wrote)")
    p.add_argument("--teacher", type=Path, help="distil from this teacher (written by --arch cnn)")
    p.add_argument("--distill", choices=("hard", "soft"), default="hard")
    p.add_argument("--distill-temperature", type=float, default=3.0, help="for --distill soft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "reference")
    p.add_argument("--out", type=Path, default=REPO / "src" / "qvit" / "assets" / WEIGHTS_NAME)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    x_train, y_train = FashionMNIST("train").tensors()
    x_test, y_test = FashionMNIST("test").tensors()
    model = qvit_vit_tiny_fmnist(drop_path_rate=args.drop_path) if args.arch == "vit" else cnn_fmnist()
    init_meta = {}
    if args.init is not None:
        model.load_state_dict(load_file(str(args.init)))
        init_meta = read_weights_metadata(args.init)
    teacher, teacher_meta = load_teacher(args.teacher) if args.teacher is not None else (None, {})
    if teacher is not None:
        teacher_acc = evaluate(teacher, x_test, y_test)
        print(f"teacher {args.teacher}: test top-1 {teacher_acc:.2f}%")
    ema = ModelEmaV3(model, decay=args.ema, stochastic_rounding=False) if args.ema else None
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim > 1 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p_ for n, p_ in model.named_parameters() if not (p_.ndim > 1 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(x_train.shape[0] / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * args.lr * (1.0 + math.cos(math.pi * t))

    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.work_dir / "last.pt"
    start_epoch, history = 0, []
    invocation = "python scripts/train_reference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = list(init_meta.get("commands", []))
    gen = torch.Generator().manual_seed(args.seed)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, history = ckpt["epoch"], ckpt["history"]
        if ema is not None:
            if "ema" not in ckpt:
                raise SystemExit(f"{ckpt_path} was written without --ema; use a new --work-dir for an EMA run")
            ema.module.load_state_dict(ckpt["ema"])
        commands = ckpt.get("commands", ["python scripts/train_reference.py"])
        init_meta = ckpt.get("init_meta", init_meta)   # --init may name the file this run overwrites
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")
    if not commands or commands[-1] != invocation.strip():
        commands.append(invocation.strip())

    t0 = time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        perm = torch.randperm(x_train.shape[0], generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stdout,
                   mininterval=30)
        running = 0.0
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = augment(x_train[idx], gen) if args.augment else x_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=args.label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(xb)
                loss = 0.5 * loss + 0.5 * distill_loss(logits, teacher_logits, args.distill,
                                                       args.distill_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model, step=step + 1)
            running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr_at(step):.2e}", refresh=False)
        record = {"epoch": epoch + 1, "loss": running, "test_top1": evaluate(model, x_test, y_test)}
        if ema is not None:
            record["raw_test_top1"] = record["test_top1"]
            record["test_top1"] = evaluate(ema.module, x_test, y_test)
        history.append(record)
        raw = f" (raw weights {record['raw_test_top1']:.2f}%)" if ema is not None else ""
        print(f"epoch {epoch + 1}: train loss {running:.4f}, test top-1 {record['test_top1']:.2f}%{raw}", flush=True)
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "rng": torch.get_rng_state(), "epoch": epoch + 1, "history": history, "commands": commands,
                 "init_meta": init_meta}
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    acc = history[-1]["test_top1"]
    name, arch = (REFERENCE_MODEL, ARCH) if args.arch == "vit" else ("cnn_fmnist", "cnn_fmnist")
    meta = {"model": name, "arch": arch, "test_top1": acc, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing, "augment": args.augment, "drop_path": args.drop_path,
            "ema": args.ema, "seed": args.seed, "history": history,
            "torch": torch.__version__, "commands": commands}
    if init_meta.get("history"):
        meta["init"] = {"file": args.init.name, "test_top1": init_meta.get("test_top1"),
                        "history": init_meta["history"]}
    if teacher is not None:
        meta["teacher"] = {"file": args.teacher.name, "test_top1": teacher_acc, "distill": args.distill,
                           "commands": teacher_meta.get("commands", [])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    final = ema.module if ema is not None else model
    state = {k: v.contiguous() for k, v in final.state_dict().items()}
    save_file(state, str(args.out), metadata={"qvit": json.dumps(meta)})
    print(f"saved {args.out} (test top-1 {acc:.2f}%, {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
