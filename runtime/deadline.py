"""A wall-clock deadline per request, so that no bundle (a graph that never emits EOS, a slow graph)
can hold a caller for ever.

    with deadline(30.0):          # the runtime does this around each public call
        ...                       # generation loops call check() each step; ORT runs get RunOptions
                                  # whose ``terminate`` flag a timer sets when the time is up

The active deadline is a context variable (per thread), so concurrent requests on one runtime each have
their own. A nested ``deadline`` never extends an outer one.
"""

from __future__ import annotations

import contextvars
import threading
import time
from contextlib import contextmanager

from runtime.errors import LimitError

_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("blip2_deadline", default=None)
DEFAULT_TIMEOUT_S = 600.0  # per request (a caption on a slow edge CPU takes seconds, not minutes)


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds
        self.expired = False
        self._lock = threading.Lock()
        self._run_options = None  # one ORT RunOptions for every run of this request (they run one by one)

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def error(self) -> LimitError:
        return LimitError(f"the request ran past its deadline of {self.seconds:g} s",
                          hint="raise --timeout (Blip2Runtime(timeout=...)), lower --max-new-tokens, or check the "
                               "bundle: a graph that never ends is refused this way")

    def check(self) -> None:
        if self.expired or time.monotonic() > self.end:
            self.expired = True
            raise self.error()

    def ort_run_options(self, ort):
        """The RunOptions of this request's ORT runs; set to terminate when the deadline passes."""
        with self._lock:
            if self._run_options is None:
                self._run_options = ort.RunOptions()
            if self.expired:
                self._run_options.terminate = True
            return self._run_options

    def fire(self) -> None:
        with self._lock:
            self.expired = True
            if self._run_options is not None:
                self._run_options.terminate = True


def current() -> Deadline | None:
    return _CURRENT.get()


def check() -> None:
    """Raise :class:`LimitError` when the current request's deadline has passed (no-op without one)."""
    d = _CURRENT.get()
    if d is not None:
        d.check()


@contextmanager
def deadline(seconds: float | None):
    """Run the body under a deadline of ``seconds`` (None: none), unless an earlier one is active."""
    outer = _CURRENT.get()
    if seconds is None or (outer is not None and outer.remaining() <= seconds):
        yield outer
        return
    if not seconds > 0:
        raise LimitError(f"timeout must be > 0 seconds (got {seconds})")
    d = Deadline(seconds)
    token = _CURRENT.set(d)
    timer = threading.Timer(seconds, d.fire)
    timer.daemon = True
    timer.start()
    try:
        yield d
    finally:
        timer.cancel()
        _CURRENT.reset(token)
