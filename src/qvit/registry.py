"""``Registry``: the one name -> object table behind every plug-in point (quantizer kinds, range estimators, PTQ
steps, QAT callbacks, interval-search spaces, quantized module classes)."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Hashable, Iterator, List, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _label(key: Hashable) -> str:
    return key.__qualname__ if isinstance(key, type) else repr(key)


class Registry(Generic[K, V]):
    """Entries keyed by name (or by class); ``what`` names an entry in error messages (``"PTQ step"``).

    Registering a different object under a taken key is refused; registering the same one again is a no-op (a
    module imported twice)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: Dict[K, V] = {}

    def add(self, key: K, value: V) -> V:
        """Register ``value`` as ``key``; returns ``value``."""
        old = self._entries.get(key)
        if old is not None and old is not value and old != value:
            raise ValueError(f"{self.what} {_label(key)} is already registered ({_label(old)})")
        self._entries[key] = value
        return value

    def register(self, key: K) -> Callable[[V], V]:
        """Decorator form of :meth:`add`."""
        return lambda value: self.add(key, value)

    def get(self, key: K) -> V:
        """The entry for ``key``; a ``KeyError`` that lists the known keys otherwise."""
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"unknown {self.what} {_label(key)}; known: {', '.join(self.names())}") from None

    def find(self, cls: type) -> Optional[V]:
        """For class keys: the entry of ``cls`` or of its nearest registered base class; ``None`` if none."""
        for base in cls.__mro__:
            if base in self._entries:
                return self._entries[base]
        return None

    def names(self) -> List[str]:
        """The keys, sorted (class keys by name)."""
        return sorted(k.__qualname__ if isinstance(k, type) else str(k) for k in self._entries)

    def keys(self) -> List[K]:
        """The keys in registration order."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
