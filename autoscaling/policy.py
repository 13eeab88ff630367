"""Replicas per tier: the autoscaling decision as a pure function, and two baselines with the same signature.

`decide(signals, config, now, state) -> (replicas per tier, state per tier)` runs every control period. Tiers come
cheapest (smallest VRAM) first, as the router orders them; a larger tier can take what a smaller one takes. Steps:
  1. throughput: measured units per second per replica, else a prior from the time model (cluster/speed.py);
  2. need: replicas to carry the load the busy replicas carry now at `target_utilization`, plus enough to clear the
     queue within `target_wait_s`; never fewer than the chunks running;
  3. saturation: a tier that needs more replicas than it has cards gives the rest of its demand, converted at the
     receiving tier's throughput, to the next larger tier (`spill_up`); the largest tier gives it to the next
     smaller one that has cards left (`spill_down`: the router sends there whatever fits);
  4. cold start: replicas added less than `cold_start_s` ago are loading. While a tier has queued work and no ready
     replica, a warm larger tier with room takes that work (`send_to` in the state; the adapter re-routes the
     tier's waiting chunks there) and is raised if its ready replicas cannot clear it within the target wait;
  5. scale up at once (the cold start is delay enough); scale down only when the need stayed below the replicas
     for `downscale_delay_s`, and then only to the largest need seen in that window (hysteresis); never below one
     replica while the tier has had work within `idle_timeout_s`, and to zero after that (`scale_to_zero`);
  6. bounds: `min_replicas` <= replicas <= cards (cards with room for the profile's resident memory now); a tier
     with more replicas than cards is brought down to its cards (`drain`). The Serve adapter leaves replicas on
     lost cards out of both counts (autoscaling/serve_policy.py).
The state of each tier says which rule decided and with which numbers; it also carries the policy's memory (when
replicas were added, the need over the hysteresis window) under keys starting with "_", which the adapter passes
back unchanged. The function never raises on well-formed signals; an unknown tier in `state` is ignored.

Baselines: `fixed` (every card that can host a replica has one, always) and `ray_default` (Ray Serve's
request-based policy, `ray.serve.autoscaling_policy.replica_queue_length_autoscaling_policy` with its default
AutoscalingConfig: ceil(ongoing requests averaged over 30 s / 2), scale-up after 30 s, scale-down after 600 s,
from zero at once, min_replicas 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.speed import prior_units_per_s


@dataclass(frozen=True)
class TierSignals:
    """What the policy knows about one tier at one control period."""

    tier: str
    replicas: int  # replicas the tier has now, those still loading included
    cards: int  # cards able to host a replica now (room for the profile's resident memory after foreign
    # processes; failed or missing cards excluded)
    running: int  # chunks computing on the tier's replicas
    queued: int  # chunks waiting for a replica of this tier
    queued_units: float  # their work (image tokens x images x steps, cluster.requests.work_units)
    busy_fraction: float  # share of the ready replicas' time spent computing over the last period, 0..1
    units_per_s: float | None  # measured throughput of one replica while computing; None before any chunk finished
    idle_s: float  # seconds since the tier last had work (running or queued); 0 while it has some
    cold_start_s: float  # model load time of a new replica


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of `decide`. Each default says why it is what it is."""

    # Longest a chunk should wait in a tier's queue. 20 s is about three 1024x1024 images on a mid-range card:
    # short next to the minute a cold start takes, long enough not to add a replica for every short burst.
    target_wait_s: float = 20.0
    # Busy share a tier is sized for. New replicas take a cold start (about a minute) to help, so the warm ones must
    # carry what arrives meanwhile: image traffic can triple within a minute (a flash crowd), and 0.35 leaves room
    # for about that (1 / 0.35 = 2.9x) without a queue. Higher values save idle GPU time and lose the tail under
    # bursts (0.5: p95 +30 % in the 1,000-card benchmark, docs/autoscaling.md); lower ones buy little.
    target_utilization: float = 0.35
    # How long the need must stay below the replicas before scaling down. 120 s is two cold starts: removing a
    # replica that is needed again within that time would cost more waiting than keeping it.
    downscale_delay_s: float = 120.0
    # Seconds without work before a tier goes to zero. 300 s: five cold starts' worth of an idle card is the price
    # of not making the next request wait a model load.
    idle_timeout_s: float = 300.0
    # Replicas every tier keeps, idle or not. 0: idle tiers cost nothing; a warm larger tier takes their requests.
    min_replicas: int = 0
    # Throughput prior per tier (units per second per replica) for tiers not measured yet; the adapter fills it
    # from the time model and the tier's slowest card (`prior_units_per_s`). Missing tiers use its typical speed.
    priors: tuple[tuple[str, float], ...] = ()

    def prior(self, tier: str) -> float:
        for name, value in self.priors:
            if name == tier:
                return value
        return prior_units_per_s(tier)


# Requests one text-encoder stage replica holds before another one helps: an encode takes about a second on a card
# and a cache hit nothing, so four waiting is a few seconds of queue.
STAGE_TARGET_REQUESTS = 4


def stage_replicas(requests: float, replicas: int, most: int, target: int = STAGE_TARGET_REQUESTS) -> int:
    """Replicas of the text-encoder stage for `requests` held at its replicas now: enough that each holds at most
    `target`, at least one (every request passes through it), at most `most` (the cards that host it)."""
    return max(1, min(most, math.ceil(requests / target) if requests > 0 else 1))


# -- the policy --------------------------------------------------------------------------------------------------


def decide(
    signals: list[TierSignals], config: PolicyConfig, now: float, state: dict
) -> tuple[dict[str, int], dict[str, dict]]:
    """Replicas per tier and why (see the module docstring for the rules, in order)."""
    out: dict[str, dict] = {}
    need: dict[str, float] = {}
    rate: dict[str, float] = {}
    ready: dict[str, int] = {}
    loading: dict[str, int] = {}
    # 1-2. Throughput, loading replicas and each tier's own need.
    for s in signals:
        prev = state.get(s.tier, {})
        rate[s.tier] = s.units_per_s or config.prior(s.tier)
        starts = [(t, k) for t, k in prev.get("_starts", []) if now - t < s.cold_start_s]
        loading[s.tier] = min(s.replicas, sum(k for _, k in starts))
        ready[s.tier] = s.replicas - loading[s.tier]
        load = s.busy_fraction * ready[s.tier] / config.target_utilization
        # The queue is cleared by the replicas there will be: loading ones count from when they are ready.
        loaded_in = max((s.cold_start_s - (now - t) for t, _ in starts), default=0.0)
        clear = s.queued_units / (rate[s.tier] * (config.target_wait_s + loaded_in))
        need[s.tier] = max(float(s.running), load + clear)
        out[s.tier] = {"signal": "steady", "queue": s.queued, "running": s.running, "busy": round(s.busy_fraction, 2),
                       "units_per_s": round(rate[s.tier], 1), "measured": s.units_per_s is not None,
                       "need": round(need[s.tier], 2), "_starts": starts}
        if loading[s.tier]:
            out[s.tier]["loading"] = loading[s.tier]

    # 3. Saturated tiers give their excess to the next larger tier, the largest to the next smaller one.
    order = [s.tier for s in signals]
    cards = {s.tier: s.cards for s in signals}
    for i, name in enumerate(order[:-1]):
        _spill(name, order[i + 1:], need, rate, cards, out, "spill_up")
    if order:
        _spill(order[-1], order[-2::-1], need, rate, cards, out, "spill_down")

    # 4. Cold start: queued work of a tier with nothing ready goes to a warm larger tier with room.
    for i, s in enumerate(signals):
        if s.queued == 0 or ready[s.tier] > 0:
            continue
        out[s.tier]["cold_start"] = round(s.cold_start_s, 1)
        for larger in order[i + 1:]:
            if ready[larger] == 0:
                continue
            spare = ready[larger] - need[larger]
            raise_by = max(0.0, s.queued_units / (rate[larger] * config.target_wait_s) - max(0.0, spare))
            need[larger] += raise_by
            out[s.tier]["send_to"] = larger
            out[s.tier]["moved_units"] = round(s.queued_units)
            out[larger].setdefault("takes_from", []).append(s.tier)
            if raise_by:
                out[larger]["signal"] = "cold_start_cover"
                out[larger]["need"] = round(need[larger], 2)
            break

    # 5-6. Scale up now, down with hysteresis, to zero when idle; within [min_replicas, cards].
    replicas: dict[str, int] = {}
    for s in signals:
        info = out[s.tier]
        prev = state.get(s.tier, {})
        want = math.ceil(need[s.tier] - 1e-9)
        window = [(t, n) for t, n in prev.get("_window", []) if now - t <= config.downscale_delay_s + 1e-6]
        window.append((now, want))
        below_since = prev.get("_below_since") if want < s.replicas else None
        if want < s.replicas and below_since is None:
            below_since = now
        info["_window"], info["_below_since"] = window, below_since
        target = s.replicas
        if s.replicas > s.cards:
            target = s.cards
            info["signal"] = "drain"
        elif want > s.replicas:
            target = want
            if s.replicas == 0:
                info["signal"] = "scale_from_zero"
            elif info["signal"] == "steady":
                info["signal"] = "scale_up"
        elif (s.replicas > 0 and s.running == 0 and s.queued == 0 and not loading.get(s.tier)
              and min(s.idle_s, now - prev.get("_last_up", -math.inf)) >= config.idle_timeout_s):
            target = 0
            info["signal"] = "scale_to_zero"
            info["idle_s"] = round(s.idle_s)
        elif want < s.replicas:
            if now - below_since >= config.downscale_delay_s - 1e-6:
                target = max(1, max(n for _, n in window))  # the most the tier needed in the window
                info["signal"] = "scale_down" if target < s.replicas else "steady"
            else:
                info["signal"] = "hold"  # the need is lower, but not for long enough yet
                info["hold_s"] = round(config.downscale_delay_s - (now - below_since))
        target = max(min(config.min_replicas, s.cards), min(target, s.cards))
        info["replicas"] = f"{s.replicas} -> {target}"
        info["_last_up"] = prev.get("_last_up", -math.inf)
        if target > s.replicas:
            info["_starts"].append((now, target - s.replicas))
            info["_last_up"] = now
        replicas[s.tier] = target
    return replicas, out


def _spill(name, receivers, need, rate, cards, out, signal) -> None:
    """Move the part of `name`'s need above its cards to `receivers`, in order, converted by throughput."""
    excess = need[name] - cards[name]
    if excess <= 1e-9:
        return
    units = excess * rate[name]  # units per second the tier cannot carry
    need[name] = float(cards[name])
    out[name]["saturated"] = True
    for other in receivers:
        room = cards[other] - need[other]
        if room <= 0:
            continue
        take = min(room, units / rate[other])
        need[other] += take
        units -= take * rate[other]
        out[name].setdefault(signal, {})[other] = round(take, 2)
        out[other]["need"] = round(need[other], 2)
        if out[other]["signal"] == "steady":
            out[other]["signal"] = f"{signal}_from_{name}"
        if units <= 1e-9:
            break
    out[name]["need"] = round(need[name], 2)


# -- baselines ---------------------------------------------------------------------------------------------------


def fixed(signals: list[TierSignals], config: PolicyConfig, now: float, state: dict):
    """Every card that can host a replica has one, always (the deployment without autoscaling)."""
    return ({s.tier: s.cards for s in signals},
            {s.tier: {"signal": "fixed", "replicas": f"{s.replicas} -> {s.cards}"} for s in signals})


# Ray Serve's AutoscalingConfig defaults (ray 2.60, ray/serve/config.py and _private/constants.py).
RAY_TARGET_ONGOING_REQUESTS = 2
RAY_UPSCALE_DELAY_S = 30.0
RAY_DOWNSCALE_DELAY_S = 600.0
RAY_LOOK_BACK_PERIOD_S = 30.0
RAY_MIN_REPLICAS = 1


def ray_default(signals: list[TierSignals], config: PolicyConfig, now: float, state: dict):
    """Ray Serve's default request-based policy per tier, with its default delays and bounds (max: the cards).

    desired = ceil(mean ongoing requests over the look-back window / target_ongoing_requests); from zero with
    requests: max(1, desired) at once; otherwise a change is applied once it has been wanted continuously for
    upscale_delay_s (up) or downscale_delay_s (down; never below 1 except 1 -> 0). Ongoing = running + queued.
    """
    replicas, out = {}, {}
    for s in signals:
        prev = state.get(s.tier, {})
        samples = [(t, v) for t, v in prev.get("_samples", []) if now - t < RAY_LOOK_BACK_PERIOD_S]
        samples.append((now, s.running + s.queued))
        ongoing = sum(v for _, v in samples) / len(samples)
        desired = math.ceil(ongoing / RAY_TARGET_ONGOING_REQUESTS - 1e-9)
        since = prev.get("_since")
        direction = prev.get("_direction", 0)
        target = s.replicas
        signal = "steady"
        if s.replicas == 0 and s.running + s.queued > 0:
            target, signal, since, direction = max(1, desired), "scale_from_zero", None, 0
        elif desired != s.replicas:
            d = 1 if desired > s.replicas else -1
            if d != direction or since is None:
                since, direction = now, d
            delay = RAY_UPSCALE_DELAY_S if d > 0 else RAY_DOWNSCALE_DELAY_S
            if now - since >= delay - 1e-6:
                target = desired if (d > 0 or s.replicas == 1) else max(1, desired)
                signal = "scale_up" if d > 0 else "scale_down"
                since, direction = None, 0
            else:
                signal = "hold"
        else:
            since, direction = None, 0
        target = max(min(RAY_MIN_REPLICAS, s.cards), min(target, s.cards))
        replicas[s.tier] = target
        out[s.tier] = {"signal": signal, "ongoing": round(ongoing, 2), "desired": desired,
                       "replicas": f"{s.replicas} -> {target}", "_samples": samples, "_since": since,
                       "_direction": direction}
    return replicas, out


POLICIES = {"policy": decide, "fixed": fixed, "ray_default": ray_default}
