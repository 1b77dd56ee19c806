"""Per-request timeouts without a timer per request.

A route's timeout is the same for every request it sends, so its deadlines
fall due in the order they were set. :class:`TimeoutQueue` keeps them in a
FIFO served by a single loop timer: setting a timeout is an append and
cancelling it is a flag, where ``loop.call_later`` + ``cancel`` would cost a
timer-heap insert and removal on every request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable


class Timeout:
    """A pending timeout; :meth:`cancel` it when the work finished in time."""

    __slots__ = ("deadline", "callback")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class TimeoutQueue:
    """Timeouts that all last ``duration`` seconds."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self._pending: deque[Timeout] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, callback: Callable[[], None]) -> Timeout:
        """Call ``callback`` in ``duration`` seconds unless cancelled first."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        timeout = Timeout(loop.time() + self.duration, callback)
        pending = self._pending
        # Requests mostly finish in the order they started: dropping the
        # cancelled ones at the front keeps the queue short.
        while pending and pending[0].callback is None:
            pending.popleft()
        pending.append(timeout)
        if self._timer is None:
            self._timer = loop.call_at(timeout.deadline, self._expire)
        return timeout

    def _expire(self) -> None:
        self._timer = None
        pending = self._pending
        now = self._loop.time()  # type: ignore[union-attr]
        while pending:
            head = pending[0]
            if head.callback is None:
                pending.popleft()
            elif head.deadline <= now:
                pending.popleft()
                callback, head.callback = head.callback, None
                callback()
            else:
                self._timer = self._loop.call_at(head.deadline, self._expire)  # type: ignore[union-attr]
                return

    def __len__(self) -> int:
        return sum(1 for t in self._pending if t.callback is not None)
