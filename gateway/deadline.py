"""A timeout over a run of awaits that is cheap to push back: the proxy's first-byte and idle timers.

`asyncio.timeout` costs about 4.5 µs a use on CPython 3.11 (a Timeout object, a timer handle, and
`current_task`/`get_running_loop`, which call getpid()); a streamed answer waits once per chunk,
so a timeout per chunk cost more than relaying the chunk. A `Deadline` arms one timer for the whole
run; `push` only stores a later expiry, and the timer, when it fires early, re-arms itself there.
On expiry it cancels the task, and leaving the `with` block turns that cancellation into
`TimeoutError`, as `asyncio.timeout` does (a cancellation from anyone else stays a cancellation).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    __slots__ = ("_loop", "_task", "_at", "_handle", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._loop = loop
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._at = loop.time() + seconds
        self.expired = False
        self._handle = loop.call_at(self._at, self._fire)

    def push(self, seconds: float) -> None:
        """Expire `seconds` from now instead (later or sooner than before)."""
        self._at = self._loop.time() + seconds
        if self.expired:
            return
        if self._at < self._handle.when():  # sooner: the armed timer would fire too late
            self._handle.cancel()
            self._handle = self._loop.call_at(self._at, self._fire)

    def _fire(self) -> None:
        if self._loop.time() < self._at:  # pushed back since the timer was armed
            self._handle = self._loop.call_at(self._at, self._fire)
            return
        self.expired = True
        self._task.cancel()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        if self.expired and self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
