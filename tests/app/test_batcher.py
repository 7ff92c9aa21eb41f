"""One test (or more) per clause of DynamicBatcher's contract (see app/batcher.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from app.batcher import BatcherClosed, DynamicBatcher, QueueFull


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class Recorder:
    """A real process function: multiplies by 10 and records what it was given."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.started: list[float] = []
        self.ended: list[float] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.gate = gate
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> Sequence[int]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.started.append(time.monotonic())
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        self.ended.append(time.monotonic())
        with self._lock:
            self.active -= 1
        return [x * 10 for x in items]


def make(
    process: Callable[[list[int]], Sequence[int]],
    max_batch_size: int = 4,
    max_delay_s: float = 0.05,
    max_queue: int = 100,
) -> DynamicBatcher[int, int]:
    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        process, max_batch_size=max_batch_size, max_delay_s=max_delay_s, max_queue=max_queue
    )
    batcher.start()
    return batcher


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.002)


def test_submit_returns_a_future_and_infer_awaits_it() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher = make(rec)
        future = batcher.submit(7)
        assert isinstance(future, asyncio.Future)
        assert await future == 70
        assert await batcher.infer(3) == 30
        await batcher.close()

    run(main())


def test_size_flush_starts_a_full_batch_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher = make(rec, max_batch_size=4, max_delay_s=5.0)
        t0 = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        assert results == [0, 10, 20, 30]
        assert rec.batches == [[0, 1, 2, 3]]
        assert rec.started[0] - t0 < 1.0  # far below the 5 s delay
        await batcher.close()

    run(main())


def test_deadline_flush_sends_a_partial_batch_after_the_oldest_waited_the_delay() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher = make(rec, max_batch_size=8, max_delay_s=0.15)
        t0 = time.monotonic()
        first = batcher.submit(1)
        await asyncio.sleep(0.05)
        second = batcher.submit(2)  # joins; the deadline stays the oldest item's
        assert await asyncio.gather(first, second) == [10, 20]
        assert rec.batches == [[1, 2]]
        waited = rec.started[0] - t0
        assert 0.14 <= waited < 0.6, waited
        await batcher.close()

    run(main())


def test_items_that_waited_during_a_batch_flush_as_soon_as_it_ends() -> None:
    async def main() -> None:
        rec = Recorder(delay_s=0.3)
        batcher = make(rec, max_batch_size=4, max_delay_s=0.01)
        first = batcher.submit(1)
        await until(lambda: len(rec.started) == 1)
        later = [batcher.submit(i) for i in (2, 3)]
        assert batcher.queue_depth == 2
        await asyncio.gather(first, *later)
        assert rec.batches == [[1], [2, 3]]
        gap = rec.started[1] - rec.ended[0]
        assert gap < 0.1, gap
        await batcher.close()

    run(main())


def test_one_batch_at_a_time_on_a_worker_thread() -> None:
    async def main() -> None:
        rec = Recorder(delay_s=0.02)
        batcher = make(rec, max_batch_size=2, max_delay_s=0.0)
        await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        assert rec.max_active == 1
        assert threading.current_thread().name not in rec.threads
        assert len(rec.threads) == 1
        await batcher.close()

    run(main())


def test_order_is_kept_within_and_across_batches() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher = make(rec, max_batch_size=4, max_delay_s=0.01)
        futures = [batcher.submit(i) for i in range(10)]
        assert await asyncio.gather(*futures) == [i * 10 for i in range(10)]
        assert [x for b in rec.batches for x in b] == list(range(10))
        assert [len(b) for b in rec.batches] == [4, 4, 2]
        await batcher.close()

    run(main())


def test_full_queue_raises_at_once_and_running_items_do_not_count() -> None:
    async def main() -> None:
        gate = threading.Event()
        rec = Recorder(gate=gate)
        batcher = make(rec, max_batch_size=2, max_delay_s=0.0, max_queue=3)
        running = [batcher.submit(i) for i in (0, 1)]
        await until(lambda: len(rec.started) == 1)  # that batch left the queue
        assert batcher.queue_depth == 0 and batcher.in_flight == 2
        waiting = [batcher.submit(i) for i in (2, 3, 4)]
        assert batcher.queue_depth == 3
        with pytest.raises(QueueFull) as info:
            batcher.submit(5)  # synchronous: no await needed to be refused
        assert info.value.bound == 3 and info.value.waiting == 3
        assert info.value.retry_after_s >= 1.0
        assert not batcher.has_room(1)
        gate.set()
        assert await asyncio.gather(*running, *waiting) == [0, 10, 20, 30, 40]
        assert 5 not in [x for b in rec.batches for x in b]
        await batcher.close()

    run(main())


def test_reserve_is_all_or_nothing_and_releases_unused_slots() -> None:
    async def main() -> None:
        gate = threading.Event()
        rec = Recorder(gate=gate)
        batcher = make(rec, max_batch_size=8, max_delay_s=10.0, max_queue=4)
        batcher.submit(0)
        with pytest.raises(QueueFull):
            batcher.reserve(4)  # 1 waiting + 4 > 4
        assert batcher.reserved == 0
        reservation = batcher.reserve(3)
        assert not batcher.has_room(1)
        with pytest.raises(QueueFull):
            batcher.submit(99)  # the free slots are held
        batcher.submit(1, reservation)  # uses a held slot
        assert batcher.reserved == 2 and batcher.queue_depth == 2
        reservation.release()
        assert batcher.reserved == 0 and batcher.has_room(2)
        gate.set()
        await batcher.close()
        assert [x for b in rec.batches for x in b] == [0, 1]

    run(main())


def test_a_reservation_grows_all_or_nothing() -> None:
    async def main() -> None:
        gate = threading.Event()
        rec = Recorder(gate=gate)
        batcher = make(rec, max_batch_size=8, max_delay_s=10.0, max_queue=4)
        batcher.submit(0)
        reservation = batcher.reserve(1)
        reservation.grow(1)
        assert batcher.reserved == 2 and reservation.remaining == 2
        with pytest.raises(QueueFull) as info:
            reservation.grow(2)  # 1 waiting + 2 held + 2 > 4: nothing is taken
        assert info.value.requested == 2 and info.value.waiting == 3
        assert batcher.reserved == 2 and reservation.remaining == 2
        reservation.grow(1)
        assert not batcher.has_room(1)
        for item in (1, 2, 3):
            batcher.submit(item, reservation)
        assert batcher.reserved == 0 and batcher.queue_depth == 4
        reservation.release()
        with pytest.raises(RuntimeError, match="released"):
            reservation.grow(1)
        gate.set()
        await batcher.close()
        assert [x for b in rec.batches for x in b] == [0, 1, 2, 3]
        with pytest.raises(BatcherClosed):
            batcher.reserve(1)

    run(main())


def test_an_exception_reaches_every_caller_of_the_batch_and_serving_goes_on() -> None:
    async def main() -> None:
        calls: list[list[int]] = []

        def process(items: list[int]) -> list[int]:
            calls.append(items)
            if len(calls) == 1:
                raise ValueError("forward failed")
            return [x + 1 for x in items]

        batcher = make(process, max_batch_size=3, max_delay_s=0.01)
        failing = [batcher.submit(i) for i in range(3)]
        outcomes = await asyncio.gather(*failing, return_exceptions=True)
        assert all(isinstance(o, ValueError) and str(o) == "forward failed" for o in outcomes)
        assert await batcher.infer(5) == 6
        await batcher.close()

    run(main())


def test_a_wrong_number_of_results_fails_every_caller() -> None:
    async def main() -> None:
        batcher = make(lambda items: items[:-1], max_batch_size=2, max_delay_s=0.01)
        outcomes = await asyncio.gather(
            batcher.submit(1), batcher.submit(2), return_exceptions=True
        )
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert "1 results for 2 items" in str(outcomes[0])
        await batcher.close()

    run(main())


def test_cancelling_a_waiting_caller_removes_its_item_only() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher = make(rec, max_batch_size=8, max_delay_s=0.2)
        keep_a = batcher.submit(1)
        gone = batcher.submit(2)
        keep_b = batcher.submit(3)
        assert batcher.queue_depth == 3
        gone.cancel()
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
        assert batcher.queue_depth == 2
        assert await asyncio.gather(keep_a, keep_b) == [10, 30]
        assert rec.batches == [[1, 3]]
        await batcher.close()

    run(main())


def test_an_item_cancelled_just_before_its_batch_forms_is_never_processed() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher = make(rec, max_batch_size=8, max_delay_s=0.0)
        keep = batcher.submit(1)  # wakes the collector: it runs before the cancel callback
        gone = batcher.submit(2)
        gone.cancel()
        assert await keep == 10
        assert rec.batches == [[1]]
        assert batcher.queue_depth == 0 and batcher.processed == 1
        await batcher.close()

    run(main())


def test_a_timed_out_caller_does_not_break_the_batch() -> None:
    async def main() -> None:
        rec = Recorder(delay_s=0.2)
        batcher = make(rec, max_batch_size=4, max_delay_s=0.01)

        async def impatient() -> int:
            async with asyncio.timeout(0.05):
                return await batcher.infer(1)

        patient = batcher.submit(2)
        with pytest.raises(TimeoutError):
            await impatient()  # cancelled while its batch runs
        assert await patient == 20
        assert rec.batches[0] == [2, 1]  # the cancelled item was in the running batch
        assert await batcher.infer(4) == 40  # still serving
        await batcher.close()

    run(main())


def test_close_drains_waiting_items_and_refuses_new_ones() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher = make(rec, max_batch_size=8, max_delay_s=30.0)
        waiting = [batcher.submit(i) for i in range(3)]
        t0 = time.monotonic()
        await batcher.close(drain=True)
        assert time.monotonic() - t0 < 5.0  # did not wait for the 30 s delay
        assert [f.result() for f in waiting] == [0, 10, 20]
        with pytest.raises(BatcherClosed):
            batcher.submit(9)
        with pytest.raises(BatcherClosed):
            batcher.reserve(1)

    run(main())


def test_close_without_drain_fails_waiting_items_after_the_running_batch() -> None:
    async def main() -> None:
        gate = threading.Event()
        rec = Recorder(gate=gate)
        batcher = make(rec, max_batch_size=1, max_delay_s=0.0)
        running = batcher.submit(1)
        await until(lambda: len(rec.started) == 1)
        waiting = batcher.submit(2)
        closing = asyncio.ensure_future(batcher.close(drain=False))
        await asyncio.sleep(0.05)
        assert not closing.done()  # waits for the running batch
        gate.set()
        await closing
        assert running.result() == 10
        with pytest.raises(BatcherClosed):
            waiting.result()
        assert rec.batches == [[1]]

    run(main())


def test_constructor_validates_its_bounds() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(lambda x: x, max_batch_size=0, max_delay_s=0.0, max_queue=1)
    with pytest.raises(ValueError, match="max_delay_s"):
        DynamicBatcher(lambda x: x, max_batch_size=1, max_delay_s=-1.0, max_queue=1)
    with pytest.raises(ValueError, match="max_queue"):
        DynamicBatcher(lambda x: x, max_batch_size=1, max_delay_s=0.0, max_queue=0)
