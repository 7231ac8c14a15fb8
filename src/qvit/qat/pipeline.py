"""Run a QAT recipe: prepare a copy of the float model, initialise its quantizers, train it with the recipe's
callbacks while the float model teaches."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn
from torch.utils.data import Dataset

from ..config import QuantConfig
from ..data import calibration_batch
from ..models.prepare import prepare
from ..models.state import quant_state
from ..calibration import calibrate
from ..recipes import Recipe, load_recipe, patch_training, resolve_by_bits
from .callbacks import create_callback
from .oscillation import commit_frozen
from .trainer import QATTrainer, TrainConfig, copy_teacher


def quantize_qat(model: nn.Module, recipe: Union[str, Recipe], train_set: Dataset, *,
                 eval_loader: Optional[Sequence] = None, w_bits: Optional[int] = None, a_bits: Optional[int] = None,
                 overrides: Optional[Mapping[str, Any]] = None, train_overrides: Optional[Mapping[str, Any]] = None,
                 out_dir: Union[str, Path] = "outputs/qat", resume: bool = False, inplace: bool = False,
                 progress: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Quantization-aware training of a copy of ``model`` (of ``model`` itself with ``inplace``) with a QAT recipe;
    returns ``(qmodel, result)``.

    The quantizers are initialised by :func:`initialise_qat`, then train with the weights. ``train_overrides``
    patch the recipe's ``train`` settings (epochs, lr, batch size ...); overriding ``epochs`` alone scales the
    recipe's other epoch counts (warm-up, cool-down, a callback's ``last_epochs``) by the same factor, and
    overriding ``batch_size`` without ``lr`` scales the recipe's ``lr`` linearly with the batch (the rule the
    recipes' own rates follow). A recipe setting given per bit-width (``lr: {3: 0.01, 4: 0.0033}``) is resolved
    by the weight bit-width. ``result`` has ``steps``, ``history`` (top-1 per epoch), ``seconds`` and ``config``
    (the training settings used).
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.pipeline != "qat":
        raise ValueError(f"recipe {recipe.name!r} is a {recipe.pipeline} recipe, not a QAT one")
    qconfig = recipe.quant_config(w_bits, a_bits, overrides)
    train, recipe_callbacks = patch_training(recipe.train, recipe.callbacks, train_overrides or {})
    config = TrainConfig.from_dict({k: resolve_by_bits(v, qconfig.w_bits) for k, v in train.items()})
    callbacks = [create_callback(name, {k: resolve_by_bits(v, qconfig.w_bits) for k, v in params.items()})
                 for name, params in recipe_callbacks]
    teacher = copy_teacher(model)
    qmodel = initialise_qat(model, recipe, train_set, qconfig, progress=progress, inplace=inplace)
    trainer = QATTrainer(qmodel, teacher, train_set, eval_loader=eval_loader, config=config, callbacks=callbacks,
                         out_dir=Path(out_dir), progress=progress)
    result = trainer.fit(resume=resume)
    commit_frozen(qmodel)
    quant_state(qmodel).recipe = recipe
    return qmodel, result


def initialise_qat(model: nn.Module, recipe: Recipe, train_set: Dataset, qconfig: QuantConfig, *,
                   progress: bool = True, inplace: bool = False) -> nn.Module:
    """A prepared copy of ``model`` (``model`` itself with ``inplace``) with every quantizer initialised as
    ``recipe`` says (before any training).

    ``calibration.num_images`` training images (seed ``calibration.seed``) go through the float network, 64 at a
    time, or with ``calibration.sequential`` as one batch in which each site sees the already-quantized outputs of
    the sites before it. ``qconfig`` is the recipe's resolved ``QuantConfig`` (``recipe.quant_config(w, a)``).
    """
    qmodel = prepare(model if inplace else copy.deepcopy(model), qconfig)
    num = int(recipe.calibration.get("num_images", 256))
    calib, _ = calibration_batch(train_set, num, int(recipe.calibration.get("seed", 0)))
    sequential = bool(recipe.calibration.get("sequential", False))
    calibrate(qmodel, calib, batch_size=min(64, num), sequential=sequential, progress=progress)
    return qmodel
