"""What every peer run shares with qvit's QAT table: the reference model and data, the data order, the budget, the
oscillation measure and the run records.

The peers' own code (a checkout whose path is given on the command line) supplies the quantizers, the training
remedies and their schedules; this module supplies only what must be the same on both sides of the comparison:

* the reference FP model and the data of ``benchmarks/qat_table.py``: a seeded 10,000-image subset of the
  Fashion-MNIST training set, the seeded 2,000-image test subset, in the eval transform;
* the data order of qvit's trainer (a seeded permutation per epoch, incomplete last batch dropped);
* the oscillation measure: qvit's :class:`~qvit.qat.OscillationState` per tracked weight tensor, fed that side's own
  integer codes once per optimizer step (EMA momentum 0.001, no freezing);
* the run records (``<out>.partial.jsonl``, one line per finished run, under the settings of the QAT table).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import qvit
from qvit.data import build_dataset, create_loader, subset
from qvit.data.transforms import create_eval_transform
from qvit.models import reference_weights_id
from qvit.qat import OscillationState
from qvit.qat.oscillation import DEFAULT_REPORT_THRESHOLD
from qvit.qat.trainer import EpochPermutation
from qvit.report import append_run, load_runs

RESULTS = Path(__file__).resolve().parents[1] / "results"
#: the budget of ``benchmarks/results/qat_table_long``
EPOCHS, BATCH, TRAIN_IMAGES, EVAL_IMAGES = 8, 32, 10000, 2000
#: the last checkpoint interval of those runs (``qat_table.py``'s window measure)
WINDOW_START = 2400
LOG_EVERY = 20


def add_checkout(path: Path, marker: str) -> Path:
    """Put a peer's checkout first on ``sys.path`` after checking that ``path/marker`` exists."""
    path = Path(path).expanduser().resolve()
    if not (path / marker).is_file():
        raise SystemExit(f"{path} does not look like the peer's checkout (no {marker})")
    sys.path.insert(0, str(path))
    return path


def reference_data(train_images: int = TRAIN_IMAGES, eval_images: int = EVAL_IMAGES
                   ) -> Tuple[nn.Module, Dataset, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """``(float model, training set, evaluation batches)`` exactly as ``benchmarks/qat_table.py`` builds them."""
    model = qvit.create_reference_model().eval()
    transform = create_eval_transform(model)
    test = subset(build_dataset(None, "val", transform), eval_images, 0)
    xs, ys = zip(*create_loader(test, batch_size=500))
    batches = list(zip(torch.cat(xs).split(500), torch.cat(ys).split(500)))
    train = subset(build_dataset(None, "train", transform), train_images, 0)
    return model, train, batches


def train_batches(train_set: Dataset, batch_size: int, epochs: int, seed: int,
                  total_steps: Optional[int] = None) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(step, epoch, images, labels)`` in qvit's trainer order (steps count from 1); stops after ``total_steps``."""
    sampler = EpochPermutation(len(train_set), seed)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True)
    step = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            step += 1
            yield step, epoch, x, y
            if total_steps is not None and step >= total_steps:
                return


class CodeTracker:
    """qvit's oscillation statistics over named integer-code tensors, one :meth:`step` per optimizer step."""

    def __init__(self, shapes: Mapping[str, torch.Size], momentum: float = 0.001,
                 threshold: float = DEFAULT_REPORT_THRESHOLD) -> None:
        self.states = {name: OscillationState(torch.Size(shape)) for name, shape in shapes.items()}
        self.momentum, self.threshold = momentum, threshold
        self.steps = 0
        self.peak = (0.0, 0)
        self.window_base: Optional[Dict[str, torch.Tensor]] = None

    @torch.no_grad()
    def step(self, codes: Mapping[str, torch.Tensor]) -> None:
        if set(codes) != set(self.states):
            raise ValueError(f"codes for {sorted(set(codes) ^ set(self.states))} missing or unexpected")
        for name, c in codes.items():
            self.states[name].update(c.detach().float().cpu(), None, self.momentum, 0.0)
        self.steps += 1
        if self.steps == WINDOW_START:
            self.window_base = {n: s.reversals.clone() for n, s in self.states.items()}
        if self.steps % LOG_EVERY == 0:
            frac = self._fraction(lambda s: s.freq > self.threshold)
            if frac > self.peak[0]:
                self.peak = (frac, self.steps)

    def _fraction(self, test) -> float:
        hit = sum(int(test(s).sum()) for s in self.states.values())
        return hit / sum(s.freq.numel() for s in self.states.values())

    def summary(self) -> Dict[str, Any]:
        """The measures of ``qat_table.py``: final EMA fraction, >= 4 reversals, reversed in the last step, peak
        over the logged steps, reversed at least once since step :data:`WINDOW_START`."""
        n = sum(s.freq.numel() for s in self.states.values())
        out = dict(osc_fraction=self._fraction(lambda s: s.freq > self.threshold),
                   repeat_reversal_fraction=self._fraction(lambda s: s.reversals >= 4),
                   reversed_last_step=sum(float(s.last_reversed) * s.freq.numel() for s in self.states.values()) / n,
                   peak_osc_fraction=self.peak[0], peak_osc_step=self.peak[1], tracked_weights=n)
        if self.window_base is not None:
            hit = sum(int((s.reversals - self.window_base[name] >= 1).sum()) for name, s in self.states.items())
            out.update(window_reversed_fraction=hit / n, window_steps=[WINDOW_START, self.steps])
        return out


@torch.no_grad()
def evaluate_top1(model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 (%) of ``model`` in eval mode on the evaluation batches."""
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
    return 100.0 * correct / sum(len(y) for _, y in batches)


def run_settings(steps: Optional[int] = None) -> Dict[str, Any]:
    """The settings a record is valid under: those of the QAT table (a shortened smoke run says its steps)."""
    settings = dict(weights=reference_weights_id(), epochs=float(EPOCHS), train_images=TRAIN_IMAGES,
                    eval_images=EVAL_IMAGES, bn_epochs=1.0, batch_size=BATCH)
    if steps is not None:
        settings["steps"] = steps
    return settings


def done_runs(out: Path, steps: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    return load_runs(Path(out).with_suffix(".partial.jsonl"), run_settings(steps))


def record(out: Path, rec: Dict[str, Any], steps: Optional[int] = None) -> Dict[str, Any]:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return append_run(Path(out).with_suffix(".partial.jsonl"), rec, run_settings(steps))


class Progress:
    """A line on stderr every ``every`` steps: step, loss, seconds per step."""

    def __init__(self, label: str, total: int, every: int = 100) -> None:
        self.label, self.total, self.every = label, total, every
        self.t0 = self.t_last = time.time()

    def __call__(self, step: int, loss: float) -> None:
        if step % self.every and step != self.total:
            return
        now = time.time()
        print(f"{self.label}: step {step}/{self.total} loss {loss:.4f} "
              f"({(now - self.t_last) / self.every:.3f} s/step)", file=sys.stderr, flush=True)
        self.t_last = now

    @property
    def seconds(self) -> float:
        return time.time() - self.t0
