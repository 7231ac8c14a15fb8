"""``qvit.quantize``: one verb for post-training quantization and quantization-aware training.

    import qvit
    result = qvit.quantize(model, "repq", calib_images, w_bits=4, a_bits=4)        # PTQ recipe: images
    result = qvit.quantize(model, "ofq", train_set, w_bits=2, a_bits=2, out_dir="runs/ofq")   # QAT recipe
    result = qvit.quantize(model, {"w_bits": 8, "a_bits": 8}, forward_loop)        # a config: calibration only
    qvit.save(result.model, "model.safetensors"); qvit.export_onnx(result.model, "model.onnx", example)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from .calibration import Batches, calibrate
from .config import QuantConfig
from .export.checkpoint import load_quantized as load
from .export.checkpoint import save_quantized as save
from .export.onnx_export import export_onnx
from .models.prepare import prepare
from .models.state import quant_state
from .recipes import Recipe, load_recipe

__all__ = ["QuantizeResult", "quantize", "save", "load", "export_onnx"]

ForwardLoop = Callable[[nn.Module], Any]


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns. ``model``: the quantized model (eval mode). ``recipe``: the recipe run
    (``None`` for a bare config). ``log``: one record per step (PTQ steps, or ``calibrate``). ``training``: for QAT,
    the trainer's result (``steps``, ``history``, ``seconds``, ``config``), else ``None``."""

    model: nn.Module
    recipe: Optional[Recipe]
    log: List[Dict[str, Any]] = field(default_factory=list)
    training: Optional[Dict[str, Any]] = None


def quantize(model: nn.Module, recipe: Union[str, Recipe, QuantConfig, Mapping[str, Any]],
             data: Union[Batches, ForwardLoop, torch.utils.data.Dataset], *, w_bits: Optional[int] = None,
             a_bits: Optional[int] = None, overrides: Optional[Mapping[str, Any]] = None, inplace: bool = False,
             progress: bool = True, **options: Any) -> QuantizeResult:
    """Quantize ``model`` with a recipe (by name or :class:`Recipe`) or a bare :class:`QuantConfig` (or its dict).

    - PTQ recipe: ``data`` are calibration images ``[N, C, H, W]``; ``options``: ``batch_size``.
    - QAT recipe: ``data`` is the training dataset of ``(image, label)``; ``options``: those of
      :func:`qvit.qat.quantize_qat` (``eval_loader``, ``train_overrides``, ``out_dir``, ``resume``).
    - config: the model is prepared and calibrated, nothing else; ``data`` are images, an iterable of batches, or
      a forward loop ``fn(model)`` that runs the calibration data through the model.

    ``w_bits``/``a_bits`` default to the recipe's (or the config's). The float ``model`` is left untouched unless
    ``inplace`` (then it is the one quantized, for every kind). Unknown ``options`` are refused.
    """
    if isinstance(recipe, (QuantConfig, Mapping)):
        config = recipe if isinstance(recipe, QuantConfig) else QuantConfig.from_dict(dict(recipe))
        if overrides:
            config = config.merged({"overrides": dict(overrides)})
        if w_bits is not None or a_bits is not None:
            config = config.merged({k: v for k, v in (("w_bits", w_bits), ("a_bits", a_bits)) if v is not None})
        if options:
            raise TypeError(f"quantize with a config takes no options {sorted(options)}")
        t0 = time.time()
        qmodel = prepare(model, config, inplace=inplace)
        calibrate(qmodel, data, progress=progress)
        log = [{"step": "calibrate", "params": {}, "seconds": time.time() - t0}]
        quant_state(qmodel).log = log
        return QuantizeResult(qmodel.eval(), None, log)
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a recipe name, a Recipe or a QuantConfig, got {type(recipe).__name__}")
    if recipe.pipeline == "ptq":
        from .ptq import quantize_ptq
        unknown = set(options) - {"batch_size"}
        if unknown:
            raise TypeError(f"PTQ recipe {recipe.name!r} takes no options {sorted(unknown)}")
        qmodel = quantize_ptq(model, recipe, data, w_bits=w_bits, a_bits=a_bits, overrides=overrides,
                              inplace=inplace, progress=progress, **options)
        return QuantizeResult(qmodel, recipe, quant_state(qmodel).log)
    from .qat import quantize_qat
    qmodel, result = quantize_qat(model, recipe, data, w_bits=w_bits, a_bits=a_bits, overrides=overrides,
                                  inplace=inplace, progress=progress, **options)
    return QuantizeResult(qmodel.eval(), recipe, quant_state(qmodel).log, result)
