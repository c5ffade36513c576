"""Progress of ``eval`` and ``bench``: a tqdm bar on a terminal, one line per phase elsewhere.

A tqdm bar redraws itself with carriage returns; written to a file or a CI log it becomes
thousands of partial lines.  :func:`progress_bar` therefore returns a tqdm bar only when the
stream it writes to is a terminal, and otherwise a :class:`LineProgress`: the same calls
(``update``, ``set_postfix_str``, ``close``), but it prints one complete line each time a phase
ends (a phase is what ``set_postfix_str`` names: a configuration in ``eval``, one run of a
configuration in ``bench``).  See docs/cli.md (Progress).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["LineProgress", "progress_bar"]


class LineProgress:
    """A tqdm-like progress report that prints one line per finished phase to ``file``.

    ``set_postfix_str(name)`` starts phase ``name`` (ending the previous one); ``close()`` ends
    the last.  A line reads ``eval: vanilla done: 1000 in 4.2 s [1000/37000]``: the units the
    phase counted, its wall time and the running total.
    """

    def __init__(self, total: int | None = None, desc: str = "", disable: bool = False, file: TextIO | None = None):
        self.total, self.desc, self.disable = total, desc, disable
        self.file = file
        self.n = 0
        self._phase: str | None = None
        self._phase_n = 0
        self._phase_start = time.perf_counter()
        self._closed = False

    def _emit(self) -> None:
        if self.disable or self._phase is None:
            return
        seconds = time.perf_counter() - self._phase_start
        of = f"/{self.total}" if self.total is not None else ""
        stream = self.file if self.file is not None else sys.stderr
        print(f"{self.desc}: {self._phase} done: {self._phase_n} in {seconds:.1f} s [{self.n}{of}]", file=stream)
        stream.flush()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        if s == self._phase:
            return
        self._emit()
        self._phase, self._phase_n, self._phase_start = s, 0, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._phase_n += n

    def close(self) -> None:
        if not self._closed:
            self._emit()
            self._closed = True


def progress_bar(
    total: int, desc: str, enabled: bool = True, file: TextIO | None = None, tty: bool | None = None, **kwargs: Any
) -> Any:
    """A progress report on ``file`` (default ``sys.stderr``): a tqdm bar when that stream is a
    terminal (or ``tty=True``), else a :class:`LineProgress`; silent when ``enabled`` is false."""
    stream = file if file is not None else sys.stderr
    if tty is None:
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty and isatty())
    if tty:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=stream, **kwargs)
    return LineProgress(total=total, desc=desc, disable=not enabled, file=stream)
