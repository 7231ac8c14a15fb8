"""Run a PTQ recipe on a float model."""
from __future__ import annotations

import copy
import time
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..models.prepare import prepare
from ..models.state import quant_state
from ..recipes import Recipe, load_recipe
from .steps import PTQContext, get_step


def quantize_ptq(model: nn.Module, recipe: Union[str, Recipe], calib_data: torch.Tensor, *,
                 w_bits: Optional[int] = None, a_bits: Optional[int] = None,
                 overrides: Optional[Mapping[str, Any]] = None, inplace: bool = False, progress: bool = True,
                 batch_size: int = 32) -> nn.Module:
    """Prepare a copy of ``model`` with the recipe's config and run its steps on ``calib_data``.

    ``calib_data``: calibration images ``[N, C, H, W]`` (the recipe's ``calibration.num_images`` is the
    default count callers should draw). The float ``model`` is kept as the teacher for steps that need one.
    Returns the quantized model; the recipe and the step log are in its :class:`~qvit.models.QuantState`.
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.pipeline != "ptq":
        raise ValueError(f"recipe {recipe.name!r} is a {recipe.pipeline} recipe, not a PTQ one")
    config = recipe.quant_config(w_bits, a_bits, overrides)
    fp_model = model if not inplace else copy.deepcopy(model)
    qmodel = prepare(model if inplace else copy.deepcopy(model), config)
    fp_model.eval()
    ctx = PTQContext(model=qmodel, calib_data=calib_data, fp_model=fp_model, progress=progress,
                     batch_size=batch_size, w_bits=config.w_bits, a_bits=config.a_bits)
    for name, params in recipe.steps:
        t0 = time.time()
        get_step(name)(ctx, **params)
        ctx.log.append({"step": name, "params": params, "seconds": time.time() - t0})
    state = quant_state(qmodel)
    state.recipe = recipe
    state.log = ctx.log
    return qmodel
