"""The ``Quantizer`` base class: calibration state machine, granularity plumbing and the code API."""
from __future__ import annotations

import inspect
from abc import ABCMeta, abstractmethod
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .functional import FakeQuantArgs
from .spec import GRANULARITIES, MAX_BITS, MIN_BITS

MAX_OBSERVED_ELEMENTS = 1 << 21
MIN_SCALE = 1e-8


class NotCalibratedError(RuntimeError):
    """A quantizer was asked to quantize before it was calibrated."""


class Quantizer(nn.Module, metaclass=ABCMeta):
    """Fake-quantizes one tensor site; subclasses implement one quantizer family.

    A quantizer is *observing* (collects calibration statistics and returns its input), *quantizing*
    (returns the fake-quantized input, with the family's gradient) or *disabled* (identity).
    Calibration: set ``observing = True``, run data through the model, call :meth:`finalize`.
    With ``calibrate_lazily = True`` an uncalibrated quantizer calibrates itself on its first input instead
    of raising :class:`NotCalibratedError`.

    Parameters are per *column*: one column for ``tensor`` granularity, ``C`` for ``channel`` and
    ``C // group_size`` (or ``num_groups``) for ``group`` (channels counted along ``axis``). Subclasses implement
    :meth:`_init_from_columns`, :meth:`fake_quant`, :meth:`quantize`, :meth:`dequantize` and
    :meth:`code_range`; they keep every calibrated quantity in buffers or parameters.
    """

    kind: ClassVar[str] = "base"
    #: range estimators this family accepts (``init=``); None accepts every registered one.
    supported_inits: ClassVar[Optional[Sequence[str]]] = None

    def __init__(self, bits: int = 8, *, symmetric: bool = True, signed: Optional[bool] = None,
                 granularity: str = "tensor", axis: int = -1, group_size: int = 1, num_groups: Optional[int] = None,
                 init: str = "minmax",
                 for_weights: bool = False, **init_options: Any) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"{type(self).__name__}: bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if granularity == "group" and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1):
            raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
        if self.supported_inits is not None and init not in self.supported_inits:
            raise ValueError(f"{type(self).__name__} supports init in {tuple(self.supported_inits)}, got {init!r}")
        self.init_options = self._check_init_options(init, init_options)
        self.bits = bits
        self.symmetric = symmetric
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size
        self.num_groups = num_groups
        self.init = init
        self.for_weights = for_weights    # a weight quantizer calibrates once, from the first tensor it sees
        self.enabled = True
        self.observing = False
        self.calibrate_lazily = False
        self.site = ""               # set by qvit.prepare: the site's name, for messages
        self.register_buffer("calibrated", torch.tensor(False))
        self._signed_arg = signed
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed), dtype=torch.int8))
        self._observed: list = []
        self._keys: list = []
        self._extremes = None
        self._pure_hooks: set = set()

    def _check_init_options(self, init: str, options: Dict[str, Any]) -> Dict[str, Any]:
        from .ranges import list_ranges, get_range
        if init not in list_ranges():
            if self.supported_inits is None:
                raise ValueError(f"{type(self).__name__}: init must be a range estimator {tuple(list_ranges())}, "
                                 f"got {init!r}")
            if options:
                raise TypeError(f"{type(self).__name__}: unexpected options {sorted(options)}")
            return {}
        if not options:
            return {}
        accepted = set(inspect.signature(get_range(init)).parameters) - {"cols", "extremes"}
        unknown = set(options) - accepted
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected options {sorted(unknown)} "
                            f"(init={init!r} accepts {sorted(accepted)})")
        return dict(options)

    def candidate_ranges(self, cols: torch.Tensor):
        """Candidate ``(lo, hi)`` ranges ``[candidates, columns]`` from the ``init`` range estimator."""
        from .ranges import get_range
        return get_range(self.init)(cols, extremes=self._extremes, **self.init_options)

    # ------------------------------------------------------------------ granularity
    @property
    def signed(self) -> Optional[bool]:
        """Signedness of the integer range (None until decided by calibration)."""
        v = int(self.signed_flag)
        return None if v < 0 else bool(v)

    def channel_axis(self, x: torch.Tensor) -> int:
        """The non-negative index of the channel axis (``axis``) in a tensor shaped like ``x``."""
        axis = self.axis if self.axis >= 0 else x.ndim + self.axis
        if not 0 <= axis < x.ndim:
            raise ValueError(f"{self._name()}: axis {self.axis} out of range for a {x.ndim}-D tensor")
        return axis

    def num_columns(self, x: torch.Tensor) -> int:
        """How many independent parameter sets this quantizer holds for a tensor shaped like ``x``."""
        if self.granularity == "tensor":
            return 1
        c = x.shape[self.channel_axis(x)]
        if self.granularity == "channel":
            return c
        return c // self.group_size_for(c)

    def group_size_for(self, channels: int) -> int:
        """Channels per group for a tensor with ``channels`` channels along ``axis`` (validated)."""
        if self.num_groups is not None:
            if channels % self.num_groups:
                raise ValueError(f"{self._name()}: {channels} channels do not split into {self.num_groups} groups")
            return channels // self.num_groups
        if channels % self.group_size:
            raise ValueError(f"{self._name()}: {channels} channels do not split into groups of {self.group_size}")
        return self.group_size

    def to_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape ``x`` to ``[samples, columns]`` (one column per parameter set)."""
        if self.granularity == "tensor":
            return x.reshape(-1, 1)
        self.num_columns(x)  # validates the axis and the group size with a clear message
        axis = self.channel_axis(x)
        xt = x.movedim(axis, -1)
        c = xt.shape[-1]
        if self.granularity == "channel":
            return xt.reshape(-1, c)
        g = self.group_size_for(c)
        return xt.reshape(-1, c // g, g).transpose(1, 2).reshape(-1, c // g)

    def expand(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-column parameter ``p`` (shape ``[columns]``) against ``x``."""
        if self.granularity == "tensor":
            return p.reshape(())
        axis = self.channel_axis(x)
        if self.granularity == "group":
            p = p.repeat_interleave(x.shape[axis] // p.numel())
        shape = [1] * x.ndim
        shape[axis] = p.numel()
        return p.reshape(shape)

    # ------------------------------------------------------------------ calibration
    def observe(self, x: torch.Tensor) -> None:
        """Record calibration statistics of ``x`` (no gradient, bounded memory).

        The exact per-column minimum and maximum are kept over everything observed; the samples kept for
        percentile/MSE searches are a uniform random subset of all observed rows (reservoir sampling with
        random keys, seeded) once they exceed ``MAX_OBSERVED_ELEMENTS``.
        """
        with torch.no_grad():
            cols = self.to_columns(x.detach()).float()
            if self._observed and cols.shape[1] != self._observed[0].shape[1]:
                raise ValueError(f"{self._name()}: observed tensors changed their column count "
                                 f"({self._observed[0].shape[1]} -> {cols.shape[1]})")
            lo, hi = cols.amin(0), cols.amax(0)
            if self._extremes is not None:
                lo, hi = torch.minimum(lo, self._extremes[0]), torch.maximum(hi, self._extremes[1])
            self._extremes = (lo, hi)
            gen = torch.Generator(device="cpu").manual_seed(len(self._keys))
            self._keys.append(torch.rand(cols.shape[0], generator=gen).to(cols.device))
            self._observed.append(cols)
            keep = max(1, MAX_OBSERVED_ELEMENTS // cols.shape[1])
            if sum(c.shape[0] for c in self._observed) > keep:
                keys, rows = torch.cat(self._keys), torch.cat(self._observed)
                idx = keys.topk(keep, largest=False).indices
                self._keys, self._observed = [keys[idx]], [rows[idx]]

    def has_observations(self) -> bool:
        """Whether :meth:`observe` has recorded data not yet used by :meth:`finalize`."""
        return bool(self._observed)

    def discard_observations(self) -> None:
        """Forget what :meth:`observe` recorded (the parameters stay as they are)."""
        self._observed, self._keys, self._extremes = [], [], None

    def finalize(self) -> None:
        """Compute the quantization parameters from what was observed, then forget the samples."""
        if not self._observed:
            raise NotCalibratedError(f"{self._name()}: finalize() called but no data was observed")
        cols = torch.cat(self._observed)
        self._observed, self._keys = [], []
        try:
            if not (torch.isfinite(self._extremes[0]).all() and torch.isfinite(self._extremes[1]).all()):
                raise ValueError(f"{self._name()}: calibration data contains NaN or Inf")
            if self.signed is None:
                self.signed_flag.fill_(int(bool((self._extremes[0] < 0).any())))
            self._init_from_columns(cols)
        finally:
            self._extremes = None
        self.calibrated.fill_(True)
        self.check_params()

    def calibrate(self, x: torch.Tensor) -> "Quantizer":
        """Observe ``x`` alone and finalize (convenience for weights and tests)."""
        self.observe(x)
        self.finalize()
        return self

    def reset(self) -> None:
        """Forget calibration: the quantizer must be calibrated again before it quantizes."""
        self._observed, self._keys, self._extremes = [], [], None
        self.calibrated.fill_(False)
        self.signed_flag.fill_(-1 if self._signed_arg is None else int(self._signed_arg))

    def check_params(self) -> None:
        """Raise ``ValueError`` if a scale-like parameter is zero, negative, NaN or Inf."""
        for name, t in self.scale_tensors().items():
            bad = ~torch.isfinite(t) | (t <= 0)
            if bool(bad.any()):
                raise ValueError(f"{self._name()}: invalid {name} (zero, negative, NaN or Inf): "
                                 f"{t.detach().flatten()[bad.flatten()][:4].tolist()}")

    def scale_tensors(self) -> Dict[str, torch.Tensor]:
        """The parameters that must be finite and positive (checked after calibration and loading)."""
        return {}

    @torch.no_grad()
    def project_(self, min_scale: float = 1e-5) -> None:
        """Keep learnable scale-like parameters valid after an optimizer step (clamp them to ``>= min_scale``, as
        OFQ's and VVTQ's LSQ do); buffers are left alone."""
        for t in self.scale_tensors().values():
            if isinstance(t, nn.Parameter):
                t.clamp_(min=min_scale)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            if not (self.for_weights and bool(self.calibrated)):
                self.observe(x)
                if self.for_weights:
                    self.finalize()
            return x
        if not bool(self.calibrated):
            if not self.calibrate_lazily:
                raise NotCalibratedError(
                    f"{self._name()} was never calibrated: run qvit.calibrate(model, data) (or a PTQ recipe) "
                    "before evaluating, or set calibrate_lazily to calibrate on the first batch")
            self.calibrate(x)
        return self.fake_quant(x)

    # ------------------------------------------------------------------ hooks and repeatability
    def register_pure_forward_hook(self, hook: Callable) -> RemovableHandle:
        """``register_forward_hook`` for a hook that is deterministic and changes nothing outside its output, so the
        quantizer may run twice for one output (training recomputes quantized operands in the backward pass)."""
        handle = self.register_forward_hook(hook)
        self._pure_hooks.add(handle.id)
        return handle

    def reruns_safely(self) -> bool:
        """Whether running the quantizer again on the same input gives the same output and changes no state: it is
        disabled, or calibrated, not observing, and without hooks other than pure forward hooks."""
        if not self.enabled:
            return True
        if self.observing or not bool(self.calibrated):
            return False    # observing collects statistics; an uncalibrated quantizer would calibrate itself
        if self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks:
            return False
        return all(key in self._pure_hooks for key in self._forward_hooks)

    # ------------------------------------------------------------------ family API
    @abstractmethod
    def _init_from_columns(self, cols: torch.Tensor) -> None:
        ...

    @abstractmethod
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` with the family's gradient."""
        ...

    def fake_quant_args(self, x: torch.Tensor) -> Optional[FakeQuantArgs]:
        """The :class:`FakeQuantArgs` when :meth:`fake_quant` is exactly
        ``affine_fake_quant(x, *args)`` (training code may then compute its gradients directly); ``None`` for other
        grids. A subclass that changes :meth:`fake_quant` must override this too."""
        return None

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (``int32``, within :meth:`code_range`)."""
        ...

    @abstractmethod
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Real values of integer ``codes``; ``dequantize(quantize(x)) == fake_quant(x)``."""
        ...

    @abstractmethod
    def code_range(self) -> Tuple[int, int]:
        """Smallest and largest code :meth:`quantize` can return."""
        ...

    def affine_form(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, int, int]]:
        """``(scale, zero_point, qmin, qmax)`` (both ``[columns]``, integral zero-points) when :meth:`fake_quant` is
        exactly ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``, the form ONNX's
        QuantizeLinear/DequantizeLinear compute; ``None`` for grids that are not uniform integer grids."""
        return None

    def config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild an equivalent quantizer (see ``QuantSpec``)."""
        out = dict(kind=self.kind, bits=self.bits, symmetric=self.symmetric, signed=self.signed,
                   granularity=self.granularity, axis=self.axis, group_size=self.group_size, init=self.init,
                   **self.init_options)
        if self.num_groups is not None:
            out["num_groups"] = self.num_groups
        return out

    @property
    def n_levels(self) -> int:
        lo, hi = self.code_range()
        return hi - lo + 1

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "initialized" in state_dict and prefix + "calibrated" not in state_dict:
            state_dict[prefix + "calibrated"] = state_dict.pop(prefix + "initialized")   # files written before the rename
        # Per-column parameters are sized at calibration; resize before loading so shapes match.
        for name, t in list(self._parameters.items()) + list(self._buffers.items()):
            key = prefix + name
            if t is not None and key in state_dict and state_dict[key].shape != t.shape:
                new = torch.empty_like(state_dict[key], dtype=t.dtype, device=t.device)
                if isinstance(t, nn.Parameter):
                    self._parameters[name] = nn.Parameter(new, requires_grad=t.requires_grad)
                else:
                    self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if bool(self.calibrated):
            try:
                self.check_params()
            except ValueError as err:
                error_msgs.append(str(err))

    @property
    def granularity_label(self) -> str:
        """``tensor``, ``channel``, ``group8`` (8 channels a group) or ``3groups``."""
        if self.granularity != "group":
            return self.granularity
        return f"{self.num_groups}groups" if self.num_groups is not None else f"group{self.group_size}"

    def _name(self) -> str:
        return f"{type(self).__name__}({self.site})" if self.site else type(self).__name__

    def extra_repr(self) -> str:
        state = "calibrated" if bool(self.calibrated) else "uncalibrated"
        return f"bits={self.bits}, {self.granularity_label}, init={self.init}, {state}"



def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a registered buffer or parameter's value, keeping a parameter the same object."""
    with torch.no_grad():
        current = getattr(module, name)
        if isinstance(current, nn.Parameter):
            current.data = value.clone()
        else:
            setattr(module, name, value.clone())


def quantizer_parameters(modules: Iterable[Optional[nn.Module]]) -> List[nn.Parameter]:
    """The trainable parameters (step sizes, offsets, ...) of the quantizers among ``modules``, each once, in order;
    other modules and ``None`` entries are skipped. ``quantizer_parameters(model.modules())`` gives a model's."""
    seen, out = set(), []
    for m in modules:
        if isinstance(m, Quantizer):
            for p in m.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out
