"""The autoscaling decision on constructed signals: no Ray, no simulator."""

from autoscaling.policy import PolicyConfig, TierSignals, decide, fixed, ray_default

CONFIG = PolicyConfig(priors=(("vram_8", 1000.0), ("vram_24", 4000.0)))


def sig(tier="vram_8", replicas=2, cards=10, running=0, queued=0, queued_units=0.0, busy=0.0, units_per_s=1000.0,
        idle_s=0.0, cold_start_s=60.0) -> TierSignals:
    return TierSignals(tier, replicas, cards, running, queued, queued_units, busy, units_per_s, idle_s, cold_start_s)


def run(signals, now=1000.0, state=None, config=CONFIG):
    return decide(signals, config, now, state or {})


def test_queue_beyond_target_wait_scales_up_and_says_why():
    # 2 replicas busy all the time and 60 s of work queued at 1000 units/s per replica: the queue alone needs 3.
    replicas, state = run([sig(replicas=2, running=2, queued=7, queued_units=60_000.0, busy=1.0)])
    need = 2 / CONFIG.target_utilization + 60_000 / (1000 * CONFIG.target_wait_s)
    assert replicas["vram_8"] == round(need + 0.5)
    assert state["vram_8"]["signal"] == "scale_up"
    assert state["vram_8"]["queue"] == 7
    assert state["vram_8"]["replicas"] == f"2 -> {replicas['vram_8']}"


def test_unmeasured_tier_uses_the_time_model_prior():
    _, state = run([sig(units_per_s=None, queued=1, queued_units=10.0)])
    assert state["vram_8"]["measured"] is False
    assert state["vram_8"]["units_per_s"] == 1000.0


def test_scale_down_waits_for_the_delay_then_goes_to_the_window_max():
    state, t = {}, 0.0
    # Busy enough for 4 replicas at first, then only for 2: hold while the high need is in the window.
    replicas, state = decide([sig(replicas=8, running=1, busy=4 * CONFIG.target_utilization / 8)], CONFIG, t, state)
    assert replicas["vram_8"] == 8 and state["vram_8"]["signal"] == "hold"
    while t < CONFIG.downscale_delay_s - 10:
        t += 10
        replicas, state = decide([sig(replicas=8, running=1, busy=2 * CONFIG.target_utilization / 8)], CONFIG, t,
                                 state)
        assert replicas["vram_8"] == 8, t
    t += 10
    replicas, state = decide([sig(replicas=8, running=1, busy=2 * CONFIG.target_utilization / 8)], CONFIG, t, state)
    assert state["vram_8"]["signal"] == "scale_down"
    assert replicas["vram_8"] == 4  # the largest need still in the window, not the latest
    assert state["vram_8"]["replicas"] == "8 -> 4"


def test_need_that_comes_back_resets_the_downscale_clock():
    _, state = decide([sig(replicas=8, running=1, busy=0.05)], CONFIG, 0.0, {})
    _, state = decide([sig(replicas=8, running=8, busy=1.0)], CONFIG, 100.0, state)
    replicas, state = decide([sig(replicas=8, running=1, busy=0.05)], CONFIG, CONFIG.downscale_delay_s + 10, state)
    assert replicas["vram_8"] == 8 and state["vram_8"]["signal"] == "hold"


def test_idle_tier_keeps_one_replica_until_the_timeout_then_goes_to_zero():
    replicas, _ = run([sig(replicas=1, idle_s=CONFIG.idle_timeout_s - 1)])
    assert replicas["vram_8"] == 1
    replicas, state = run([sig(replicas=1, idle_s=CONFIG.idle_timeout_s)])
    assert replicas["vram_8"] == 0
    assert state["vram_8"]["signal"] == "scale_to_zero"


def test_min_replicas_keeps_a_tier_warm():
    config = PolicyConfig(min_replicas=1, priors=CONFIG.priors)
    replicas, _ = run([sig(replicas=1, idle_s=10_000)], config=config)
    assert replicas["vram_8"] == 1


def test_demand_on_a_tier_at_zero_scales_it_from_zero():
    replicas, state = run([sig(replicas=0, queued=1, queued_units=5000.0, idle_s=0.0)])
    assert replicas["vram_8"] >= 1
    assert state["vram_8"]["signal"] == "scale_from_zero"


def test_cold_start_sends_demand_to_a_warm_larger_tier_and_raises_it():
    # vram_8 has nothing ready and work queued; vram_24 is warm but fully used: it takes the work and grows.
    signals = [sig(replicas=0, queued=20, queued_units=200_000.0),
               sig("vram_24", replicas=2, cards=10, running=2, busy=CONFIG.target_utilization, units_per_s=4000.0)]
    replicas, state = run(signals)
    assert state["vram_8"]["send_to"] == "vram_24"
    assert state["vram_8"]["cold_start"] == 60.0
    assert state["vram_24"]["signal"] == "cold_start_cover"
    assert replicas["vram_24"] > 2
    assert replicas["vram_8"] >= 1  # and the small tier still starts, to take over when loaded


def test_loading_replicas_are_not_scaled_to_zero_or_counted_twice():
    replicas, state = run([sig(replicas=0, queued=5, queued_units=50_000.0)], now=0.0)
    started = replicas["vram_8"]
    # 30 s later: still loading, queue unchanged, tier idle for long by the clock: nothing changes.
    again, state = decide([sig(replicas=started, queued=5, queued_units=50_000.0, idle_s=10_000)], CONFIG, 30.0,
                          state)
    assert again["vram_8"] == started
    assert state["vram_8"]["loading"] == started


def test_saturated_small_tier_moves_its_demand_to_the_next_larger_tier():
    signals = [sig(replicas=4, cards=4, running=4, queued=30, queued_units=300_000.0, busy=1.0),
               sig("vram_24", replicas=1, cards=10, running=0, busy=0.0, units_per_s=4000.0)]
    replicas, state = run(signals)
    assert replicas["vram_8"] == 4
    assert state["vram_8"]["saturated"] is True
    assert state["vram_8"]["spill_up"]["vram_24"] > 0
    assert replicas["vram_24"] > 1
    assert state["vram_24"]["signal"] == "spill_up_from_vram_8"


def test_saturated_largest_tier_wakes_the_next_smaller_one():
    signals = [sig(replicas=0, cards=10, idle_s=10_000),
               sig("vram_24", replicas=4, cards=4, running=4, queued=40, queued_units=400_000.0, busy=1.0,
                   units_per_s=4000.0)]
    replicas, state = run(signals)
    assert replicas["vram_8"] > 0
    assert state["vram_24"]["spill_down"]["vram_8"] > 0


def test_never_more_replicas_than_cards_and_lost_cards_are_drained():
    replicas, _ = run([sig(replicas=2, cards=3, running=2, queued=500, queued_units=1e9, busy=1.0)])
    assert replicas["vram_8"] == 3
    replicas, state = run([sig(replicas=3, cards=1, running=1, busy=1.0)])
    assert replicas["vram_8"] == 1 and state["vram_8"]["signal"] == "drain"


def test_fixed_baseline_puts_a_replica_on_every_card():
    replicas, state = fixed([sig(replicas=0, cards=7), sig("vram_24", replicas=3, cards=2)], CONFIG, 0.0, {})
    assert replicas == {"vram_8": 7, "vram_24": 2}
    assert state["vram_8"]["signal"] == "fixed"


def test_ray_default_is_ongoing_over_target_after_its_delays():
    # 8 ongoing requests / target 2 = 4 replicas, but only after 30 s of wanting it; from zero at once.
    replicas, state = ray_default([sig(replicas=1, running=1, queued=7)], CONFIG, 0.0, {})
    assert replicas["vram_8"] == 1 and state["vram_8"]["signal"] == "hold"
    replicas, state = ray_default([sig(replicas=1, running=1, queued=7)], CONFIG, 30.0, state)
    assert replicas["vram_8"] == 4 and state["vram_8"]["signal"] == "scale_up"
    replicas, _ = ray_default([sig(replicas=0, queued=3)], CONFIG, 0.0, {})
    assert replicas["vram_8"] == 2
    # Idle: down to Ray's min_replicas (1) only after 600 s, never to zero.
    state, current = {}, 4
    for t in range(0, 1400, 10):
        replicas, state = ray_default([sig(replicas=current)], CONFIG, float(t), state)
        current = replicas["vram_8"]
        if t < 600:
            assert current == 4, t
    assert current == 1
