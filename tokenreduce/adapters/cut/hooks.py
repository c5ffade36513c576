"""Hook lifecycle: the forward pre-hooks (and other undo steps) one attachment owns.

Everything registered through a :class:`Hooks` is removed by :meth:`Hooks.remove_all`, in reverse
order, exactly once; :meth:`Hooks.installing` removes what was registered so far when
registration fails, so a failed attach leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Hooks"]


class Hooks:
    """The undo steps of one attachment: hook handles and cleanup callbacks."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def pre_hook(self, module: torch.nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = True) -> None:
        """Register ``fn`` as a forward pre-hook of ``module`` (removed by :meth:`remove_all`)."""
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        self._undo.append(handle.remove)

    def on_remove(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the hooks are removed (after everything registered later)."""
        self._undo.append(fn)

    def remove_all(self) -> None:
        """Undo everything, last registered first; calling it again does nothing."""
        while self._undo:
            self._undo.pop()()

    @property
    def active(self) -> bool:
        return bool(self._undo)

    def __len__(self) -> int:
        return len(self._undo)

    @contextmanager
    def installing(self) -> Iterator[Hooks]:
        """Register hooks in the ``with`` body; on any exception remove them all and re-raise."""
        try:
            yield self
        except BaseException:
            self.remove_all()
            raise
