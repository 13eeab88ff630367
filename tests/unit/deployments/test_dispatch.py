"""The pure parts of the dispatcher (deployments/dispatch.py): chunking, tier choice, live budgets, where a failed
chunk goes next, failure kinds, and cancelling siblings. Tiers are built like the fleet's; no Ray, no generators."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from cluster.memory import fits, largest_batch, load_calibration
from cluster.profiles import tier_profile
from cluster.requests import work_units
from cluster.tiers import GIB, card_tier
from deployments.dispatch import Dispatcher, Outcome, _failure_reason, gather_or_cancel
from deployments.errors import ChunkBadImage, ChunkOutOfMemory
from deployments.routing import NoTierFits
from deployments.scheduler import TiersFull

MIB = 1 << 20


def dispatcher(*tiers):
    return Dispatcher(list(tiers), {t.name: tier_profile(t) for t in tiers}, {}, load_calibration())


def mixed_fleet():
    """The README's mixed fleet (cluster/fleets/mixed.yaml), one tier per card, two RTX 3060s."""
    return dispatcher(
        card_tier("vram_4", 1, bf16=False, vram_bytes=3911 * MIB, speed=0.08),  # GTX 1650
        card_tier("vram_6", 1, bf16=False, vram_bytes=6 * GIB, speed=0.2),  # RTX 2060
        card_tier("vram_8", 1, bf16=True, vram_bytes=8 * GIB, speed=0.45),  # RTX 3070
        card_tier("vram_12", 2, bf16=True, vram_bytes=12 * GIB, speed=0.35),  # RTX 3060
        card_tier("vram_24", 1, bf16=True, vram_bytes=24564 * MIB, speed=1.0),  # RTX 4090
    )


def equal_speed_fleet(queue_limit=32):
    """Two 12 GB cards and one 24 GB card, all equally fast: at 1024x1024 each call holds 4 images on either tier,
    so each tier's expected time for a chunk is the same and only load and price decide."""
    return dispatcher(
        card_tier("vram_12", 2, bf16=True, vram_bytes=12 * GIB, speed=0.5, max_queued_requests=queue_limit),
        card_tier("vram_24", 1, bf16=True, vram_bytes=24 * GIB, speed=0.5, max_queued_requests=queue_limit),
    )


def assign(d, n, side=1024, steps=9):
    return d.assign(d.plan(side, side, steps, n), side, side, steps, n, first_seed=100)


def unit(side=1024, steps=9):
    """The work of one image."""
    return work_units(side, side, 1, steps)


# -- work_units ----------------------------------------------------------------------------------------------------


def test_work_grows_with_images_steps_and_pixels():
    assert work_units(1024, 1024, 3, 9) == pytest.approx(3 * work_units(1024, 1024, 1, 9))
    assert work_units(1024, 1024, 1, 18) == pytest.approx(2 * work_units(1024, 1024, 1, 9))
    assert work_units(512, 512, 1, 9) < work_units(1024, 512, 1, 9) < work_units(1024, 1024, 1, 9)


# -- assign --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side, n", [(512, 8), (1024, 7), (1024, 1), (2048, 8), (2048, 13)])
def test_chunks_fit_their_tier_batch_and_cover_the_seeds_in_order(side, n):
    d = mixed_fleet()
    fitting = d.plan(side, side, 9, n)
    batch = {p.tier: max(p.chunks) for p in fitting}
    chunks = d.assign(fitting, side, side, 9, n, first_seed=100)
    assert all(1 <= len(seeds) <= batch[tier] for tier, seeds in chunks), chunks
    assert [seed for _, seeds in chunks for seed in seeds] == list(range(100, 100 + n))


def test_chunk_batch_is_what_the_memory_model_allows_on_the_tier():
    d = mixed_fleet()
    for tier, seeds in assign(d, 16, side=2048):
        assert len(seeds) <= largest_batch(2048, 2048, d.profiles[tier], d.budgets[tier], d.calibration)


def test_one_chunk_per_idle_replica_cheapest_tier_first():
    assert [tier for tier, _ in assign(equal_speed_fleet(), 12)] == ["vram_12", "vram_12", "vram_24"]


def test_a_busy_cheap_tier_spills_to_the_idle_large_one_then_back():
    d = equal_speed_fleet()
    d.queues["vram_12"].running = 2
    d.queues["vram_12"].backlog_units = 6 * unit()  # two chunks of 3 images running
    # 1st chunk: vram_24 is idle and done after 4 images; vram_12 after (6/2 + 4) = 7.
    # 2nd chunk: vram_24 is now busy, done after 4 + 4 = 8 images; vram_12 still after 7.
    assert [tier for tier, _ in assign(d, 8)] == ["vram_24", "vram_12"]


def test_a_long_backlog_on_the_cheap_tier_sends_the_whole_request_to_the_large_one():
    d = equal_speed_fleet()
    d.queues["vram_12"].running = 2
    d.queues["vram_12"].backlog_units = 1000 * unit()  # far more than the 16 images of the request
    assert {tier for tier, _ in assign(d, 16)} == {"vram_24"}


def test_full_tiers_get_no_chunk_and_all_full_raises():
    d = equal_speed_fleet(queue_limit=1)
    d.queues["vram_12"].running = 2
    d.queues["vram_12"].backlog_units = 4 * unit()  # two chunks of 2 images running
    # 1st chunk: vram_24 is idle (4 images) and vram_12 is not ((4/2 + 4) images): vram_24.
    # 2nd: vram_12 (4/2 + 4 = 6) beats vram_24 (4 + 4 = 8), and its one queue place is taken.
    # 3rd: vram_12 would finish after (8/2 + 4) = 8 images, vram_24 after 12, but vram_12 is full.
    assert [tier for tier, _ in assign(d, 12)] == ["vram_24", "vram_12", "vram_24"]
    with pytest.raises(TiersFull):
        assign(d, 16)  # a fourth chunk finds both queues full


def test_assign_leaves_the_live_queues_untouched():
    d = equal_speed_fleet()
    assign(d, 12)
    assert all((q.running, q.waiting, q.backlog_units) == (0, 0, 0.0) for q in d.queues.values())


# -- plan and live budgets -----------------------------------------------------------------------------------------


def test_nothing_fits_raises_with_every_tier_reason():
    d = dispatcher(card_tier("vram_4", 1, bf16=False, vram_bytes=3911 * MIB),
                   card_tier("vram_6", 1, bf16=False, vram_bytes=6 * GIB))
    with pytest.raises(NoTierFits) as info:
        d.plan(2048, 2048, 9, 1)
    assert set(info.value.reasons) == {"vram_4", "vram_6"}
    assert all("budget" in reason for reason in info.value.reasons.values()), info.value.reasons


def test_plan_lists_the_tiers_that_hold_one_image_cheapest_first():
    d = mixed_fleet()
    holding = [name for name in d.order if fits(2048, 2048, 1, d.profiles[name], d.budgets[name]) is None]
    assert 0 < len(holding) < len(d.order)  # the case is worth testing: some tiers hold it, some do not
    assert [p.tier for p in d.plan(2048, 2048, 9, 3)] == holding


def report(tier, total, foreign=0):
    return {"tier": tier, "card": {"memory_total": total, "foreign_memory": foreign}}


def test_foreign_memory_lowers_the_budget_and_the_batch():
    d = dispatcher(card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB))
    profile = d.profiles["vram_12"]
    full = max(d.plan(1024, 1024, 9, 12)[0].chunks)  # 12: a multiple of every batch up to 4, so chunks = batch
    d.update_from_reports([report("vram_12", 12 * GIB, foreign=2 * GIB)])
    assert d.budgets["vram_12"] == 10 * GIB
    lowered = max(d.plan(1024, 1024, 9, 12)[0].chunks)
    assert lowered == largest_batch(1024, 1024, profile, 10 * GIB) < full


def test_a_card_too_full_for_one_image_makes_the_request_not_fit():
    d = dispatcher(card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB))
    d.update_from_reports([report("vram_12", 12 * GIB, foreign=6 * GIB)])
    with pytest.raises(NoTierFits, match="6.00 GiB budget"):
        d.plan(1024, 1024, 9, 1)


def test_live_budget_is_the_roomiest_card_capped_at_the_tier_size_and_replicas_follow_reports():
    d = dispatcher(card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB))
    d.update_from_reports([report("vram_12", 12 * GIB, foreign=5 * GIB), report("vram_12", 12 * GIB, GIB),
                           report("vram_12", 16 * GIB), {"tier": "vram_12"}])
    # A card tier's replica with no card reading serves nothing: three of the four count.
    assert d.budgets["vram_12"] == 12 * GIB and d.queues["vram_12"].replicas == 3
    d.update_from_reports([report("vram_12", 12 * GIB, foreign=5 * GIB), report("vram_12", 12 * GIB, GIB)])
    assert d.budgets["vram_12"] == 11 * GIB and d.queues["vram_12"].replicas == 2


def test_a_tier_whose_cards_all_fail_nvml_is_drained_until_they_recover():
    d = dispatcher(card_tier("vram_8", 1, bf16=True, vram_bytes=8 * GIB),
                   card_tier("vram_24", 1, bf16=True, vram_bytes=24 * GIB))
    lost = {"tier": "vram_8", "card": {"memory_total": 8 * GIB, "error": "NVMLError_GpuIsLost: GPU is lost"}}
    d.update_from_reports([lost, report("vram_24", 24 * GIB)])
    assert [p.tier for p in d.plan(512, 512, 9, 1)] == ["vram_24"]
    assert d.queues["vram_8"].replicas == 0
    d.update_from_reports([report("vram_8", 8 * GIB), report("vram_24", 24 * GIB)])
    assert [p.tier for p in d.plan(512, 512, 9, 1)] == ["vram_8", "vram_24"]


def test_reports_of_other_tiers_change_nothing_here():
    d = dispatcher(card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB))
    d.update_from_reports([report("vram_24", 24 * GIB, foreign=20 * GIB)])
    assert d.budgets["vram_12"] == 12 * GIB and d.queues["vram_12"].replicas == 1


# -- _fallback -----------------------------------------------------------------------------------------------------


def fallback(reason, tier, tried, leave_out=()):
    """Where the mixed fleet sends a 512x512 chunk that failed on `tier`; `leave_out`: tiers not in the plan."""
    d = mixed_fleet()
    fitting = d.plan(512, 512, 9, 1)
    assert len(fitting) == len(d.order)  # every tier holds a 512x512 image
    return d, d._fallback(reason, tier, [p for p in fitting if p.tier not in leave_out], tried)


@pytest.mark.parametrize("tier, tried", [("vram_8", ("vram_8",)), ("vram_6", ("vram_6", "vram_8", "vram_12"))])
def test_out_of_memory_goes_to_a_larger_tier_not_tried_before(tier, tried):
    d, target = fallback("out_of_memory", tier, tried)
    assert target.tier not in tried and d.budgets[target.tier] > d.budgets[tier]


def test_out_of_memory_skips_a_larger_tier_whose_live_budget_is_no_larger():
    d = mixed_fleet()
    fitting = d.plan(512, 512, 9, 1)
    d.update_from_reports([report("vram_24", 24564 * MIB, foreign=24564 * MIB - 12 * GIB)])  # 12 GiB left
    assert d._fallback("out_of_memory", "vram_12", fitting, ("vram_12",)) is None


def test_out_of_memory_on_the_largest_tier_has_nowhere_to_go():
    assert fallback("out_of_memory", "vram_24", ("vram_24",))[1] is None
    assert fallback("out_of_memory", "vram_12", ("vram_12", "vram_24"))[1] is None


@pytest.mark.parametrize("tried", [("vram_4",), ("vram_4", "vram_8")])
def test_bad_images_go_to_a_bf16_tier_not_tried_before(tried):
    d, target = fallback("bad_image", "vram_4", tried)
    assert target.tier not in tried and d.tiers[target.tier].bf16


def test_bad_images_with_every_bf16_tier_tried_have_nowhere_to_go():
    assert fallback("bad_image", "vram_6", ("vram_6", "vram_8", "vram_12", "vram_24"))[1] is None


def test_a_dead_replica_may_stay_on_its_tier():
    everything = ("vram_4", "vram_6", "vram_8", "vram_12", "vram_24")
    assert fallback("replica_died", "vram_12", everything)[1].tier == "vram_12"


def test_a_dead_replica_off_the_plan_goes_to_an_untried_tier_or_nowhere():
    # The baselines send chunks to tiers the plan left out; such a tier is never retried.
    d, target = fallback("replica_died", "vram_12", ("vram_12", "vram_4"), leave_out=("vram_12",))
    assert target.tier not in ("vram_12", "vram_4")
    assert fallback("replica_died", "vram_12", tuple(d.order), leave_out=("vram_12",))[1] is None


def test_a_dead_replica_retries_on_its_own_tier_first():
    assert fallback("replica_died", "vram_12", ("vram_12",))[1].tier == "vram_12"


# -- _failure_reason -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc, reason", [
    (ChunkOutOfMemory("CUDA out of memory"), "out_of_memory"),
    (ChunkBadImage("all-black image"), "bad_image"),
    (ActorDiedError(), "replica_died"),
    (ValueError("prompt too long"), None),
], ids=["oom", "bad image", "actor died", "other"])
def test_failure_reasons(exc, reason):
    assert _failure_reason(exc) == reason


# -- gather_or_cancel ----------------------------------------------------------------------------------------------


def test_gather_returns_results_in_order():
    async def value(v, delay):
        await asyncio.sleep(delay)
        return v

    assert asyncio.run(gather_or_cancel(value("a", 0.02), value("b", 0), value("c", 0.01))) == ["a", "b", "c"]


def test_one_failure_cancels_its_siblings():
    cancelled = []

    async def sibling(name):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def failing():
        await asyncio.sleep(0)
        raise ChunkOutOfMemory("boom")

    async def scenario():
        with pytest.raises(ChunkOutOfMemory):
            await gather_or_cancel(sibling("a"), failing(), sibling("b"))
        await asyncio.sleep(0)  # let the cancelled siblings run their handlers, before asyncio.run would cancel them
        assert sorted(cancelled) == ["a", "b"]

    asyncio.run(asyncio.wait_for(scenario(), timeout=5))


# -- classifier-free guidance ----------------------------------------------------------------------------------------


class RecordingGenerator:
    """A tier's Generator handle that records the jobs it gets and returns blank images."""

    def __init__(self, tier, jobs):
        from types import SimpleNamespace

        self.tier, self.jobs = tier, jobs
        self.generate = SimpleNamespace(remote=self._generate)

    async def _generate(self, job):
        from cluster.requests import GenerationResult

        self.jobs.append((self.tier, job))
        return GenerationResult(images=[b""] * len(job.seeds), seeds=job.seeds, tier=self.tier, replica="r",
                                device="cpu", seconds=0.01, seconds_per_step=0.001)


def test_a_guided_request_is_chunked_and_predicted_as_guided_all_the_way_to_the_replica():
    """guidance_scale > 0: the 12 GB tier takes 2 guided 1024x1024 images per call instead of 4, each job carries
    the guided peak (what the in-tier router and a simulated card check), and its work counts double."""
    from cluster.memory import predict_peak
    from deployments.schemas import ImageGenerationRequest

    tier = card_tier("vram_12", 2, bf16=True, vram_bytes=12 * GIB, speed=0.35)
    for guidance, sizes in ((0.0, [4]), (4.0, [2, 2])):
        jobs = []
        d = Dispatcher([tier], {tier.name: tier_profile(tier)}, {tier.name: RecordingGenerator(tier.name, jobs)},
                       load_calibration())
        body = ImageGenerationRequest(prompt="a fox", size="1024x1024", n=4, guidance_scale=guidance)
        outcome = asyncio.run(d.run(body, 1024, 1024, first_seed=7))
        assert [len(job.seeds) for _, job in jobs] == sizes
        assert [s for r in outcome.results for s in r.seeds] == [7, 8, 9, 10]
        cfg = guidance > 0
        for _, job in jobs:
            assert job.guidance_scale == guidance
            assert job.predicted_peak == predict_peak(1024, 1024, len(job.seeds), d.profiles["vram_12"],
                                                      d.calibration, cfg).total
    assert work_units(1024, 1024, 2, 9, cfg=True) == pytest.approx(work_units(1024, 1024, 4, 9))


def test_plans_for_a_guided_request_hold_fewer_images():
    d = mixed_fleet()
    plain = {p.tier: max(p.chunks) for p in d.plan(1024, 1024, 9, 4)}
    guided = {p.tier: max(p.chunks) for p in d.plan(1024, 1024, 9, 4, cfg=True)}
    assert "vram_4" in plain and "vram_4" not in guided  # its one 1024x1024 image does not fit guided
    for tier, batch in guided.items():
        assert batch == min(4, largest_batch(1024, 1024, d.profiles[tier], d.budgets[tier], d.calibration, cfg=True))
        assert batch <= plain[tier]
    assert guided["vram_12"] < plain["vram_12"]


# -- lost tiers: a card node dies under a chunk ------------------------------------------------------------------


def node(tier, card, alive, node_id=None):
    from runtime.nodes import LABEL_CARD, LABEL_TIER

    return {"node_id": node_id or f"node-{card}-{alive}", "alive": alive,
            "labels": {LABEL_CARD: card, LABEL_TIER: tier}}


def two_tiers():
    return [card_tier("vram_8", 1, bf16=True, vram_bytes=8 * GIB), card_tier("vram_24", 1, bf16=True,
                                                                                 vram_bytes=24 * GIB)]


def test_a_tier_whose_only_card_node_died_is_lost_and_back_when_the_node_rejoins():
    from deployments.dispatch import lost_tiers

    tiers = two_tiers()
    dead = node("vram_8", "GPU-8", alive=False, node_id="n8")
    # The dead replica's last report is still fresh in the registry: it runs on a dead node, so it is no replica.
    reports = [{"tier": "vram_8", "node_id": "n8"}, {"tier": "vram_24", "node_id": "n24"}]
    lost = lost_tiers(tiers, reports, [dead, node("vram_24", "GPU-24", alive=True, node_id="n24")])
    assert list(lost) == ["vram_8"] and "GPU-8" in lost["vram_8"]
    rejoined = [dead, node("vram_8", "GPU-8", alive=True, node_id="n8-again")]
    assert lost_tiers(tiers, [], rejoined) == {}  # a node is back: Serve places the replica there


def test_a_tier_is_not_lost_while_a_replica_reports_from_a_live_node_or_ray_never_saw_its_nodes():
    from deployments.dispatch import lost_tiers

    tiers = two_tiers()
    one_dead = [node("vram_8", "GPU-a", alive=False, node_id="na"), node("vram_8", "GPU-b", alive=False,
                                                                            node_id="nb")]
    assert lost_tiers(tiers, [{"tier": "vram_8", "node_id": "elsewhere"}], one_dead) == {}
    assert lost_tiers(tiers, [], []) == {}  # nothing known about the tier's nodes: not lost


def test_a_pod_removed_after_its_replica_was_scaled_away_is_no_lost_tier_but_a_dead_host_is():
    from deployments.dispatch import lost_tiers
    from runtime.nodes import LABEL_POD

    tiers = two_tiers()
    pod = node("vram_8", "GPU-8", alive=False)
    pod["labels"][LABEL_POD] = "true"
    assert lost_tiers(tiers, [], [pod], retired=["GPU-8"]) == {}  # KubeRay removed the idle pod: waking brings one
    assert "vram_8" in lost_tiers(tiers, [], [pod], retired=["GPU-other"])  # the pod died serving
    host = node("vram_8", "GPU-8", alive=False)  # bare metal: no one brings it back
    assert "vram_8" in lost_tiers(tiers, [], [host], retired=["GPU-8"])


def test_the_cpu_tier_is_never_lost():
    from cluster.tiers import cpu_tier
    from deployments.dispatch import lost_tiers

    assert lost_tiers([cpu_tier()], [], [node("cpu", "GPU-x", alive=False)]) == {}


class HangingGenerator:
    """A tier's Generator handle whose calls never return (its card node is gone) until cancelled; counts them."""

    def __init__(self, tier):
        from types import SimpleNamespace

        self.tier, self.started, self.cancelled = tier, [], []
        self.generate = SimpleNamespace(remote=self._generate)

    async def _generate(self, job):
        self.started.append(job.seeds)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append(job.seeds)
            raise


def request(n=1, priority="interactive", size="512x512"):
    from deployments.schemas import ImageGenerationRequest

    return ImageGenerationRequest(prompt="a fox", size=size, n=n, steps=2, priority=priority)


def lost_fleet():
    """vram_8 (one replica, its calls hang) and vram_24 (one replica, records its jobs)."""
    jobs = []
    tiers = two_tiers()
    hanging = HangingGenerator("vram_8")
    generators = {"vram_8": hanging, "vram_24": RecordingGenerator("vram_24", jobs)}
    return Dispatcher(tiers, {t.name: tier_profile(t) for t in tiers}, generators, load_calibration()), hanging, jobs


def test_running_and_waiting_chunks_of_a_lost_tier_move_keeping_their_place_and_priority():
    d, hanging, jobs = lost_fleet()

    async def scenario():
        d.queues["vram_24"].running = 1  # vram_24 is busy with a long job: moved chunks wait for it in line
        runs = [asyncio.ensure_future(d._chunk(request(priority=p), 512, 512, "vram_8", [seed], d.plan(512, 512, 2, 1),
                                               outcome))
                for seed, p, outcome in ((1, "interactive", Outcome([])), (2, "batch", Outcome([])),
                                         (3, "interactive", Outcome([])))]
        await asyncio.sleep(0.05)
        assert hanging.started == [[1]] and d.queues["vram_8"].waiting == 2  # seed 1 runs, 2 and 3 wait
        later = asyncio.ensure_future(d._chunk(request(), 512, 512, "vram_24", [4], d.plan(512, 512, 2, 1),
                                               Outcome([])))
        await asyncio.sleep(0.05)
        d.update_lost({"vram_8": "its card node is dead"})
        await asyncio.sleep(0.05)
        assert hanging.cancelled == [[1]] and d.queues["vram_8"].waiting == 0 and d.queues["vram_8"].running == 0
        assert d.queues["vram_24"].waiting == 4
        d.queues["vram_24"].release(0.0)  # the long job ends: the queue runs one chunk at a time, in order
        await asyncio.gather(*runs, later)
        return runs

    runs = asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    # Interactive before batch, then arrival: 1 and 3 (interactive, first), 4 (interactive, came after them), 2.
    assert [job.seeds for _, job in jobs] == [[1], [3], [4], [2]]
    assert all(result[0].tier == "vram_24" for result in (run.result() for run in runs))


def test_a_moved_chunk_says_node_lost_and_it_costs_no_attempt():
    d, hanging, jobs = lost_fleet()
    d.max_attempts = 1  # a move that counted as an attempt would exhaust the chunk here

    async def scenario():
        body = request()
        run = asyncio.ensure_future(d.run(body, 512, 512, first_seed=11))
        await asyncio.sleep(0.05)
        assert hanging.started == [[11]]
        d.update_lost({"vram_8": "its card node is dead"})
        return await run

    outcome = asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    assert [r.tier for r in outcome.results] == ["vram_24"]
    assert [r.as_dict() for r in outcome.retries] == [{"seeds": [11], "reason": "node_lost", "from": "vram_8",
                                                       "to": "vram_24"}]
    assert d.metrics.retries.labels(reason="node_lost", tier="vram_8", to_tier="vram_24")._value.get() == 1


def test_new_chunks_skip_a_lost_tier_until_it_is_back_and_a_request_only_it_holds_gets_retry_after():
    d, _, _ = lost_fleet()
    d.update_lost({"vram_8": "its card node is dead"})
    assert [p.tier for p in d.plan(512, 512, 2, 1)] == ["vram_24"]
    d.update_lost({"vram_8": "its card node is dead", "vram_24": "its card node is dead"})
    with pytest.raises(TiersFull, match="unavailable now") as info:
        d.plan(512, 512, 2, 1)
    assert info.value.retry_after_s > 0
    d.update_lost({})
    assert [p.tier for p in d.plan(512, 512, 2, 1)] == ["vram_8", "vram_24"]


def test_a_replica_that_died_on_a_lost_tier_goes_elsewhere_at_once():
    d, _, _ = lost_fleet()
    fitting = d.plan(512, 512, 2, 1)
    d.update_lost({"vram_8": "its card node is dead"})
    assert d._fallback("replica_died", "vram_8", fitting, ("vram_8",)).tier == "vram_24"
    assert d._fallback("node_lost", "vram_8", fitting, ("vram_8", "vram_24")) is None


# -- the text-encoder stage: one encode per request ----------------------------------------------------------------


class FakeStage:
    """The stage's handle: answers each encode with fixed embeddings, after `fail` replica deaths; counts calls."""

    def __init__(self, fail: int = 0, hang: bool = False):
        from types import SimpleNamespace

        self.calls, self.fail, self.hang = [], fail, hang
        self.encode = SimpleNamespace(remote=self._encode)

    async def _encode(self, prompt, negative, cfg):
        import torch

        from cluster.encoding import EncodedPrompt
        from deployments.encoder import Encoded

        self.calls.append((prompt, negative, cfg))
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail:
            self.fail -= 1
            raise ActorDiedError()
        return Encoded(EncodedPrompt(torch.zeros(5, 16)), cached=len(self.calls) > 1, seconds=0.01, replica="stage-1")


class FailingOnce(RecordingGenerator):
    """A generator whose first job runs out of memory (the chunk moves to a larger tier)."""

    async def _generate(self, job):
        if not self.jobs:
            self.jobs.append((self.tier, job))
            raise ChunkOutOfMemory("CUDA out of memory")
        return await super()._generate(job)


def staged_fleet(stage):
    jobs = []
    tiers = [card_tier("vram_8", 1, bf16=True, vram_bytes=8 * GIB, speed=0.45),
             card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB, speed=0.35),
             card_tier("vram_24", 1, bf16=True, vram_bytes=24 * GIB, speed=1.0)]
    generators = {"vram_8": FailingOnce("vram_8", jobs), "vram_12": RecordingGenerator("vram_12", jobs),
                  "vram_24": RecordingGenerator("vram_24", jobs)}
    d = Dispatcher(tiers, {t.name: tier_profile(t) for t in tiers}, generators, load_calibration(), encoder=stage,
                   encoder_wait_s=0.5)
    return d, jobs


def test_a_request_split_over_tiers_and_retried_is_encoded_once_and_every_chunk_gets_the_embeddings():
    stage = FakeStage()
    d, jobs = staged_fleet(stage)
    body = request(n=8, size="1024x1024")
    outcome = asyncio.run(asyncio.wait_for(d.run(body, 1024, 1024, first_seed=1), timeout=10))
    assert len(stage.calls) == 1 and stage.calls[0] == ("a fox", None, False)
    assert len({tier for tier, _ in jobs}) >= 2  # split over tiers
    assert [r.reason for r in outcome.retries] == ["out_of_memory"]  # and one chunk retried elsewhere
    assert all(job.encoded is not None and job.encoded.prompt.shape == (5, 16) for _, job in jobs)
    assert outcome.encode == {"replica": "stage-1", "cached": False, "attempts": 1, "seconds": 0.01, "tokens": 5}
    assert sorted(s for r in outcome.results for s in r.seeds) == list(range(1, 9))


def test_a_dead_stage_replica_is_retried_and_a_silent_or_lost_stage_is_a_503():
    stage = FakeStage(fail=1)
    d, _ = staged_fleet(stage)
    outcome = asyncio.run(asyncio.wait_for(d.run(request(), 512, 512, first_seed=1), timeout=10))
    assert len(stage.calls) == 2 and outcome.encode["attempts"] == 2
    assert d.metrics.encodes.labels(outcome="replica_died")._value.get() == 1
    d, _ = staged_fleet(FakeStage(hang=True))
    with pytest.raises(TiersFull, match="did not answer"):
        asyncio.run(asyncio.wait_for(d.run(request(), 512, 512, first_seed=1), timeout=10))
    d, _ = staged_fleet(FakeStage())
    d.encoder_lost = "its card node is dead"
    with pytest.raises(TiersFull, match="text-encoder stage is unavailable"):
        asyncio.run(d.run(request(), 512, 512, first_seed=1))


def test_the_stage_is_lost_only_when_its_card_nodes_are_dead_and_it_reports_nowhere():
    from deployments.config import TextEncoderSettings
    from deployments.dispatch import stage_lost
    from runtime.nodes import LABEL_TEXT_ENCODER

    on_card = TextEncoderSettings(where="card", cards=["GPU-24"])
    host = node("vram_24", "GPU-24", alive=False)
    host["labels"][LABEL_TEXT_ENCODER] = "true"
    assert "GPU-24" in stage_lost(on_card, [], [host])
    assert stage_lost(on_card, [{"kind": "text_encoder"}], [host]) is None
    assert stage_lost(on_card, [], [{**host, "alive": True}]) is None  # restarting where its card still is
    assert stage_lost(TextEncoderSettings(where="cpu"), [], [host]) is None


def test_a_request_the_stage_encoded_is_planned_with_its_real_prompt_tokens():
    """The transformer runs the prompt's real tokens (padded to 32), not the 512 the encoder pads to: once the stage
    has encoded a 5-token prompt, the 12 GB tier takes four 1280x1280 images per call (three at the 512-token
    bound), and each job carries the peak for 32 prompt tokens. Without the stage the bound holds."""
    from cluster.memory import for_prompt, predict_peak

    tier = card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB, speed=0.35)
    for stage, sizes, tokens in ((FakeStage(), [4], 5), (None, [2, 2], None)):
        jobs = []
        d = Dispatcher([tier], {tier.name: tier_profile(tier)}, {tier.name: RecordingGenerator(tier.name, jobs)},
                       load_calibration(), encoder=stage)
        asyncio.run(d.run(request(n=4, size="1280x1280"), 1280, 1280, first_seed=1))
        assert [len(job.seeds) for _, job in jobs] == sizes
        cal = for_prompt(d.calibration, tokens)
        assert cal.prompt_tokens == (32 if stage else 512)
        assert all(job.predicted_peak == predict_peak(1280, 1280, len(job.seeds), d.profiles["vram_12"], cal).total
                   for _, job in jobs)


def test_a_request_no_tier_holds_even_at_the_fewest_tokens_is_refused_before_it_is_encoded():
    from deployments.routing import NoTierFits

    stage = FakeStage()
    tier = card_tier("vram_4", 1, bf16=False, vram_bytes=4 * GIB, speed=0.08)
    d = Dispatcher([tier], {tier.name: tier_profile(tier)}, {tier.name: RecordingGenerator(tier.name, [])},
                   load_calibration(), encoder=stage)
    with pytest.raises(NoTierFits):
        asyncio.run(d.run(request(n=1, size="2048x2048"), 2048, 2048, first_seed=1))
    assert stage.calls == []


def test_a_request_every_queue_would_refuse_gets_its_503_before_it_is_encoded():
    """Under overload the stage (one encode at a time) must not spend itself on requests that are refused: a
    request that no tier's queue has room for gets TiersFull without an encode."""
    stage = FakeStage()
    tier = card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB, speed=0.35, max_queued_requests=1)
    d = Dispatcher([tier], {tier.name: tier_profile(tier)}, {tier.name: RecordingGenerator(tier.name, [])},
                   load_calibration(), encoder=stage)
    d.queues["vram_12"].running = 1  # its one replica busy: one chunk of 4 may wait, the second finds no place
    with pytest.raises(TiersFull):
        asyncio.run(d.run(request(n=8, size="1024x1024"), 1024, 1024, first_seed=1))
    assert stage.calls == []


# -- PCIe links (cluster/link.py) ------------------------------------------------------------------------------------


def test_a_tier_on_an_x1_riser_is_predicted_slow_and_its_work_spills_to_a_fast_one():
    """Two otherwise equal tiers; one's card streams over an x1 riser. Before any chunk ran, the tier choice sends
    work to the other, since the time model streams the riser card's weights at 0.79 GB/s."""
    from cluster.link import pcie_bytes_s

    riser = dict(link_bytes_s=pcie_bytes_s(3, 1), link_detail="gen3 x1")
    d = dispatcher(card_tier("vram_6", 1, bf16=False, vram_bytes=6 * GIB, speed=0.45, **riser),
                   card_tier("vram_8", 1, bf16=True, vram_bytes=8 * GIB, speed=0.45))
    slow, fast = (d._seconds_per_unit(tier, 1024, 1024, 9) for tier in ("vram_6", "vram_8"))
    assert slow > 5 * fast
    assert [tier for tier, _ in assign(d, 1)] == ["vram_8"]
    # A service told to ignore links (link_aware: false) sees no difference and takes the cheaper tier.
    blind = dispatcher(*(t.model_copy(update={"link_aware": False}) for t in d.tiers.values()))
    assert [tier for tier, _ in assign(blind, 1)] == ["vram_6"]


def test_a_tier_is_predicted_at_its_replicas_throughput_weighted_step_once_they_report():
    """A tier with a fast card and a riser card: planned at the riser's link until reports come, then at the
    throughput of both (the in-tier router keeps the riser for when the fast card is queued up)."""
    from cluster.link import pcie_bytes_s

    tier = card_tier("vram_8", 2, bf16=True, vram_bytes=8 * GIB, speed=0.45, link_bytes_s=pcie_bytes_s(3, 1),
                     link_detail="gen3 x1")
    d = dispatcher(tier)
    before = d._seconds_per_unit("vram_8", 1024, 1024, 9)
    d.update_from_reports([{**report("vram_8", 8 * GIB), "reference_step_s": 1.0},
                           {**report("vram_8", 8 * GIB), "reference_step_s": 7.8}])
    assert d.step_factor["vram_8"] == pytest.approx(2 / (1 / 1.0 + 1 / 7.8) / 7.8, rel=0.05)
    assert d._seconds_per_unit("vram_8", 1024, 1024, 9) == pytest.approx(before * d.step_factor["vram_8"])
