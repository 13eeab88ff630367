"""The Ray Serve adapters of the autoscaling policy (autoscaling/policy.py `decide`).

Two ways in, the same decision:
- `FleetAutoscaler`, the application-level policy: `autoscaling_policy: {policy_function:
  autoscaling.serve_policy:FleetAutoscaler}` under the application in serve_config.yaml (and the Helm chart's
  serveConfigV2; `zit up --autoscale` deploys that way too). Serve calls it every control-loop period with the
  AutoscalingContext of every autoscaled deployment of the application; it decides all tiers in one `decide` call, so
  a saturated small tier's demand raises a larger tier (`spill_up`) and a warm larger tier covers a tier that is
  still loading (`cold_start_cover`).
- `TierAutoscaler`, the deployment-level policy build_app gives every Generator deployment (`autoscaling_config.
  policy` with `policy_kwargs`: the tier, the settings, its throughput prior and VRAM). It decides its tier alone
  where no application-level policy is configured (an app started with `serve.run`); where one is, Serve uses the
  application's and logs that it takes precedence, and `FleetAutoscaler` reads each tier's kwargs from there.
Each turns a context into the policy's TierSignals (`tier_signals`, pure), asks `decide` and returns replica counts
and state. Serve applies a count within [min_replicas, max_replicas], max_replicas being the tier's cards.

Where each signal comes from:
- replicas: Serve's target replica count (replicas still starting included: the policy knows they are loading
  from its own state); cards: max_replicas;
- running: requests at the replicas (Serve's count) minus those still queued at a handle;
- queued and queued_units: the chunks waiting in the ingress's queue for this tier, which the ingress attaches to
  every job and to the wake-up call it sends a tier at zero replicas (Generator.record_autoscaling_stats reports the
  latest it saw), plus requests Serve holds at handles (a wake-up of a tier at zero);
- busy_fraction, units_per_s, cold_start_s: the replicas' own measurements (record_autoscaling_stats);
- idle_s: kept in the policy state (when the tier last had work).
- unusable cards: replicas whose card NVML has lost, or where other processes (NVML's foreign memory) leave no
  room for even the smallest request (`card_unusable`), count neither as replicas nor as cards, so the policy
  sizes the tier from its usable cards; the adapter adds them back to the count it returns, so Serve stops no
  healthy replica in their place (routing sends them nothing; they serve again when the card is back).
Work itself moves between tiers at routing time (the ingress sends a chunk where it finishes first,
deployments/scheduler.py); the application-level policy sizes the tiers for where it will go.
"""

from __future__ import annotations

import dataclasses
import math
import time

from autoscaling.policy import PolicyConfig, TierSignals, decide, stage_replicas
from cluster.requests import work_units
from cluster.speed import PRIOR_SIZE, PRIOR_STEPS
from deployments.config import COLD_START_OVERHEAD_S, AutoscalingSettings

# Custom metrics a Generator replica reports (deployments/generator.py record_autoscaling_stats).
METRIC_BUSY = "busy_fraction"
METRIC_UNITS_PER_S = "units_per_s"
METRIC_LOAD_S = "load_s"
METRIC_QUEUED = "queued"
METRIC_QUEUED_UNITS = "queued_units"
METRIC_CARD_UNUSABLE = "card_unusable"


def policy_config(settings: AutoscalingSettings) -> PolicyConfig:
    """The policy's knobs from the service config's `autoscaling` settings."""
    return PolicyConfig(target_wait_s=settings.target_wait_s, target_utilization=settings.target_utilization,
                        downscale_delay_s=settings.downscale_delay_s, idle_timeout_s=settings.idle_timeout_s,
                        min_replicas=settings.min_replicas)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def tier_signals(tier: str, ctx, state: dict, cold_start_s: float) -> tuple[TierSignals, float, int]:
    """(TierSignals of `tier` from a Serve AutoscalingContext, the time now, replicas on unusable cards: left out of
    the signals' replicas and cards). `state` is the policy state of the previous call (when the tier last had work:
    `_last_work`)."""
    now = ctx.current_time or time.time()
    metrics = ctx.aggregated_metrics or {}
    # Replicas on unusable cards: counted out here, and their readings (idle, stale) kept out of the averages.
    unusable_ids = {rid for rid, value in (metrics.get(METRIC_CARD_UNUSABLE) or {}).items() if value >= 0.5}
    unusable = len(unusable_ids)
    per_replica = {name: [v for rid, v in (metrics.get(name) or {}).items() if rid not in unusable_ids] for name in
                   (METRIC_BUSY, METRIC_UNITS_PER_S, METRIC_LOAD_S, METRIC_QUEUED, METRIC_QUEUED_UNITS)}
    at_handles = float(ctx.total_queued_requests or 0.0)
    running = max(0, round(float(ctx.total_num_requests or 0.0) - at_handles))
    queued_reports = per_replica[METRIC_QUEUED]
    queued = round(max(queued_reports, default=0.0) + at_handles)
    queued_units = max(per_replica[METRIC_QUEUED_UNITS], default=0.0)
    units_per_s = _mean(v for v in per_replica[METRIC_UNITS_PER_S] if v and v > 0)
    if queued and not queued_units:  # a wake-up with no size yet: count it as one chunk of the default request
        queued_units = queued * work_units(PRIOR_SIZE, PRIOR_SIZE, 1, PRIOR_STEPS)
    # Cold start: what the replicas measured loading the model plus Ray starting them (remembered while the tier is
    # at zero), else the configured guess.
    measured = max(per_replica[METRIC_LOAD_S], default=0.0)
    load_s = (measured + COLD_START_OVERHEAD_S if measured else 0.0) or state.get("_cold_start_s") or cold_start_s
    last_work = state.get("_last_work")
    if running or queued:
        last_work = now
    elif last_work is None:
        last_work = now  # the first call: idle from now on
    target = ctx.target_num_replicas if ctx.target_num_replicas is not None else ctx.current_num_replicas
    signals = TierSignals(
        tier=tier,
        replicas=int(max(target - unusable, 0)),
        cards=max(0, int(ctx.capacity_adjusted_max_replicas) - unusable),
        running=running,
        queued=queued,
        queued_units=float(queued_units),
        busy_fraction=min(1.0, max(0.0, _mean(per_replica[METRIC_BUSY]) or 0.0)),
        units_per_s=units_per_s,
        idle_s=max(0.0, now - last_work),
        cold_start_s=float(load_s),
    )
    return signals, now, unusable


class TierAutoscaler:
    """Serve's policy object for one tier: `__call__(ctx) -> (replicas, state)`. The state is the policy's, with
    `signal` and the numbers that decided it; Serve hands it back on the next call. From zero replicas Serve starts
    one itself when a request waits (its cold-start rule, before calling the policy); the policy takes over from
    there with the queue the jobs report."""

    def __init__(self, tier: str, settings: dict | None = None, prior_units_per_s: float | None = None,
                 vram_bytes: int | None = None):
        self.tier = tier
        self.vram_bytes = vram_bytes
        self.settings = AutoscalingSettings.model_validate(settings or {})
        config = policy_config(self.settings)
        if prior_units_per_s:
            config = dataclasses.replace(config, priors=((tier, prior_units_per_s),))
        self.config = config

    def __call__(self, ctx) -> tuple[int, dict]:
        previous = dict(ctx.policy_state or {})
        signals, now, unusable = tier_signals(self.tier, ctx, previous, self.settings.cold_start_s)
        replicas, states = decide([signals], self.config, now, {self.tier: previous})
        return replicas[self.tier] + unusable, _keep(states[self.tier], now, signals, unusable)


class StageAutoscaler:
    """Serve's policy object for the text-encoder stage (deployment-level): `stage_replicas` of the requests its
    replicas hold, within the deployment's bounds."""

    def __init__(self, stage: str = "text_encoder"):
        self.stage = stage

    def __call__(self, ctx) -> tuple[int, dict]:
        requests = float(ctx.total_num_requests or 0.0)
        most = int(ctx.capacity_adjusted_max_replicas or 1)
        replicas = stage_replicas(requests, int(ctx.current_num_replicas or 0), most)
        return replicas, {"signal": "stage", "requests": requests}


class IngressAutoscaler:
    """Serve's policy object for the ingress (deployment-level): enough replicas that each holds about `ingress`
    requests (AutoscalingSettings.ingress_target_requests); fewer only once the need has stayed lower for
    `downscale_delay_s`. Serve keeps the count within [ingress_replicas, ingress_max_replicas]."""

    def __init__(self, ingress: int = 64, downscale_delay_s: float = 120.0):
        self.target = max(1, int(ingress))
        self.downscale_delay_s = downscale_delay_s

    def __call__(self, ctx) -> tuple[int, dict]:
        now = ctx.current_time or time.time()
        requests = float(ctx.total_num_requests or 0.0)
        current = int(ctx.target_num_replicas if ctx.target_num_replicas is not None else ctx.current_num_replicas or 0)
        want = max(1, math.ceil(requests / self.target))
        state = {"signal": "ingress", "requests": requests}
        if want < current:
            lower_since = (ctx.policy_state or {}).get("_lower_since") or now
            if now - lower_since < self.downscale_delay_s:
                want = current
                state["_lower_since"] = lower_since
        return want, state


class FleetAutoscaler:
    """Serve's application-level policy: `__call__(contexts) -> (replicas per deployment, state per deployment)`,
    every tier in one `decide` call, cheapest tier first. Each Generator deployment's own `TierAutoscaler` kwargs
    (in its AutoscalingContext's config) name its tier, settings, prior and VRAM; a deployment without them (not a
    tier) gets no decision and keeps its replica count. `settings` here, when given, override the tiers' own. Serve
    makes a new instance at every redeploy, so the policy's memory (recent starts, the downscale window) starts
    over then."""

    def __init__(self, settings: dict | None = None):
        self.settings = settings or {}
        self._tiers: dict[str, TierAutoscaler] = {}  # policy_kwargs, resolved once per deployment version

    def _tier(self, ctx) -> TierAutoscaler | None:
        policy = getattr(ctx.config, "policy", None)
        kwargs = dict(getattr(policy, "policy_kwargs", None) or {})
        if "tier" not in kwargs:
            return None
        kwargs["settings"] = {**(kwargs.get("settings") or {}), **self.settings}
        key = repr(sorted(kwargs.items()))
        if key not in self._tiers:
            self._tiers[key] = TierAutoscaler(**kwargs)
        return self._tiers[key]

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        tiers, stages = [], {}
        for deployment_id, ctx in contexts.items():
            kwargs = getattr(getattr(ctx.config, "policy", None), "policy_kwargs", None) or {}
            if "stage" in kwargs:  # the text-encoder stage: sized by the requests it holds
                stages[deployment_id] = StageAutoscaler(kwargs["stage"])(ctx)
                continue
            if "ingress" in kwargs:  # the ingress: sized by the requests it holds
                stages[deployment_id] = IngressAutoscaler(**kwargs)(ctx)
                continue
            tier = self._tier(ctx)
            if tier is not None:
                tiers.append((tier.vram_bytes or 0, tier.tier, deployment_id, ctx, tier))
        tiers.sort(key=lambda t: (t[0], t[1]))
        if not tiers:
            return ({d: n for d, (n, _) in stages.items()}, {d: state for d, (_, state) in stages.items()})
        signals, unusable, previous, config = [], [], {}, tiers[-1][4].config
        now = max(float(ctx.current_time or 0.0) for *_, ctx, _ in tiers) or time.time()
        for _, name, _, ctx, tier in tiers:
            previous[name] = dict(ctx.policy_state or {})
            tier_signal, _, tier_unusable = tier_signals(name, ctx, previous[name], tier.settings.cold_start_s)
            signals.append(tier_signal)
            unusable.append(tier_unusable)
        # One config for the whole fleet (settings are the application's), with every tier's own prior.
        config = dataclasses.replace(config, priors=tuple((tier.tier, tier.config.prior(tier.tier))
                                                          for *_, tier in tiers))
        replicas, states = decide(signals, config, now, previous)
        decisions = {d: n for d, (n, _) in stages.items()}
        out = {d: state for d, (_, state) in stages.items()}
        for (_, name, deployment_id, _, _), tier_signal, tier_unusable in zip(tiers, signals, unusable):
            decisions[deployment_id] = replicas[name] + tier_unusable
            out[deployment_id] = _keep(states[name], now, tier_signal, tier_unusable)
        return decisions, out


def _keep(state: dict, now: float, signals: TierSignals, unusable: int) -> dict:
    """The state Serve hands back next period: the policy's, plus when the tier last had work, its cold start and
    (shown, not used) the replicas on unusable cards."""
    state["_last_work"] = now - signals.idle_s
    state["_cold_start_s"] = signals.cold_start_s
    if unusable:
        state["unusable_cards"] = unusable
    return state
