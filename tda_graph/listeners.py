"""Dirty notifications and weakly held listeners (psygnal-style)."""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .roi import Roi

if TYPE_CHECKING:
    from .operator import Operator

__all__ = ["DirtyEvent", "Subscription", "ListenerList"]


@dataclass(frozen=True)
class DirtyEvent:
    """The regions of ``node``'s output that changed (one event per propagation)."""

    node: Operator
    rois: tuple[Roi, ...]


class Subscription:
    """Handle returned by :meth:`Graph.subscribe`; call :meth:`disconnect` to stop."""

    def __init__(self, owner: ListenerList, ref: Callable[[], Callable[..., Any] | None]) -> None:
        self._owner = weakref.ref(owner)
        self._ref = ref

    def disconnect(self) -> None:
        owner = self._owner()
        if owner is not None:
            owner._remove(self)

    @property
    def alive(self) -> bool:
        return self._ref() is not None


class ListenerList:
    """Listeners of one node.

    Bound methods are held weakly (a widget that goes away unsubscribes itself);
    plain functions are held strongly until disconnected, as in psygnal, since a
    weakly held lambda would vanish immediately.
    """

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()

    def add(self, callback: Callable[[DirtyEvent], Any]) -> Subscription:
        if not callable(callback):
            raise TypeError(f"listener {callback!r} is not callable")
        if inspect.ismethod(callback):
            ref: Callable[[], Any] = weakref.WeakMethod(callback)
        else:
            ref = lambda cb=callback: cb  # noqa: E731 - a strong "reference"
        sub = Subscription(self, ref)
        with self._lock:
            self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s is not sub]

    def callbacks(self) -> list[Callable[[DirtyEvent], Any]]:
        with self._lock:
            out, alive = [], []
            for s in self._subs:
                cb = s._ref()
                if cb is not None:
                    out.append(cb)
                    alive.append(s)
            self._subs = alive
        return out

    def __len__(self) -> int:
        return len(self.callbacks())
