"""Weight-oscillation tracking and iterative freezing (Nagel et al., ICML 2022), in each layer's own integer domain.

Tracking follows the model's weight sites (:class:`~qvit.nn.WeightSite`): the values each weight quantizer rounds
(with query-key reparameterization, the value rows of ``qkv`` and the product ``W_qᵀ W_k``). For every tracked
site an :class:`OscillationState` (a submodule ``oscillation`` of the quantizer, so
its buffers travel with the model's ``state_dict`` and a resumed run continues them) keeps, per weight:

* ``prev_int``: the integer code after the previous optimizer step; ``prev_dir``: the sign of its last change;
* ``freq``: the EMA ``f ← m·o + (1-m)·f`` of reversals ``o = [sign(x_t - x_{t-1}) = -sign(last change)]``
  (a weight that reverses every ``k`` steps settles near ``1/k``);
* ``reversals`` / ``flips``: counts of reversals and of any code change;
* ``frozen`` / ``frozen_int`` / ``frozen_weight``: the freezing mask, the code a frozen weight keeps, and its latent
  value at freezing; ``ema_int``: the EMA of the code, whose rounding is the frozen code (Nagel's ``use_ema_x_int``).

:meth:`OscillationTracker.step` runs once per optimizer step, after ``optimizer.step()``, and only in training
(evaluation forwards never touch the statistics: the reference code counted them and decayed the EMA there). Each
step follows the reference tracker's order: the code ``x`` the next forward uses (``frozen_int`` where frozen), its
reversal statistics, then freezing. With a freezing threshold ``thr > 0``, every weight whose frequency, updated with
this step's reversal, exceeds ``thr`` is frozen (for good) at ``round(ema_int)`` as it stood before this step, and
re-assigned that value at every step while ``f`` stays above ``thr``; ``ema_int`` then takes this step's ``x``.
A new freeze acts from the next forward. Frozen weights: the forward
uses ``frozen_int`` (dequantized with the current scale, so a learnable scale still trains), and their latent value
is put back after every optimizer step, so neither the gradient nor weight decay moves them. Only sites that are a
whole parameter can be frozen; the others are tracked without freezing.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.prepare import iter_weight_sites
from ..nn import WeightSite
from ..quantizers import Quantizer

#: VVTQ's reporting threshold on ``f`` (m = 0.001); Nagel's freezing thresholds are 0.1 -> 0.01.
DEFAULT_REPORT_THRESHOLD = 0.005
#: log-spaced bins of per-weight reversal counts: 0, 1, 2-3, 4-7, ...
REVERSAL_BINS = 8
DISTANCE_BINS = 10
#: edges of the oscillation-frequency histogram (the last bin is open)
FREQ_EDGES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class OscillationState(nn.Module):
    """Per-weight oscillation statistics of one weight tensor (see the module docstring)."""

    def __init__(self, shape: torch.Size, device: Optional[torch.device] = None) -> None:
        super().__init__()
        kw = dict(device=device)
        self.register_buffer("prev_int", torch.zeros(shape, **kw))
        self.register_buffer("prev_dir", torch.zeros(shape, dtype=torch.int8, **kw))
        self.register_buffer("freq", torch.zeros(shape, **kw))
        self.register_buffer("reversals", torch.zeros(shape, dtype=torch.int32, **kw))
        self.register_buffer("flips", torch.zeros(shape, dtype=torch.int32, **kw))
        self.register_buffer("ema_int", torch.zeros(shape, **kw))
        self.register_buffer("frozen", torch.zeros(shape, dtype=torch.bool, **kw))
        self.register_buffer("frozen_int", torch.zeros(shape, **kw))
        self.register_buffer("frozen_weight", torch.zeros(shape, **kw))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, **kw))
        self.register_buffer("ema_started", torch.zeros((), dtype=torch.bool, **kw))
        self.register_buffer("last_reversed", torch.zeros((), **kw))
        self.register_buffer("last_flipped", torch.zeros((), **kw))

    @torch.no_grad()
    def update(self, raw_int: torch.Tensor, weight: Optional[torch.Tensor], momentum: float, threshold: float) -> None:
        """One optimizer step, in the reference code's order: the code the forward uses (``frozen_int`` where frozen,
        else ``raw_int``), its reversal statistics, then, when ``threshold > 0``, freezing by the frequency just
        updated at the code EMA from before this step, and the EMA update with this step's code. ``weight`` is the
        latent weight (needed only when freezing)."""
        x_int = torch.where(self.frozen, self.frozen_int, raw_int.float())
        if int(self.steps) == 0:
            self.prev_int.copy_(x_int)
        delta = torch.round(x_int - self.prev_int)
        direction = torch.sign(delta).to(torch.int8)
        switched = direction != 0
        reversed_ = (self.prev_dir * direction) == -1
        self.freq.mul_(1 - momentum).add_(reversed_.float(), alpha=momentum)
        self.prev_dir[switched] = direction[switched]
        self.prev_int.copy_(x_int)
        self.reversals += reversed_.int()
        self.flips += switched.int()
        self.last_reversed.fill_(reversed_.float().mean())
        self.last_flipped.fill_(switched.float().mean())
        self.steps += 1
        if threshold > 0:
            if not bool(self.ema_started):
                self.ema_int.copy_(x_int)
                self.ema_started.fill_(True)
            hot = self.freq > threshold
            newly = hot & ~self.frozen
            self.frozen_weight[newly] = weight[newly]
            self.frozen |= hot
            self.frozen_int[hot] = torch.round(self.ema_int[hot])
            self.ema_int.mul_(1 - momentum).add_(x_int, alpha=momentum)


def _freeze_hook(quantizer: Quantizer, args: Tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    """The frozen weights' values in place of the quantizer's output (pure: it reads the frozen state only)."""
    state: OscillationState = quantizer.oscillation
    if not quantizer.enabled or quantizer.observing or not bool(state.frozen.any()):
        return out
    frozen_values = quantizer.dequantize(state.frozen_int.to(torch.int32)).to(out.dtype)
    return torch.where(state.frozen, frozen_values, out)


class OscillationTracker:
    """Tracks (and optionally freezes) the oscillating weights of a prepared model's low-bit weight quantizers.

    Args:
        model: a prepared model whose weight quantizers are calibrated.
        momentum: EMA momentum ``m`` of the oscillation frequency (Nagel's CLI default 0.001).
        max_bits: only weight quantizers with at most this many bits are tracked (8-bit first/last layers are not).
        report_threshold: ``f`` above which a weight counts as oscillating in :meth:`layer_stats`.

    Attaching is idempotent: an ``oscillation`` state already on a quantizer (e.g. loaded from a checkpoint) is kept.
    ``freeze_threshold`` (0: no freezing) is set by the training schedule before each :meth:`step`.
    """

    def __init__(self, model: nn.Module, *, momentum: float = 0.001, max_bits: int = 4,
                 report_threshold: float = DEFAULT_REPORT_THRESHOLD) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.report_threshold = report_threshold
        self.freeze_threshold = 0.0
        self.weights: List[WeightSite] = []
        for site in iter_weight_sites(model):
            q = site.quantizer
            if q.bits > max_bits:
                continue
            value = site.value()
            if not hasattr(q, "oscillation"):
                q.oscillation = OscillationState(value.shape, value.device)
                if site.frozen_in_place:
                    q.register_pure_forward_hook(_freeze_hook)
            elif q.oscillation.freq.shape != value.shape:
                raise ValueError(f"{site.site}: its oscillation state has shape {tuple(q.oscillation.freq.shape)} but "
                                 f"the site now has {tuple(value.shape)} values (was the model changed, e.g. by QKR, "
                                 "after tracking started?)")
            self.weights.append(site)
        if not self.weights:
            raise ValueError(f"no weight quantizer with at most {max_bits} bits to track")

    def __iter__(self) -> Iterator[WeightSite]:
        return iter(self.weights)

    @staticmethod
    def state(site: WeightSite) -> OscillationState:
        """The oscillation statistics of a tracked site."""
        return site.quantizer.oscillation

    @torch.no_grad()
    def step(self) -> None:
        """Call once after every ``optimizer.step()``: restore frozen latent weights, freeze, update statistics."""
        for site in self.weights:
            state = self.state(site)
            if site.frozen_in_place and bool(state.frozen.any()):
                weight = site.parameter
                weight.data[state.frozen] = state.frozen_weight[state.frozen].to(weight.dtype)
            if site.frozen_in_place:
                state.update(site.codes(), site.parameter.detach(), self.momentum, self.freeze_threshold)
            else:       # never frozen: the latent values (a computed product, say) are not needed
                state.update(site.codes(), None, self.momentum, 0.0)

    # ------------------------------------------------------------------ reports
    @torch.no_grad()
    def layer_stats(self) -> List[Dict[str, Any]]:
        """Per tracked weight: ``site``, ``n``, ``bits``, ``osc_fraction`` (``f > report_threshold``), ``mean_freq``,
        ``frozen_fraction``, ``reversed_last_step``/``flipped_last_step`` (fractions), ``reversal_hist``
        (log bins 0, 1, 2-3, 4-7, ..., the last open), ``freq_hist`` (counts of ``f`` between the
        :data:`FREQ_EDGES`, the last bin open), and, when the quantizer exposes ``integer_domain``,
        ``clipped_fraction`` and ``distance_hist`` (``0.5 - |v - round(v)|`` in ``DISTANCE_BINS`` bins of [0, 0.5])."""
        rows = []
        for site in self.weights:
            s = self.state(site)
            n = s.freq.numel()
            rev = s.reversals.float()
            edges = [0.0] + [float(2 ** i) for i in range(REVERSAL_BINS - 1)]
            hist = [int(((rev >= lo) & (rev < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
            hist.append(int((rev >= edges[-1]).sum()))
            row: Dict[str, Any] = dict(
                site=site.site, n=n, bits=site.quantizer.bits, steps=int(s.steps),
                osc_fraction=float((s.freq > self.report_threshold).float().mean()),
                mean_freq=float(s.freq.mean()), frozen_fraction=float(s.frozen.float().mean()),
                reversed_last_step=float(s.last_reversed), flipped_last_step=float(s.last_flipped),
                reversal_hist=hist,
                freq_hist=[int(((s.freq >= lo) & (s.freq < hi)).sum()) for lo, hi in zip(FREQ_EDGES, FREQ_EDGES[1:])]
                + [int((s.freq >= FREQ_EDGES[-1]).sum())])
            pos = site.grid_position()
            if pos is not None:
                qmin, qmax = site.quantizer.code_range()
                clipped = (pos < qmin - 0.5) | (pos > qmax + 0.5)
                dist = (0.5 - (pos - torch.round(pos)).abs())[~clipped]
                row["clipped_fraction"] = float(clipped.float().mean())
                row["distance_hist"] = torch.histc(dist, bins=DISTANCE_BINS, min=0.0, max=0.5).int().tolist()
            rows.append(row)
        return rows

    def summary(self) -> Dict[str, float]:
        """Weight-count-weighted totals over all tracked layers: ``osc_fraction``, ``frozen_fraction``."""
        rows = self.layer_stats()
        total = sum(r["n"] for r in rows)
        return {"osc_fraction": sum(r["osc_fraction"] * r["n"] for r in rows) / total,
                "frozen_fraction": sum(r["frozen_fraction"] * r["n"] for r in rows) / total,
                "mean_freq": sum(r["mean_freq"] * r["n"] for r in rows) / total}


@torch.no_grad()
def commit_frozen(model: nn.Module) -> int:
    """Write every frozen weight's code into the weight itself: ``W[frozen] = dequantize(frozen_int)``.

    During training a frozen weight keeps its latent value and the forward substitutes its frozen code; a model that
    leaves training (a packed checkpoint, ONNX) has no tracker, so the code must be in the weight. On a uniform grid
    ``quantize(dequantize(k)) = k``, so the model computes what it computed before. Returns the number of weights
    written."""
    written = 0
    for site in iter_weight_sites(model):
        state = getattr(site.quantizer, "oscillation", None)
        if state is None or not site.frozen_in_place or not bool(state.frozen.any()):
            continue
        weight = site.parameter
        values = site.quantizer.dequantize(state.frozen_int.to(torch.int32)).to(weight.dtype)
        weight.data[state.frozen] = values[state.frozen]
        written += int(state.frozen.sum())
    return written


def cosine_schedule(step: int, total: int, start: float, end: float, begin: float = 0.25,
                    before: float = 0.0) -> float:
    """``before`` until ``begin * total``, then a cosine from ``start`` to ``end`` at ``total`` (Nagel's
    ``CosineTempDecay`` for the freezing threshold, and the dampening weight's ramp 0 -> 0.1)."""
    t0 = int(begin * total)
    if step < t0:
        return before
    rel = min(1.0, (step - t0) / max(1, total - t0))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * rel))
