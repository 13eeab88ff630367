"""The in-tier replica ranking (deployments/router.py `rank_replicas`): a pure function, no Ray Serve needed."""

import pytest

from deployments.router import ReplicaView, rank_replicas, step_estimates

GIB = 1 << 30


def ids(ranks):
    assert all(len(rank) == 1 for rank in ranks), ranks
    return [rank[0] for rank in ranks]


def test_replicas_that_cannot_hold_the_need_are_never_ranked():
    replicas = [ReplicaView("small", 4 * GIB), ReplicaView("exact", 6 * GIB), ReplicaView("large", 12 * GIB)]
    assert sorted(ids(rank_replicas(replicas, 6 * GIB))) == ["exact", "large"]


def test_a_replica_without_a_card_is_always_eligible():
    replicas = [ReplicaView("cpu", None), ReplicaView("card", 2 * GIB)]
    assert ids(rank_replicas(replicas, 100 * GIB)) == ["cpu"]


def test_nothing_fits_gives_no_rank():
    replicas = [ReplicaView("a", 4 * GIB), ReplicaView("b", 8 * GIB, busy=True)]
    assert rank_replicas(replicas, 9 * GIB) == []
    assert rank_replicas([], 1) == []


def test_shorter_queue_ranks_first_among_replicas_within_twice_each_others_speed():
    replicas = [
        ReplicaView("long", 24 * GIB, queue_len=3, seconds_per_step=0.1),
        ReplicaView("short", 8 * GIB, queue_len=1, seconds_per_step=0.15),
        ReplicaView("empty", 8 * GIB, queue_len=0, seconds_per_step=0.19),
    ]
    assert ids(rank_replicas(replicas, GIB)) == ["empty", "short", "long"]


def test_a_replica_k_times_slower_counts_k_minus_one_more_requests_ahead():
    """An idle card 5x slower (an x1 riser) counts as 4 requests ahead: a fast card with up to 4 queued still goes
    first (a tie goes to the faster), one with 5 does not."""
    slow = ReplicaView("riser", 8 * GIB, queue_len=0, reference_step_s=7.8, time_ratio=0.5)
    for queued, first in ((3, "x16"), (4, "x16"), (5, "riser")):
        fast = ReplicaView("x16", 8 * GIB, queue_len=queued, reference_step_s=1.56, time_ratio=0.5)
        assert ids(rank_replicas([slow, fast], GIB))[0] == first, queued


def test_a_replica_not_measured_yet_is_ranked_by_its_cards_predicted_step_and_the_others_ratio():
    """Before it has run a job, a replica's step is its card's reference step (speed and link) times the ratio its
    tier's other replicas measured: a riser card is slow before it ran anything, a new x16 card is not."""
    measured = ReplicaView("measured", 8 * GIB, queue_len=1, reference_step_s=1.56, time_ratio=0.02)
    riser = ReplicaView("riser", 8 * GIB, queue_len=0, reference_step_s=7.8)
    new = ReplicaView("new", 8 * GIB, queue_len=0, reference_step_s=1.56)
    assert step_estimates([measured, riser, new]) == pytest.approx(
        {"measured": 1.56 * 0.02, "riser": 7.8 * 0.02, "new": 1.56 * 0.02})
    assert ids(rank_replicas([measured, riser, new], GIB)) == ["new", "measured", "riser"]


def test_replicas_without_a_card_are_ranked_by_work_whatever_their_last_jobs_took():
    """A CPU tier's replica whose last job was six times larger is no slower: the idle one goes first, and so does
    the one with less work."""
    big_last = ReplicaView("big-last", None, queue_len=0, seconds_per_step=0.6)
    small_last = ReplicaView("small-last", None, queue_len=1, seconds_per_step=0.1)
    assert ids(rank_replicas([big_last, small_last], GIB)) == ["big-last", "small-last"]


def test_a_busy_replica_counts_as_one_queued_request():
    replicas = [
        ReplicaView("busy", 24 * GIB, busy=True, seconds_per_step=0.1),
        ReplicaView("two", 24 * GIB, queue_len=2, seconds_per_step=0.1),
        ReplicaView("free", 8 * GIB, seconds_per_step=0.15),
    ]
    assert ids(rank_replicas(replicas, GIB)) == ["free", "busy", "two"]


def test_at_equal_load_the_faster_replica_ranks_first():
    replicas = [ReplicaView("slow", 24 * GIB, seconds_per_step=1.0), ReplicaView("fast", 8 * GIB, seconds_per_step=0.5)]
    assert ids(rank_replicas(replicas, GIB)) == ["fast", "slow"]


def test_at_equal_load_and_speed_more_room_ranks_first():
    replicas = [ReplicaView("tight", 8 * GIB, seconds_per_step=0.5), ReplicaView("roomy", 12 * GIB, seconds_per_step=0.5)]
    assert ids(rank_replicas(replicas, GIB)) == ["roomy", "tight"]


def test_an_equally_loaded_replica_that_holds_the_adapter_ranks_first():
    replicas = [ReplicaView("fast", None, seconds_per_step=0.3),
                ReplicaView("holder", None, seconds_per_step=0.5, adapters=frozenset({"ink"}))]
    assert ids(rank_replicas(replicas, 0, "ink")) == ["holder", "fast"]
    assert ids(rank_replicas(replicas, 0)) == ["fast", "holder"]  # without an adapter, speed decides


def test_an_idle_replica_without_the_adapter_beats_a_busy_one_with_it():
    replicas = [ReplicaView("holder", None, busy=True, adapters=frozenset({"ink"})), ReplicaView("idle", None)]
    assert ids(rank_replicas(replicas, 0, "ink")) == ["idle", "holder"]


def test_the_routers_own_queue_count_outranks_a_stale_busy_report():
    """Serve counts the router's sends and completions at once; the replica's `busy` is up to a stats period old. A
    holder that just finished (queue 0, still reported busy) keeps its adapter's requests."""
    replicas = [ReplicaView("holder", None, busy=True, queue_len=0, adapters=frozenset({"ink"})),
                ReplicaView("other", None, queue_len=0)]
    assert ids(rank_replicas(replicas, 0, "ink")) == ["holder", "other"]


def test_without_serves_count_the_routers_own_requests_and_fresh_busy_reports_decide():
    """Serve forgets its count 10 s after the last send or completion (a long chunk outlives it): then this router's
    own running requests count, and a busy report only if it came after the router's last completion there."""
    holder = dict(replica_id="holder", capacity_bytes=None, adapters=frozenset({"ink"}))
    other = ReplicaView("other", None)
    running = ReplicaView(**holder, in_flight=1)
    assert ids(rank_replicas([running, other], 0, "ink")) == ["other", "holder"]
    finished = ReplicaView(**holder, busy=True, busy_stale=True)  # reported busy, then our request completed
    assert ids(rank_replicas([finished, other], 0, "ink")) == ["holder", "other"]
    someone_elses = ReplicaView(**holder, busy=True)  # busy with another router's request
    assert ids(rank_replicas([someone_elses, other], 0, "ink")) == ["other", "holder"]
