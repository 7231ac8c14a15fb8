"""Recipes: versioned YAML files that name a method's quantizers, calibration and pipeline steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from ..config import QuantConfig

RECIPE_DIR = Path(__file__).resolve().parent
PIPELINES = ("ptq", "qat")
#: the keys of a recipe's ``calibration`` section, by pipeline (PTQ recipes set ``sequential`` on their ``calibrate`` step)
CALIBRATION_KEYS = {"ptq": ("num_images", "seed"), "qat": ("num_images", "seed", "sequential")}
#: QAT settings counted in epochs (in ``train`` and in callbacks): they scale with the budget when ``epochs`` changes
EPOCH_KEYS = ("warmup_epochs", "cooldown_epochs", "last_epochs")


@dataclass
class Recipe:
    """A published method as data.

    Attributes:
        name: the recipe's name (``minmax``, ``repq`` ...).
        version: bumped whenever a default changes, so results name the recipe they came from.
        pipeline: ``ptq`` or ``qat``: which pipeline runs the recipe (``kind`` names quantizer families only).
        description: one line for ``qvit recipes``.
        config: a ``QuantConfig`` patch (``w_bits``/``a_bits`` usually come from the user).
        calibration: ``num_images`` and ``seed`` of the calibration set; a QAT recipe also says whether its
            quantizers initialise ``sequential``-ly (each on the already-quantized outputs of the sites before it,
            as the ``calibrate`` step's option does in PTQ) or, by default, all on the float network.
        steps: ordered ``(step name, parameters)`` pairs run by the PTQ pipeline.
        train: QAT only: training settings (``qvit.qat.TrainConfig`` keys).
        callbacks: QAT only: ordered ``(callback name, options)`` pairs (``qvit.qat.list_callbacks()``).
        quick: a shorter budget for demos and smoke runs: ``calibration`` keys and per-step parameter patches
            (``{"calibration": {"num_images": 128}, "steps": {"reconstruct": {"iters": 20}}}``); see :meth:`quick_variant`.
    """

    name: str
    version: int = 1
    pipeline: str = "ptq"
    description: str = ""
    config: Dict[str, Any] = field(default_factory=dict)
    calibration: Dict[str, Any] = field(default_factory=dict)
    steps: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)
    quick: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)
    callbacks: List[Tuple[str, Dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        unknown = set(data) - {"name", "version", "pipeline", "description", "config", "calibration", "steps", "quick",
                              "train", "callbacks"}
        if unknown:
            hint = " (a recipe's ptq/qat is its 'pipeline')" if "kind" in unknown else ""
            raise ValueError(f"recipe {data.get('name', '?')!r}: unknown keys {sorted(unknown)}{hint}")
        if "name" not in data:
            raise ValueError("a recipe needs a name")
        pipeline = data.get("pipeline", "ptq")
        if pipeline not in PIPELINES:
            raise ValueError(f"recipe {data['name']!r}: pipeline must be one of {PIPELINES}, got {pipeline!r}")
        calib_keys = set(data.get("calibration") or {}) - set(CALIBRATION_KEYS[pipeline])
        if calib_keys:
            raise ValueError(f"recipe {data['name']!r}: unknown calibration keys {sorted(calib_keys)}; "
                             f"known: {list(CALIBRATION_KEYS[pipeline])}")
        return cls(name=data["name"], version=int(data.get("version", 1)), pipeline=pipeline,
                   description=data.get("description", ""), config=dict(data.get("config") or {}),
                   calibration=dict(data.get("calibration") or {}), steps=_entries(data, "steps"),
                   quick=dict(data.get("quick") or {}), train=dict(data.get("train") or {}),
                   callbacks=_entries(data, "callbacks"))

    def quant_config(self, w_bits: Optional[int] = None, a_bits: Optional[int] = None,
                     overrides: Optional[Mapping[str, Any]] = None) -> QuantConfig:
        """The recipe's QuantConfig with the requested bit-widths and any user patch applied."""
        config = QuantConfig.from_dict(self.config)
        patch: Dict[str, Any] = dict(overrides or {})
        if w_bits is not None:
            patch["w_bits"] = w_bits
        if a_bits is not None:
            patch["a_bits"] = a_bits
        return config.merged(patch) if patch else config

    def to_dict(self) -> Dict[str, Any]:
        out = dict(name=self.name, version=self.version, pipeline=self.pipeline, description=self.description,
                   config=self.config, calibration=self.calibration,
                   steps=[{name: params} for name, params in self.steps])
        if self.quick:
            out["quick"] = self.quick
        if self.train:
            out["train"] = self.train
        if self.callbacks:
            out["callbacks"] = [{name: params} for name, params in self.callbacks]
        return out

    def quick_variant(self) -> "Recipe":
        """The same recipe on its ``quick`` budget (itself when it has none); the name gets a ``-quick`` suffix.

        ``quick.calibration`` patches :attr:`calibration`; ``quick.steps[name]`` patches the parameters of every
        step called ``name``. Patching a step the recipe does not run is an error.
        """
        if not self.quick:
            return self
        unknown = set(self.quick) - {"calibration", "steps", "train"}
        if unknown:
            raise ValueError(f"recipe {self.name!r}: unknown quick keys {sorted(unknown)}")
        patches = dict(self.quick.get("steps") or {})
        missing = set(patches) - {name for name, _ in self.steps}
        if missing:
            raise ValueError(f"recipe {self.name!r}: quick patches steps it does not run: {sorted(missing)}")
        steps = [(name, {**params, **(patches.get(name) or {})}) for name, params in self.steps]
        train, callbacks = patch_training(self.train, self.callbacks, self.quick.get("train") or {})
        return Recipe(name=f"{self.name}-quick", version=self.version, pipeline=self.pipeline, description=self.description,
                      config=self.config, calibration={**self.calibration, **(self.quick.get("calibration") or {})},
                      steps=steps, train=train, callbacks=callbacks)


def _scaled(value: Any, factor: float) -> Any:
    """``value * factor`` for a number, entry by entry for a per-bit table (``{3: 0.01, default: 0.0033}``)."""
    if isinstance(value, Mapping):
        return {k: _scaled(v, factor) for k, v in value.items()}
    return value * factor


def patch_training(train: Mapping[str, Any], callbacks: List[Tuple[str, Dict[str, Any]]],
                   patch: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[Tuple[str, Dict[str, Any]]]]:
    """A QAT recipe's ``train`` settings and ``callbacks`` with ``patch`` applied, keeping the schedule's shape.

    Changing ``epochs`` scales every other setting counted in epochs (:data:`EPOCH_KEYS`: warm-up, cool-down, a
    callback's ``last_epochs``) that the patch does not set by the same factor; changing ``batch_size`` without
    ``lr`` scales ``lr`` linearly with the batch (the rule the recipes' own rates follow). Returns new objects."""
    train, patch = dict(train), dict(patch)
    callbacks = [(name, dict(params)) for name, params in callbacks]
    if "epochs" in patch and train.get("epochs"):
        ratio = float(patch["epochs"]) / float(train["epochs"])
        for key in EPOCH_KEYS:
            if key in train and key not in patch:
                patch[key] = _scaled(train[key], ratio)
        for _, params in callbacks:
            for key in EPOCH_KEYS:
                if params.get(key) is not None:
                    params[key] = _scaled(params[key], ratio)
    if "batch_size" in patch and "lr" not in patch and train.get("lr") and train.get("batch_size"):
        patch["lr"] = _scaled(train["lr"], float(patch["batch_size"]) / float(train["batch_size"]))
    train.update(patch)
    return train, callbacks


def resolve_by_bits(value: Any, bits: int) -> Any:
    """A recipe value that may depend on the bit-width: a plain value, or a mapping from bit-widths to values with an
    optional ``default`` (``{6: 200, default: 1000}``). Mappings with other keys are plain values."""
    if not isinstance(value, Mapping) or not value or not all(
            str(k).isdigit() or k == "default" for k in value):
        return value                      # a plain value, or a mapping that is not a per-bit table
    table = {str(k): v for k, v in value.items()}
    if str(bits) in table:
        return table[str(bits)]
    if "default" in table:
        return table["default"]
    raise ValueError(f"no value for {bits} bits in {dict(value)} (add a 'default')")


def _entries(data: Mapping[str, Any], key: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``[name | {name: params}]`` -> ``[(name, params)]``."""
    out = []
    for entry in data.get(key) or []:
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            (name, params), = entry.items()
            out.append((name, dict(params or {})))
        else:
            raise ValueError(f"recipe {data.get('name')!r}: each of {key} is a name or a one-key mapping, got {entry!r}")
    return out


def list_recipes(pipeline: Union[str, None] = None) -> List[str]:
    """Names of the recipes shipped with qvit (optionally of one ``pipeline``: ``ptq`` or ``qat``)."""
    names = []
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        if pipeline is None or load_recipe(path).pipeline == pipeline:
            names.append(path.stem)
    return names


def load_recipe(name_or_path: Union[str, Path]) -> Recipe:
    """Load a shipped recipe by name, or any recipe YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise KeyError(f"unknown recipe {name_or_path!r}; available: {', '.join(list_recipes())}")
    with open(path) as f:
        return Recipe.from_dict(yaml.safe_load(f) or {})
