"""One kind of registry for the seams: backends, runtime families (here), engine builders and export families
(:mod:`engines.engine_builders`, :mod:`blip2_export.families`) are each a :class:`Registry`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from runtime.errors import Blip2Error

K = TypeVar("K")
V = TypeVar("V")


def _label(key: Any) -> str:
    return str(getattr(key, "value", key))  # enums (e.g. runtime.contract.Family) by their value


class Registry(dict[K, V], Generic[K, V]):
    """Registered pieces of one kind by key, in registration order. :meth:`register` refuses a second,
    different piece under a key; :meth:`find` names the known keys when one is missing."""

    def __init__(self, what: str, key: Callable[[V], K], hint: str | None = None):
        super().__init__()
        self.what, self.key, self.hint = what, key, hint

    def register(self, item: V) -> V:
        k = self.key(item)
        if k in self and self[k] is not item and self[k] != item:
            raise ValueError(f"{self.what} {_label(k)!r} is registered twice")
        self[k] = item
        return item

    def unregister(self, key: K) -> None:
        self.pop(key, None)

    def names(self) -> tuple[str, ...]:
        return tuple(_label(k) for k in self)

    def find(self, key: K) -> V:
        try:
            return self[key]
        except KeyError:
            raise Blip2Error(f"unknown {self.what} {_label(key)!r}; known: {', '.join(self.names())}",
                             hint=self.hint) from None
