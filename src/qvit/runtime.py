"""Process-wide switches and paths, in one place (as timm's ``layers/config.py`` keeps its own).

Every switch starts from an environment variable, read here and nowhere else, and can be changed for the process
(:func:`set_settings`) or for a block (``with qvit.settings(fused=False): ...``, restored on exit, nestable)::

    fused           QVIT_FUSED=0           compiled fake-quantization kernels in training (on)
    recompute       QVIT_RECOMPUTE=0       quantized operands recomputed in the backward pass instead of stored (on)
    static_kernels  QVIT_STATIC_KERNELS=0  hot kernel signatures compiled to static graphs, CPU only (on)
    debug           QVIT_DEBUG=1           the CLI shows tracebacks instead of one-line errors (off)
    cache_dir       QVIT_CACHE             downloaded or trained reference weights ($XDG_CACHE_HOME/qvit)
    fashion_mnist   QVIT_FASHION_MNIST     the Fashion-MNIST idx files (Debian's dataset-fashion-mnist path)

None of them changes a number beyond float rounding: ``fused``, ``recompute`` and ``static_kernels`` only choose how
the same arithmetic runs (see :mod:`qvit.kernels`). The caches that machinery keeps are bounded by the limits below.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

#: Debian's ``dataset-fashion-mnist`` package installs the idx files here
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _cache_default() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("QVIT_CACHE") or os.path.join(base, "qvit"))


@dataclass(frozen=True)
class Settings:
    """The values in force (see the module docstring for each switch)."""

    fused: bool = True
    recompute: bool = True
    static_kernels: bool = True
    debug: bool = False
    cache_dir: Path = Path(".")
    fashion_mnist: Path = FASHION_MNIST_DEFAULT
    #: calls of one kernel signature before it is compiled statically (a training step repeats each once per block)
    static_promote_after: int = 32
    #: most statically compiled signatures kept; beyond that the oldest are dropped
    static_max_signatures: int = 256
    #: compiled variants allowed per Dynamo-compiled kernel (ranks, broadcast patterns, strides, dtypes each make one)
    recompile_limit: int = 64
    #: most pooled scratch buffers kept per dtype and thread (CPU)
    scratch_max_pooled: int = 8

    @classmethod
    def from_environment(cls) -> "Settings":
        """The settings the environment variables give."""
        return cls(fused=_flag("QVIT_FUSED", True), recompute=_flag("QVIT_RECOMPUTE", True),
                   static_kernels=_flag("QVIT_STATIC_KERNELS", True), debug=_flag("QVIT_DEBUG", False),
                   cache_dir=_cache_default(),
                   fashion_mnist=Path(os.environ.get("QVIT_FASHION_MNIST") or FASHION_MNIST_DEFAULT))


_LOCK = threading.Lock()
_CURRENT: Optional[Settings] = None
_LISTENERS: List[Callable[[Settings, Settings], None]] = []


def get_settings() -> Settings:
    """The settings in force (from the environment until something changes them)."""
    global _CURRENT
    if _CURRENT is None:
        with _LOCK:
            if _CURRENT is None:
                _CURRENT = Settings.from_environment()
    return _CURRENT


def _checked(changes: Dict[str, Any]) -> Dict[str, Any]:
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown qvit settings {unknown}; known: {sorted(names)}")
    out = dict(changes)
    for name in ("cache_dir", "fashion_mnist"):
        if name in out:
            out[name] = Path(out[name])
    for name in ("static_promote_after", "static_max_signatures", "recompile_limit", "scratch_max_pooled"):
        if name in out and int(out[name]) < 1:
            raise ValueError(f"{name} must be >= 1, got {out[name]}")
    return out


def _install(new: Settings) -> Settings:
    global _CURRENT
    old = get_settings()
    _CURRENT = new
    for listener in list(_LISTENERS):
        listener(old, new)
    return old


def set_settings(**changes: Any) -> Settings:
    """Change settings for the rest of the process; returns the new settings."""
    new = dataclasses.replace(get_settings(), **_checked(changes))
    _install(new)
    return new


@contextmanager
def settings(**changes: Any) -> Iterator[Settings]:
    """Change settings inside a ``with`` block; the previous ones come back when it ends (also on error)."""
    new = dataclasses.replace(get_settings(), **_checked(changes))
    old = _install(new)
    try:
        yield new
    finally:
        _install(old)


def on_change(listener: Callable[[Settings, Settings], None]) -> None:
    """Call ``listener(old, new)`` whenever the settings change (caches that depend on them use this)."""
    _LISTENERS.append(listener)
