"""Dynamic batching: merge concurrent single-item requests into one forward pass.

Contract of :class:`DynamicBatcher` (each clause has a test in tests/app/test_batcher.py):

1. **Submit.** ``submit(item)`` enqueues at once and returns an ``asyncio.Future`` for
   that item's result; ``await batcher.infer(item)`` is the same in one step.
2. **Size flush.** As soon as ``max_batch_size`` items are waiting, a batch of exactly
   ``max_batch_size`` starts (when no batch is running) without waiting for the delay.
3. **Deadline flush.** Otherwise a batch starts when the *oldest* waiting item has waited
   ``max_delay_s`` since it was submitted, with every item waiting then (at most
   ``max_batch_size``). Items that waited while the previous batch ran are therefore
   flushed as soon as it ends.
4. **One batch at a time.** ``process(items)`` runs on the executor (a worker thread, never
   the event loop), one batch at a time per batcher; items submitted meanwhile wait.
5. **Order kept.** Batches are formed first-in first-out, ``process`` receives the items in
   submission order, and result ``i`` goes to the caller of item ``i``.
6. **Bounded queue.** At most ``max_queue`` items wait (items of a running batch no longer
   count). ``submit`` beyond that raises :class:`QueueFull` immediately, without awaiting.
   ``reserve(n)`` holds ``n`` slots all-or-nothing for a request that submits its items as
   they become ready; slots it does not use go back on ``release()``. ``grow(n)`` adds
   ``n`` slots to a reservation, all or nothing (a request whose body reveals its items one
   at a time holds a slot before reading and one more per item it finds).
7. **Errors reach every caller.** If ``process`` raises, every caller in that batch gets
   that exception; if it returns a number of results other than the number of items,
   every caller gets a ``RuntimeError``. The batcher goes on serving later batches.
8. **Cancellation is isolated.** A caller cancelled (or timed out) while waiting is taken
   out of the queue and its item is never processed, even when a batch is formed before
   the cancellation's callbacks have run; one cancelled while its batch runs simply does
   not receive the result. Other callers in the batch are unaffected. Cancelling the
   futures is how the items of a client that went away are withdrawn.
9. **Close.** After ``close()`` starts, ``submit`` raises :class:`BatcherClosed`. With
   ``drain=True`` (the default) items already waiting are processed without waiting for
   the delay; with ``drain=False`` they fail with :class:`BatcherClosed`. ``close()``
   returns once the running batch has finished.

Cost note: one event-loop wake-up per submitted item and one executor hop per batch; the
executor hop is the only thread switch on the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("app.batcher")

_WAITING, _TAKEN, _DROPPED = 0, 1, 2


class QueueFull(Exception):
    """The queue is at its bound; ``retry_after_s`` estimates when it will have room."""

    def __init__(self, waiting: int, bound: int, requested: int, retry_after_s: float) -> None:
        self.waiting = waiting
        self.bound = bound
        self.requested = requested
        self.retry_after_s = retry_after_s
        super().__init__(
            f"queue full: {waiting} image(s) waiting or reserved, bound {bound}, "
            f"{requested} more requested"
        )


class BatcherClosed(Exception):
    """The batcher is shutting down (the model version is being unloaded or the service stops)."""


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for metrics."""

    size: int
    queue_waits_s: list[float]
    run_s: float
    ok: bool


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued_at: float
    state: int = _WAITING


@dataclass(eq=False)
class Reservation:
    """Queue slots held for items that a request will submit soon (see clause 6)."""

    batcher: DynamicBatcher[Any, Any]
    remaining: int
    _released: bool = field(default=False, repr=False)

    def grow(self, n: int) -> None:
        """Hold ``n`` more slots, all or nothing; raise QueueFull or BatcherClosed."""
        if self._released:
            raise RuntimeError("grow() on a released reservation")
        self.batcher._hold(n)
        self.remaining += n

    def release(self) -> None:
        """Give back the slots not used by ``submit`` (idempotent)."""
        if not self._released:
            self._released = True
            self.batcher._reserved -= self.remaining
            self.remaining = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class DynamicBatcher(Generic[T, R]):
    """Merge concurrently submitted items into batches for ``process`` (contract above)."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        executor: Executor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.name = name
        self._on_batch = on_batch
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{name}-infer"
        )
        self._queue: deque[_Pending[T, R]] = deque()
        self._waiting = 0  # live (not cancelled, not taken) items in _queue
        self._reserved = 0
        self._running = 0  # items in the batch being processed
        self._closing = False
        self._drain = True
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._per_item_s = 0.0  # smoothed processing time per item, for Retry-After
        self.batches = 0
        self.processed = 0

    # -- state --------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (reserved slots not included)."""
        return self._waiting

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def in_flight(self) -> int:
        """Items waiting plus items in the running batch."""
        return self._waiting + self._running

    @property
    def closed(self) -> bool:
        return self._closing

    def has_room(self, n: int = 1) -> bool:
        return not self._closing and self._waiting + self._reserved + n <= self.max_queue

    def retry_after_s(self) -> float:
        """Rough time until the queue has drained (at least one second for Retry-After)."""
        backlog = self._waiting + self._reserved + self._running
        return max(1.0, backlog * self._per_item_s)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the collecting task on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = self._loop.create_task(self._collect(), name=f"{self.name}-collector")

    async def close(self, drain: bool = True) -> None:
        """Stop accepting; process (``drain``) or fail what waits; wait for the running batch."""
        if self._task is None:
            self._closing = True
            self._fail_waiting(BatcherClosed(f"{self.name} is closed"))
            return
        if not self._closing:
            self._closing = True
            self._drain = drain
            if not drain:
                self._fail_waiting(BatcherClosed(f"{self.name} closed before processing"))
            assert self._wakeup is not None
            self._wakeup.set()
        await asyncio.shield(self._task)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # -- submitting ---------------------------------------------------------------------
    def reserve(self, n: int) -> Reservation:
        """Hold ``n`` queue slots, all or nothing; raise QueueFull when they do not fit."""
        self._hold(n)
        return Reservation(self, n)

    def _hold(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a reservation needs n >= 1, got {n}")
        self._check_open()
        if self._waiting + self._reserved + n > self.max_queue:
            raise QueueFull(self._waiting + self._reserved, self.max_queue, n, self.retry_after_s())
        self._reserved += n

    def submit(self, item: T, reservation: Reservation | None = None) -> asyncio.Future[R]:
        """Enqueue ``item`` and return the future of its result (clause 1, 6, 9)."""
        self._check_open()
        assert self._loop is not None and self._wakeup is not None, "call start() first"
        if reservation is not None and reservation.remaining > 0:
            reservation.remaining -= 1
            self._reserved -= 1
        elif self._waiting + self._reserved + 1 > self.max_queue:
            raise QueueFull(self._waiting + self._reserved, self.max_queue, 1, self.retry_after_s())
        future: asyncio.Future[R] = self._loop.create_future()
        pending = _Pending(item, future, self._loop.time())
        future.add_done_callback(lambda _f: self._on_done(pending))
        self._queue.append(pending)
        self._waiting += 1
        self._wakeup.set()
        return future

    async def infer(self, item: T) -> R:
        """Submit and await; cancelling the awaiting task cancels the item (clause 8)."""
        return await self.submit(item)

    def _check_open(self) -> None:
        if self._closing:
            raise BatcherClosed(f"{self.name} is closed")

    def _on_done(self, pending: _Pending[T, R]) -> None:
        # Runs for every future; only a cancellation while still queued changes counts.
        if pending.state == _WAITING:
            pending.state = _DROPPED
            self._waiting -= 1

    def _fail_waiting(self, exc: BaseException) -> None:
        while self._queue:
            pending = self._queue.popleft()
            if pending.state == _WAITING:
                pending.state = _DROPPED
                self._waiting -= 1
                if not pending.future.done():
                    pending.future.set_exception(exc)

    # -- collecting ---------------------------------------------------------------------
    def _live(self, pending: _Pending[T, R]) -> bool:
        # A future cancelled a moment ago still reads _WAITING until its done callback
        # runs on a later loop iteration; drop it here so it is never processed.
        if pending.state == _WAITING and pending.future.done():
            self._on_done(pending)
        return pending.state == _WAITING

    def _head(self) -> _Pending[T, R] | None:
        while self._queue and not self._live(self._queue[0]):
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    def _take(self) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if not self._live(pending):
                continue
            pending.state = _TAKEN
            self._waiting -= 1
            batch.append(pending)
        return batch

    async def _collect(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        wakeup, loop = self._wakeup, self._loop
        try:
            while True:
                head = self._head()
                if head is None:
                    if self._closing:
                        return
                    wakeup.clear()
                    await wakeup.wait()
                    continue
                # Deadline flush: wait for more items until the oldest has waited max_delay.
                while self._waiting < self.max_batch_size and not self._closing:
                    head = self._head()
                    if head is None:
                        break
                    deadline = head.enqueued_at + self.max_delay_s
                    if loop.time() >= deadline:
                        break
                    wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(deadline):
                            await wakeup.wait()
                batch = self._take()
                if batch:
                    await self._run(batch)
        except BaseException as exc:
            # A bug here must not leave callers hanging: fail them all, refuse new work.
            self._closing = True
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("%s collector crashed", self.name)
            self._fail_waiting(BatcherClosed(f"{self.name} stopped: {exc!r}"))
            raise

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        assert self._loop is not None
        started = self._loop.time()
        waits = [started - p.enqueued_at for p in batch]
        items = [p.item for p in batch]
        self._running = len(batch)
        t0 = time.perf_counter()
        ok = False
        try:
            results = await self._loop.run_in_executor(self._executor, self.process, items)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: process returned {len(results)} results for {len(batch)} items"
                )
        except BaseException as exc:
            failure: BaseException = exc
            if not isinstance(exc, Exception):  # cancelled while the batch ran
                failure = BatcherClosed(f"{self.name} stopped while processing")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(failure)
            if failure is not exc:
                raise
        else:
            ok = True
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        finally:
            self._running = 0
        run_s = time.perf_counter() - t0
        self.batches += 1
        self.processed += len(batch)
        per_item = run_s / len(batch)
        smoothed = 0.8 * self._per_item_s + 0.2 * per_item
        self._per_item_s = per_item if self.batches == 1 else smoothed
        if self._on_batch is not None:
            try:
                self._on_batch(BatchStats(len(batch), waits, run_s, ok))
            except Exception:
                log.exception("%s on_batch hook failed", self.name)
