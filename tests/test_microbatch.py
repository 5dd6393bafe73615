"""The replica's batcher: who shares a batch, how big it gets, what a failure does."""

from __future__ import annotations

import asyncio
from typing import Sequence

import pytest

from serve_app.serving.batching import MicroBatcher


def _recording(batches: list[list[int]]) -> MicroBatcher[int]:
    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        return [item * 10 for item in items]

    return MicroBatcher(run, lambda item: item, max_rows=10)


async def turns(count: int) -> None:
    """Lets the event loop run `count` times (callbacks scheduled with call_soon run)."""
    for _ in range(count):
        await asyncio.sleep(0)


def test_requests_in_the_same_loop_turn_share_one_batch() -> None:
    batches: list[list[int]] = []
    batcher = _recording(batches)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(batcher.submit(n) for n in (1, 2, 3))))

    assert asyncio.run(main()) == [10, 20, 30]
    assert batches == [[1, 2, 3]]


def test_a_lone_request_runs_without_waiting_for_company() -> None:
    batches: list[list[int]] = []
    batcher = _recording(batches)

    async def main() -> list[object]:
        first = batcher.submit(4)
        await turns(1)  # one turn of the loop and no time at all: the batch has run
        second = batcher.submit(5)  # a later turn: a batch of its own
        await turns(1)
        return [f.result() if f.done() else "pending" for f in (first, second)]

    assert asyncio.run(main()) == [40, 50]
    assert batches == [[4], [5]]


def test_a_batch_never_holds_more_than_max_rows() -> None:
    batches: list[list[int]] = []
    batcher = _recording(batches)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(batcher.submit(n) for n in (4, 4, 4, 6, 10))))

    assert asyncio.run(main()) == [40, 40, 40, 60, 100]
    assert batches == [[4, 4], [4, 6], [10]]
    assert all(sum(batch) <= 10 for batch in batches)


class VirtualClock:
    """The running loop's clock, moved only by the test: a timer fires exactly when the
    test moves the clock past it, however fast or slow the machine is."""

    def __init__(self) -> None:
        self.now = 0.0
        asyncio.get_running_loop().time = lambda: self.now  # type: ignore[method-assign]


def test_a_positive_wait_gathers_requests_from_later_turns_until_it_ends() -> None:
    batches: list[list[int]] = []
    batcher = _recording(batches)
    batcher.configure(max_rows=10, wait_s=0.5)

    async def main() -> list[object]:
        clock = VirtualClock()
        first = batcher.submit(1)
        await turns(3)
        second = batcher.submit(2)  # a later turn: it joins the waiting batch
        clock.now = 0.25
        await turns(3)
        waiting = (list(batches), first.done())
        clock.now = 0.5  # the wait is over
        await turns(2)  # the turn that finds the timer due, and the one that resumes us
        return [waiting, list(batches), first.result(), second.result()]

    assert asyncio.run(main()) == [([], False), [[1, 2]], 10, 20]


def test_a_full_batch_runs_before_its_wait_ends() -> None:
    batches: list[list[int]] = []
    batcher = _recording(batches)
    batcher.configure(max_rows=10, wait_s=0.5)

    async def main() -> list[object]:
        VirtualClock()  # stays at 0: the wait never ends during this test
        first = batcher.submit(3)
        await turns(3)
        second = batcher.submit(7)  # 3 + 7 rows = max_rows: the batch runs in this call
        # (not awaited: a batch that waited for the clock would make the test hang, not fail)
        return [list(batches), [f.result() if f.done() else "pending" for f in (first, second)]]

    assert asyncio.run(main()) == [[[3, 7]], [30, 70]]


def test_a_failing_batch_fails_each_of_its_requests() -> None:
    def run(items: Sequence[int]) -> list[int]:
        raise ValueError("model broke")

    batcher: MicroBatcher[int] = MicroBatcher(run, lambda item: 1, max_rows=10)

    async def main() -> list[object]:
        return list(await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True))

    results = asyncio.run(main())
    assert [type(r) for r in results] == [ValueError, ValueError]


def test_a_cancelled_request_does_not_break_its_batch() -> None:
    batches: list[list[int]] = []
    batcher = _recording(batches)

    async def main() -> int:
        gone = batcher.submit(1)
        kept = batcher.submit(2)
        gone.cancel()
        return await kept

    assert asyncio.run(main()) == 20
    assert batches == [[1, 2]]


@pytest.mark.parametrize("wait_s", [0.0, 0.01])
def test_results_match_the_order_of_submission(wait_s: float) -> None:
    batcher: MicroBatcher[int] = MicroBatcher(lambda items: [i + 1 for i in items], lambda item: 1, max_rows=3, wait_s=wait_s)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(batcher.submit(n) for n in range(8))))

    assert asyncio.run(main()) == list(range(1, 9))
