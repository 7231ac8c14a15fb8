"""QAT callbacks: the pieces a recipe composes around the training loop (tracking, dampening, freezing, ...).

A callback is registered by name (:func:`register_callback`) and built from a recipe entry ``{name: {options}}``.
The trainer calls, in this order at every optimizer step: :meth:`Callback.extra_loss` (terms added to the task
loss), :meth:`Callback.after_backward` (before ``optimizer.step()``: gradient masks), :meth:`Callback.after_step`
(after it: restores, trackers); and :meth:`Callback.before_eval` before every evaluation. ``trainer.step`` is the
number of optimizer steps done so far and ``trainer.total_steps`` the schedule's length.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Type

import torch
import torch.nn as nn

from ..registry import Registry
from .batchnorm import reestimate_bn
from .cga import ConfidenceGuidedAnnealing
from .oscillation import OscillationTracker, cosine_schedule
from .regularizers import bin_regularizer, dampening_loss

CALLBACKS: Registry[str, Type["Callback"]] = Registry("QAT callback")


def register_callback(name: str) -> Callable[[Type["Callback"]], Type["Callback"]]:
    """Class decorator: make a callback available to recipes as ``name``."""
    def wrap(cls: Type["Callback"]) -> Type["Callback"]:
        CALLBACKS.add(name, cls)
        cls.name = name
        return cls
    return wrap


def create_callback(name: str, options: Optional[Mapping[str, Any]] = None) -> "Callback":
    cls = CALLBACKS.get(name)
    try:
        return cls(**dict(options or {}))
    except TypeError as err:
        raise TypeError(f"QAT callback {name!r}: {err}") from None


def list_callbacks() -> List[str]:
    """The registered callbacks, sorted."""
    return CALLBACKS.names()


class Callback:
    """Base class: every hook is a no-op.

    The trainer runs its callbacks in recipe order, stably sorted by ``order``: oscillation tracking (``order`` 10)
    comes after the callbacks that change weights after a step (CGA's restore), so it sees the weights that stay.
    """

    name = "callback"
    order = 0

    def setup(self, trainer: Any) -> None:
        """Once, after the model is prepared and calibrated and before any checkpoint is loaded."""

    def extra_loss(self, trainer: Any) -> Optional[torch.Tensor]:
        return None

    def after_backward(self, trainer: Any) -> None:
        pass

    def after_step(self, trainer: Any) -> None:
        pass

    def before_eval(self, trainer: Any) -> None:
        pass

    def teardown(self, trainer: Any) -> None:
        """When training ends or stops: take off what only training needs (hooks that hold the trainer)."""

    def metrics(self, trainer: Any) -> Dict[str, float]:
        """Scalars logged with the training metrics."""
        return {}


@register_callback("track_oscillations")
class TrackOscillations(Callback):
    """Nagel's integer-domain oscillation statistics (:class:`OscillationTracker`), every optimizer step.

    Freezing (Nagel's iterative weight freezing) is on when ``freeze_threshold > 0``: the threshold is 0 for the first
    ``start`` fraction of the steps, then decays by cosine from ``freeze_threshold`` to ``freeze_threshold_final``.
    """

    order = 10

    def __init__(self, momentum: float = 0.001, max_bits: int = 4, report_threshold: float = 0.005,
                 freeze_threshold: float = 0.0, freeze_threshold_final: float = 0.0, start: float = 0.25) -> None:
        self.options = dict(momentum=momentum, max_bits=max_bits, report_threshold=report_threshold)
        self.freeze = (freeze_threshold, freeze_threshold_final, start)
        self.tracker: Optional[OscillationTracker] = None

    def setup(self, trainer: Any) -> None:
        self.tracker = OscillationTracker(trainer.unwrapped_model, **self.options)
        trainer.oscillation_tracker = self.tracker

    def after_step(self, trainer: Any) -> None:
        thr, final, start = self.freeze
        if thr > 0:
            self.tracker.freeze_threshold = cosine_schedule(trainer.step, trainer.total_steps, thr, final, start)
        self.tracker.step()

    def metrics(self, trainer: Any) -> Dict[str, float]:
        out = self.tracker.summary()
        out["freeze_threshold"] = self.tracker.freeze_threshold
        return out


class _ScheduledWeight(Callback):
    """A loss term whose weight is 0 for the first ``start`` fraction of the steps, then rises by cosine to ``weight``."""

    def __init__(self, weight: float, start: float, term: Callable[[nn.Module], torch.Tensor]) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight, self.start, self.term = weight, start, term
        self.current = 0.0
        self.last_value = 0.0

    def extra_loss(self, trainer: Any) -> Optional[torch.Tensor]:
        self.current = cosine_schedule(trainer.step, trainer.total_steps, 0.0, self.weight, self.start)
        if self.current <= 0:
            return None
        value = self.term(trainer.unwrapped_model)
        self.last_value = float(value.detach())
        return self.current * value

    def metrics(self, trainer: Any) -> Dict[str, float]:
        return {f"{self.name}_weight": self.current, f"{self.name}_value": self.last_value}


@register_callback("dampen")
class Dampen(_ScheduledWeight):
    """Nagel's oscillation dampening ``λ(t)·L_dampen`` (λ: 0 -> ``weight`` = 0.1 by cosine after 25 %)."""

    def __init__(self, weight: float = 0.1, start: float = 0.25, aggregation: str = "kernel_mean") -> None:
        super().__init__(weight, start, lambda model: dampening_loss(model, aggregation))


@register_callback("bin_regularizer")
class BinRegularizer(_ScheduledWeight):
    """VVTQ's variation-aware bin regularizer (λ: 0 -> 0.01 by cosine after 25 %)."""

    def __init__(self, weight: float = 0.01, start: float = 0.25) -> None:
        super().__init__(weight, start, bin_regularizer)


@register_callback("confidence_guided_annealing")
class CGACallback(Callback):
    """OFQ's CGA on the named layers' weights (see :class:`ConfidenceGuidedAnnealing`), during the last
    ``last_epochs`` epochs of training (all of it when None); OFQ runs it for its final 30 epochs at lr 1e-5.
    ``gate_products=False`` leaves QKR's ``W_qᵀ W_k`` ungated, as OFQ's code does."""

    def __init__(self, boundary_range: float = 0.005,
                 suffixes: tuple = ("fc1", "fc2", "proj", "v", "qkv", "reduction"),
                 within: Optional[str] = "blocks", last_epochs: Optional[float] = None,
                 gate_products: bool = True) -> None:
        self.options = dict(boundary_range=boundary_range, suffixes=tuple(suffixes), within=within,
                            gate_products=gate_products)
        self.last_epochs = last_epochs
        self.cga: Optional[ConfidenceGuidedAnnealing] = None
        self.trainable = 1.0
        self.active = False

    def setup(self, trainer: Any) -> None:
        self.cga = ConfidenceGuidedAnnealing(trainer.unwrapped_model, **self.options)
        self.cga.gate_active = lambda: self._active(trainer)    # evaluated in each forward pass, at the step it belongs to

    def _active(self, trainer: Any) -> bool:
        if self.last_epochs is None:
            return True
        return trainer.step >= trainer.total_steps - int(round(self.last_epochs * trainer.steps_per_epoch))

    def after_backward(self, trainer: Any) -> None:
        self.active = self._active(trainer)
        self.trainable = self.cga.before_step() if self.active else 1.0

    def after_step(self, trainer: Any) -> None:
        if self.active:
            self.cga.after_step()

    def teardown(self, trainer: Any) -> None:
        self.cga.remove()

    def metrics(self, trainer: Any) -> Dict[str, float]:
        return {"cga_trainable_fraction": self.trainable}


@register_callback("bn_reestimation")
class BNReestimation(Callback):
    """Nagel's batch-norm re-estimation before every evaluation, on ``num_batches`` (50) training batches drawn in a
    fixed seeded order (so it changes neither the data order nor any random state of training)."""

    def __init__(self, num_batches: int = 50) -> None:
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches
        self.used = 0

    def before_eval(self, trainer: Any) -> None:
        from torch.utils.data import DataLoader
        gen = torch.Generator().manual_seed(trainer.config.seed + 7919)
        order = torch.randperm(len(trainer.train_set), generator=gen).tolist()
        loader = DataLoader(trainer.train_set, batch_size=trainer.config.batch_size, sampler=order)
        self.used = reestimate_bn(trainer.unwrapped_model, loader, self.num_batches)

    def metrics(self, trainer: Any) -> Dict[str, float]:
        return {"bn_batches": float(self.used)}
