"""Argument groups, the model/data session and the output helpers the ``qvit`` commands share."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch.utils.data import Dataset, TensorDataset

from ..data import build_dataset, calibration_batch, create_eval_transform, create_loader, resolve_split_dir, subset
from ..models import REFERENCE_MODEL, build_model
from ..recipes import Recipe, load_recipe
from ..registry import Registry

DEMO_BITS = (8, 4, 3)
#: the packed checkpoint of the trained model in a `qvit qat` run directory
PACKED_NAME = "model.safetensors"
#: `qvit demo` evaluates on a seeded 3000 of the 10k test images, so that every PTQ recipe at three bit-widths fits
#: in 10 minutes on 2 cores (evaluation is most of the time).
DEMO_EVAL_IMAGES = 3000


class Command(NamedTuple):
    """A ``qvit`` sub-command: ``add_parser(subparsers)`` declares it, ``run(args)`` returns its exit status."""

    add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]


#: the sub-commands by name, in the order ``qvit --help`` lists them
COMMANDS: Registry[str, Command] = Registry("command")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=REFERENCE_MODEL,
                   help=f"timm model name (default: {REFERENCE_MODEL}, the shipped Fashion-MNIST ViT)")
    g.add_argument("--checkpoint", type=Path, help="local weights file for --model (offline)")
    g.add_argument("--pretrained", action="store_true", help="use timm's published weights (needs network)")
    g.add_argument("--num-classes", type=int,
                   help="classifier size (default: the class count of --data's folder; 10 for Fashion-MNIST)")
    g.add_argument("--data", type=Path,
                   help="ImageNet-style folder (train/ and val/ of class sub-folders); default: Fashion-MNIST")
    g.add_argument("--eval-images", type=int, help="evaluate on a seeded random subset of this many images "
                                                  f"(default: all; demo: {DEMO_EVAL_IMAGES})")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--seed", type=int, help="seed of the calibration / evaluation subsets "
                                          "(default: the recipe's calibration seed, else 0)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_quant_args(p: argparse.ArgumentParser, multi: bool = False, pipeline: str = "ptq") -> None:
    g = p.add_argument_group("quantization")
    if multi:
        g.add_argument("--recipes", nargs="+", help="PTQ recipes to run (default: all)")
        g.add_argument("--bits", nargs="+", type=int, default=list(DEMO_BITS),
                       help="bit-widths; each runs as WbAb (default: 8 4 3)")
    else:
        default = "minmax" if pipeline == "ptq" else "lsq"
        g.add_argument("--recipe", default=default, help=f"{pipeline.upper()} recipe name or YAML path (default: "
                                                         f"{default}; see `qvit recipes`)")
        g.add_argument("--w-bits", type=int, default=8)
        g.add_argument("--a-bits", type=int, default=8)
    shorter = ("fewer calibration images and reconstruction/search iterations" if pipeline == "ptq"
               else "a fraction of an epoch instead of the published hundreds")
    g.add_argument("--budget", choices=("full", "quick"), default="quick" if multi else "full",
                   help=f"the recipes' published budget, or their shorter 'quick' one ({shorter}) "
                        f"(default: {'quick' if multi else 'full'})")
    g.add_argument("--calib-images", type=int, help="calibration images (default: the recipe's)")
    g.add_argument("--config", type=Path, help="YAML QuantConfig patch applied on top of the recipe")


class _Session:
    """The model, data sets and options one command works with."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.progress = not args.no_progress
        num_classes = args.num_classes
        if num_classes is None and args.data is not None and args.model != REFERENCE_MODEL:
            from torchvision.datasets.folder import find_classes
            num_classes = len(find_classes(str(resolve_split_dir(args.data, "val")))[0])
        elif num_classes is None and args.model != REFERENCE_MODEL and not args.checkpoint:
            num_classes = 10
        torch.manual_seed(0 if args.seed is None else args.seed)   # models without weights get a reproducible init
        self.model = build_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                                 num_classes=num_classes)
        self.transform = create_eval_transform(self.model)

    @property
    def seed(self) -> int:
        return 0 if self.args.seed is None else self.args.seed

    def eval_set(self, materialize: bool = False) -> Dataset:
        """The evaluation split (a ``--eval-images`` subset); ``materialize``: decoded once into tensors."""
        ds = subset(build_dataset(self.args.data, "val", self.transform), self.args.eval_images, self.seed)
        if materialize:
            loader = create_loader(ds, batch_size=256, workers=self.args.workers)
            xs, ys = zip(*loader)
            ds = TensorDataset(torch.cat(xs), torch.cat(ys))
        return ds

    def train_set(self, num: Optional[int]) -> Dataset:
        """A seeded subset of ``num`` training images (all with ``None``), eval transform."""
        return subset(build_dataset(self.args.data, "train", self.transform), num, self.seed)

    def calib_images(self, num: int, recipe_seed: int = 0) -> torch.Tensor:
        """``num`` training images (eval transform); seed: ``--seed``, else the recipe's."""
        seed = recipe_seed if self.args.seed is None else self.args.seed
        return calibration_batch(build_dataset(self.args.data, "train", self.transform), num, seed)[0]

    def loader(self, ds: Dataset):
        return create_loader(ds, batch_size=self.args.batch_size, workers=self.args.workers)


def _overrides(args: argparse.Namespace) -> Optional[dict]:
    """The ``--config`` YAML patch, or ``None``."""
    if getattr(args, "config", None) is None:
        return None
    import yaml
    with open(args.config) as f:
        return yaml.safe_load(f) or {}


def _load_recipe(name: str, budget: str) -> Recipe:
    """The recipe ``name``, on its quick variant for ``budget == "quick"``."""
    recipe = load_recipe(name)
    return recipe.quick_variant() if budget == "quick" else recipe


def _require_ptq(recipe: Recipe) -> Recipe:
    """``recipe`` if it is a PTQ one; a ``ValueError`` otherwise."""
    if recipe.pipeline != "ptq":
        raise ValueError(f"recipe {recipe.name!r} is a {recipe.pipeline} recipe, not a PTQ one")
    return recipe


def _write_json(path: Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _save_packed(qmodel: torch.nn.Module, path: Path, recipe: Recipe, args: argparse.Namespace) -> Path:
    """Write ``qmodel`` as a packed low-bit checkpoint that names its recipe and bit-widths; prints where."""
    from ..export import save_quantized
    path = save_quantized(qmodel, path, recipe={"name": recipe.name, "version": recipe.version,
                                                "w_bits": args.w_bits, "a_bits": args.a_bits})
    print(f"packed W{args.w_bits}A{args.a_bits} checkpoint written to {path} ({path.stat().st_size / 1e6:.2f} MB); "
          f"`qvit export --quantized {path} --out FILE.onnx` converts it")
    return path
