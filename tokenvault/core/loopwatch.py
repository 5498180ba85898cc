"""The loop watcher: measures how long the node's event loop is kept from running its timers.

A node answers heartbeats, elections and requests from one asyncio loop, so
anything that holds that loop (a long synchronous store call, a snapshot built
inline, a slow callback) delays every timer at once; hold it past an election
timeout and the backups elect a new primary. The watcher makes that visible:
a task sleeps for ``interval_seconds`` (25 ms) over and over and measures, with the
monotonic clock, how much later than asked it woke up. That lateness is the
time the loop was busy with something else (plus the timer's own jitter, up to
about a millisecond under uvloop, whose timers have millisecond resolution).

Each wake-up is observed in ``tokenvault_event_loop_stall_seconds`` (a
histogram, see metrics.py); ``tokenvault_event_loop_stall_max_seconds`` holds
the worst stall of about the last minute, kept as per-second maxima so memory
stays bounded whatever the wake-up rate. A stall of ``warn_after_seconds`` or
more is logged as ``loop.stalled`` with its length only (``stall_ms``,
``threshold_ms``): a stall has no values to leak, and the log says nothing
about what caused it, because the watcher cannot know.

The interval is 25 ms by default, a trade measured on the 2-core development
VM: recording one wake-up costs about 1.3 us, but waking an idle loop costs
about 100 us of (mostly kernel) time, so a 10 ms watcher took 0.8-1 % of a core
on an idle node and a 25 ms one about 0.4-0.5 %; under load the loop is awake
anyway and the watcher's share is far smaller. A stall is under-counted by at
most one interval (it may begin while the watcher sleeps), which is small
against what it is compared with: heartbeats every 100 ms and election
timeouts of a second or more (default timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from tokenvault.logs import get_logger
from tokenvault.metrics import Metrics

log = get_logger("loopwatch")

DEFAULT_INTERVAL_SECONDS = 0.025
DEFAULT_WARN_AFTER_SECONDS = 0.1
DEFAULT_MAX_WINDOW_SECONDS = 60.0
# The worst-stall gauge forgets in steps of one slot: it covers the last
# window_seconds, give or take one slot.
MAX_SLOT_SECONDS = 1.0


class LoopWatch:
    """Observes event-loop stalls into ``metrics`` until stopped (``start()`` then ``await stop()``)."""

    def __init__(self, metrics: Metrics, *, interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
                 warn_after_seconds: float = DEFAULT_WARN_AFTER_SECONDS,
                 max_window_seconds: float = DEFAULT_MAX_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < interval_seconds <= 1.0:
            raise ValueError("interval_seconds must be in (0, 1]")
        if warn_after_seconds <= 0 or max_window_seconds < MAX_SLOT_SECONDS:
            raise ValueError("warn_after_seconds must be positive and max_window_seconds at least 1")
        self.metrics = metrics
        self.interval_seconds = interval_seconds
        self.warn_after_seconds = warn_after_seconds
        self.clock = clock
        self._slots_kept = int(max_window_seconds / MAX_SLOT_SECONDS)
        self._past_slot_maxima: deque[tuple[int, float]] = deque()
        self._slot = -1
        self._slot_max_seconds = 0.0
        self._window_max_seconds = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LoopWatch:
        """Start watching the running loop (call from inside it); returns self."""
        if self._task is not None:
            raise RuntimeError("the loop watcher is already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loopwatch")
        return self

    async def stop(self) -> None:
        """Cancel the watcher and wait until it has ended; safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        clock, interval = self.clock, self.interval_seconds
        while True:
            due = clock() + interval
            await asyncio.sleep(interval)
            self.record(max(0.0, clock() - due))

    def record(self, stall_seconds: float) -> None:
        """Observe one wake-up that came ``stall_seconds`` late (public so tests can feed it)."""
        self.metrics.observe_loop_stall(stall_seconds)
        self._update_window_max(stall_seconds)
        if stall_seconds >= self.warn_after_seconds:
            log.warning("loop.stalled", stall_ms=round(stall_seconds * 1000, 1),
                        threshold_ms=round(self.warn_after_seconds * 1000, 1))

    def _update_window_max(self, stall_seconds: float) -> None:
        slot = int(self.clock() // MAX_SLOT_SECONDS)
        if slot != self._slot:
            # Once per slot: retire the finished slot, forget those older than the window.
            if self._slot >= 0:
                self._past_slot_maxima.append((self._slot, self._slot_max_seconds))
            while self._past_slot_maxima and self._past_slot_maxima[0][0] <= slot - self._slots_kept:
                self._past_slot_maxima.popleft()
            self._slot, self._slot_max_seconds = slot, 0.0
            self._window_max_seconds = max((maximum for _, maximum in self._past_slot_maxima), default=0.0)
            self.metrics.set_loop_stall_max(self._window_max_seconds)
        if stall_seconds > self._slot_max_seconds:
            self._slot_max_seconds = stall_seconds
            if stall_seconds > self._window_max_seconds:
                self._window_max_seconds = stall_seconds
                self.metrics.set_loop_stall_max(stall_seconds)
