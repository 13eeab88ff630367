"""Tier choice under load and the per-tier queues (deployments/scheduler.py), with real asyncio and no Ray."""

import asyncio
import math

import pytest

from deployments.scheduler import (
    EWMA_WEIGHT,
    SpeedBook,
    TierLoad,
    TierQueue,
    TiersFull,
    choose_chunk_tier,
    expected_seconds,
)


def load(tier, replicas=1, running=0, waiting=0, backlog=0.0, limit=32, spu=1.0):
    return TierLoad(tier, replicas, running, waiting, backlog, limit, spu)


# -- expected_seconds ----------------------------------------------------------------------------------------------


def test_an_idle_tier_finishes_after_the_chunk_alone():
    assert expected_seconds(load("a", replicas=2, running=1, backlog=50, spu=0.5), 10) == pytest.approx(5.0)


def test_a_busy_tier_finishes_after_its_backlog_shared_by_its_replicas():
    busy = load("a", replicas=2, running=2, waiting=1, backlog=30, spu=0.5)
    assert expected_seconds(busy, 10) == pytest.approx((30 / 2 + 10) * 0.5)


def test_a_tier_without_replicas_never_finishes():
    assert expected_seconds(load("a", replicas=0), 1) == math.inf


# -- choose_chunk_tier ---------------------------------------------------------------------------------------------


def test_cheapest_idle_tier_wins_within_slack():
    small, big = load("small", spu=1.5), load("big", spu=1.0)
    assert choose_chunk_tier([(small, 10), (big, 10)], slack=2.0) is small


def test_idle_tier_slower_than_the_slack_loses_to_the_fastest():
    small, big = load("small", spu=3.0), load("big", spu=1.0)
    assert choose_chunk_tier([(small, 10), (big, 10)], slack=2.0) is big


def test_spill_up_to_an_idle_larger_tier_when_the_cheap_backlog_is_long():
    small = load("small", running=1, backlog=100, spu=1.0)
    big = load("big", spu=1.5)
    assert choose_chunk_tier([(small, 10), (big, 10)]) is big


def test_a_short_backlog_on_the_cheap_tier_still_beats_a_much_slower_idle_tier():
    small = load("small", running=1, backlog=5, spu=1.0)  # (5 + 10) x 1 = 15 s
    slow = load("slow", spu=4.0)  # 40 s, idle
    assert choose_chunk_tier([(slow, 10), (small, 10)], slack=2.0) is small


def test_spill_back_to_the_small_tier_when_the_large_one_is_busy():
    small = load("small", spu=3.0)  # 30 s
    big = load("big", running=1, waiting=3, backlog=200, spu=1.0)  # 210 s
    assert choose_chunk_tier([(small, 10), (big, 10)]) is small


def test_when_no_tier_is_idle_the_earliest_completion_wins():
    small = load("small", running=1, backlog=100, spu=1.0)  # 110 s
    big = load("big", running=1, backlog=20, spu=2.0)  # 60 s
    assert choose_chunk_tier([(small, 10), (big, 10)]) is big


def test_full_tiers_are_never_chosen():
    full = load("full", running=1, waiting=2, limit=2, spu=0.01)
    slow = load("slow", running=1, waiting=1, backlog=1000, limit=2, spu=10.0)
    assert choose_chunk_tier([(full, 10), (slow, 10)]) is slow


def test_tiers_without_replicas_are_never_chosen():
    empty, slow = load("empty", replicas=0, spu=0.01), load("slow", spu=10.0)
    assert choose_chunk_tier([(empty, 10), (slow, 10)]) is slow


def test_all_tiers_full_raises_with_the_earliest_expected_completion():
    a = load("a", running=1, waiting=1, limit=1, backlog=40, spu=1.0)  # (40 + 10) x 1 = 50 s
    b = load("b", replicas=2, running=2, waiting=1, limit=1, backlog=40, spu=2.0)  # (20 + 10) x 2 = 60 s
    with pytest.raises(TiersFull, match=r"a, b") as info:
        choose_chunk_tier([(a, 10), (b, 10)])
    assert info.value.retry_after_s == pytest.approx(50.0)


@pytest.mark.parametrize("candidates", [[], [(load("a", replicas=0), 10), (load("b", replicas=0), 10)]],
                         ids=["no candidate", "no replicas"])
def test_no_tier_with_replicas_raises_with_a_finite_retry_after(candidates):
    with pytest.raises(TiersFull) as info:
        choose_chunk_tier(candidates)
    assert 0 < info.value.retry_after_s < math.inf


# -- SpeedBook -----------------------------------------------------------------------------------------------------


def test_first_measurement_is_taken_as_is():
    book = SpeedBook()
    book.record("a", measured_s=3.0, predicted_s=2.0)
    assert book.correction("a") == pytest.approx(1.5)


def test_later_measurements_move_the_estimate_by_the_ewma_weight():
    book = SpeedBook()
    book.record("a", 2.0, 1.0)
    book.record("a", 1.0, 1.0)
    assert book.correction("a") == pytest.approx((1 - EWMA_WEIGHT) * 2.0 + EWMA_WEIGHT * 1.0)
    for _ in range(50):
        book.record("a", 1.0, 1.0)
    assert book.correction("a") == pytest.approx(1.0, abs=1e-3)


def test_unmeasured_tier_borrows_the_median_of_the_measured_ones():
    book = SpeedBook()
    for tier, ratio in [("a", 1.0), ("b", 4.0), ("c", 2.0)]:
        book.record(tier, ratio, 1.0)
    assert book.correction("d") == pytest.approx(2.0)


def test_with_nothing_measured_the_prediction_is_trusted():
    assert SpeedBook().correction("a") == 1.0


def test_non_positive_times_are_not_recorded():
    book = SpeedBook()
    book.record("a", 0.0, 1.0)
    book.record("a", 1.0, 0.0)
    assert "a" not in book.ratios


# -- TierQueue -----------------------------------------------------------------------------------------------------


def run(scenario):
    """Run a scenario coroutine; one that would wait forever (a waiter nobody wakes) fails within seconds."""
    return asyncio.run(asyncio.wait_for(scenario, timeout=5))


async def settle():
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


class Runs:
    """Chunks that hold a slot of `queue` until told to finish, recording the order in which they started."""

    def __init__(self, queue):
        self.queue = queue
        self.started: list[str] = []
        self.done: dict[str, asyncio.Event] = {}
        self.active = 0  # holding a slot now, counted here rather than trusting the queue's own count
        self.peak = 0

    def start(self, name, priority="batch", units=1.0):
        self.done[name] = asyncio.Event()
        return asyncio.ensure_future(self._run(name, priority, units))

    async def _run(self, name, priority, units):
        await self.queue.acquire(priority, units)
        self.started.append(name)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.done[name].wait()
        finally:
            self.active -= 1
            self.queue.release(units)

    async def finish(self, name):
        self.done[name].set()
        await settle()


def test_at_most_replicas_chunks_run_at_once():
    async def scenario():
        runs = Runs(TierQueue("a", replicas=2, limit=10))
        tasks = [runs.start(f"c{i}") for i in range(5)]
        await settle()
        assert runs.started == ["c0", "c1"] and runs.queue.waiting == 3
        for i in range(5):
            await runs.finish(f"c{i}")
        await asyncio.gather(*tasks)
        return runs

    runs = run(scenario())
    assert runs.peak == 2 and runs.started == [f"c{i}" for i in range(5)]
    assert (runs.queue.running, runs.queue.waiting, runs.queue.backlog_units) == (0, 0, 0.0)


def test_waiters_wake_interactive_before_batch_then_in_arrival_order():
    async def scenario():
        runs = Runs(TierQueue("a", replicas=1, limit=10))
        tasks = [runs.start("holder")]
        for name, priority in [("b1", "batch"), ("i1", "interactive"), ("b2", "batch"), ("i2", "interactive")]:
            tasks.append(runs.start(name, priority))
            await settle()
        for name in ["holder", "i1", "i2", "b1", "b2"]:
            await runs.finish(name)
        await asyncio.gather(*tasks)
        return runs.started

    assert run(scenario()) == ["holder", "i1", "i2", "b1", "b2"]


def test_the_queue_limit_raises_tiers_full_and_leaves_the_backlog_unchanged():
    async def scenario():
        runs = Runs(TierQueue("a", replicas=1, limit=1))
        tasks = [runs.start("running", units=3.0), runs.start("waiting", units=5.0)]
        await settle()
        with pytest.raises(TiersFull, match="a"):
            await runs.queue.acquire("interactive", 7.0)
        assert (runs.queue.running, runs.queue.waiting, runs.queue.backlog_units) == (1, 1, 8.0)
        for name in ["running", "waiting"]:
            await runs.finish(name)
        await asyncio.gather(*tasks)

    run(scenario())


def test_a_cancelled_waiter_leaves_no_trace():
    async def scenario():
        runs = Runs(TierQueue("a", replicas=1, limit=10))
        holder = runs.start("holder", units=2.0)
        await settle()
        before = (runs.queue.running, runs.queue.waiting, runs.queue.backlog_units)
        waiter = runs.start("waiter", units=5.0)
        await settle()
        waiter.cancel()
        await settle()
        assert waiter.cancelled() and "waiter" not in runs.started
        assert (runs.queue.running, runs.queue.waiting, runs.queue.backlog_units) == before
        await runs.finish("holder")
        await holder
        assert (runs.queue.running, runs.queue.waiting, runs.queue.backlog_units) == (0, 0, 0.0)

    run(scenario())


def test_a_waiter_cancelled_as_it_is_handed_the_slot_gives_the_slot_on():
    async def scenario():
        queue = TierQueue("a", replicas=1, limit=10)
        runs = Runs(queue)
        await queue.acquire("batch", 2.0)  # this test holds the only slot
        handed = runs.start("handed", units=5.0)
        nxt = runs.start("next", units=1.0)
        await settle()
        queue.release(2.0)  # the slot goes to `handed`, which is cancelled before it runs
        handed.cancel()
        await settle()
        assert handed.cancelled() and runs.started == ["next"]
        assert (queue.running, queue.waiting, queue.backlog_units) == (1, 0, 1.0)
        await runs.finish("next")
        await nxt
        assert (queue.running, queue.backlog_units) == (0, 0.0)

    run(scenario())


def test_more_replicas_wake_waiters_and_fewer_let_running_chunks_finish():
    async def scenario():
        runs = Runs(TierQueue("a", replicas=1, limit=10))
        tasks = [runs.start(f"c{i}") for i in range(3)]
        await settle()
        assert runs.started == ["c0"]
        runs.queue.set_replicas(3)
        await settle()
        assert runs.started == ["c0", "c1", "c2"] and runs.queue.waiting == 0
        runs.queue.set_replicas(1)
        tasks.append(runs.start("late"))
        await settle()
        assert "late" not in runs.started  # three still running on a tier that now has one replica
        for name in ["c0", "c1"]:
            await runs.finish(name)
        assert "late" not in runs.started
        await runs.finish("c2")
        assert runs.started[-1] == "late"
        await runs.finish("late")
        await asyncio.gather(*tasks)

    run(scenario())


# -- autoscaled tiers at zero replicas -----------------------------------------------------------------------------


def cold(tier, cold_start_s=60.0, spu=1.0):
    return TierLoad(tier, 0, 0, 0, 0.0, 32, spu, scalable=True, cold_start_s=cold_start_s)


def test_a_tier_at_zero_is_open_when_it_can_scale_and_finishes_after_its_cold_start():
    assert not cold("a").full and load("b", replicas=0).full
    assert expected_seconds(cold("a", cold_start_s=60, spu=0.5), 10) == pytest.approx(65.0)


def test_work_goes_to_a_warm_tier_unless_its_queue_outlasts_a_cold_start():
    warm_busy = load("large", replicas=1, running=1, waiting=1, backlog=40)  # 40 s of work ahead
    assert choose_chunk_tier([(cold("small", cold_start_s=60), 10), (warm_busy, 10)]).tier == "large"
    long_queue = load("large", replicas=1, running=1, waiting=9, backlog=200)
    assert choose_chunk_tier([(cold("small", cold_start_s=60), 10), (long_queue, 10)]).tier == "small"


def test_a_queue_at_zero_replicas_holds_work_until_a_replica_comes():
    async def scenario():
        queue = TierQueue("a", replicas=0, limit=4, scalable=True)
        waiter = asyncio.ensure_future(queue.acquire("interactive", 5.0))
        await asyncio.sleep(0)
        assert not waiter.done() and queue.waiting == 1 and queue.waiting_units == 5.0
        queue.set_replicas(1)
        await asyncio.wait_for(waiter, 1)
        assert queue.running == 1 and queue.waiting == 0 and queue.waiting_units == 0.0

    asyncio.run(scenario())
