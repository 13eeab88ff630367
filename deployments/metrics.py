"""Every Prometheus metric of the service, declared once, with one prefix (`zit_`) and low-cardinality labels.

The ingress replica is the one scrape endpoint (`GET /metrics` on the service's HTTP port). It holds three kinds of
numbers, all in the `ServiceMetrics` of that replica (its own CollectorRegistry, so tests and benchmarks can make as
many as they like):
  1. what the ingress sees per HTTP request: requests, end-to-end latency, rejections (the `RecordRequests`
     middleware, with the tier and the rejection reason the generate path notes for the request);
  2. what the dispatcher sees per chunk: queue wait, generation time, images, seconds per step, out-of-memory
     events, degradations, retries, demand per tier (`Dispatcher` calls the recording methods);
  3. state read at scrape time by `FleetCollector`: queue depth per tier (the dispatcher's TierQueues), replicas
     per tier and every card's NVML reading from the fleet registry reports the ingress already polls every 2 s,
     and the card nodes from Ray's node table. A scrape therefore never calls NVML or Ray; it renders what is
     cached (about 15 ms for a busy service with 100 cards, see docs/benchmarks.md).

Labels: endpoint (the route template, never the raw path), status (HTTP code), tier, card (the NVML uuid), model
(the card's name), host, deployment, reason/outcome/kind/source/direction (short fixed words). Never a prompt, a
request id or a key.
Every series whose label values are known up front starts at 0 (per tier; per image endpoint; per rejection status
and reason; per retry reason and pair of tiers; per chunk outcome), so a dashboard panel shows 0 rather than "No
data" before the first event, `rate()` sees that event as an increase, and alerts see a series before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from contextvars import ContextVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "zit_"
METRICS_PATH = "/metrics"
# Label value for requests that produced no image (rejected, failed, or not an image endpoint).
NO_TIER = "none"
# Endpoint label of a request that matched no route (404s): one value, so unknown paths cannot blow up the series.
UNMATCHED = "unmatched"
# Statuses that mean "the service refused the work", and the reason recorded when the handler noted none.
REJECTION_STATUSES = {401: "unauthorized", 413: "body_too_large", 422: "invalid_request", 429: "rate_limited",
                      503: "busy"}
# nginx's code for a client that went away before the answer; the request is counted, not lost.
CLIENT_CLOSED = 499
# The routes that make images: their request, latency and rejection series exist from start-up.
IMAGE_ENDPOINTS = ("/v1/images/generations", "/v1/images/generations/stream", "/sdapi/v1/txt2img")
# Why an image request may be refused (status, reason): REJECTION_STATUSES' defaults and the reasons the generate
# path notes (deployments/ingress.py).
REJECTION_REASONS = (*((str(status), reason) for status, reason in REJECTION_STATUSES.items()),
                     ("422", "no_tier_fits"), ("503", "tiers_full"), ("503", "retries_exhausted"))
# Why a chunk attempt ends (zit_chunks_total's outcome), and why one moves to another tier (zit_retries_total's
# reason; deployments/dispatch.py _failure_reason).
RETRY_REASONS = ("out_of_memory", "bad_image", "replica_died", "node_lost")
CHUNK_OUTCOMES = ("ok", *RETRY_REASONS, "error")
# How a request's call to the text-encoder stage ended: from its cache, encoded, or not (deployments/dispatch.py).
ENCODE_OUTCOMES = ("hit", "miss", "replica_died", "timeout", "lost")
ENCODE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)

# Buckets in seconds. Generation spans 0.05 s (tiny model, small image) to minutes (1024x1024 on a 4 GB card with
# offload); the latency objective (docs/observability.md) sits on the 60 s bucket.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20)

CARD_LABELS = ("card", "model", "tier", "host")

logger = logging.getLogger("ray.serve")

# What one HTTP request learned on its way through the handler (its tier, why it was refused). The middleware puts
# a fresh dict here; tasks the handler starts copy the context, so they write into the same dict.
_request_note: ContextVar[dict | None] = ContextVar("zit_request_note", default=None)


def note_request(**facts) -> None:
    """Attach facts (tier=..., reason=...) to the HTTP request being handled; outside a request, do nothing."""
    note = _request_note.get()
    if note is not None:
        note.update(facts)


def served_tier(results) -> str:
    """The tier a request counts under: the one that made most of its images (the larger one on a tie)."""
    tally = Tally()
    for result in results:
        tally[result.tier] += len(result.images)
    if not tally:
        return NO_TIER
    most = max(tally.values())
    return [tier for tier, count in tally.items() if count == most][-1]


class ServiceMetrics:
    """All zit_ metrics of one ingress replica. `tiers`: the configured TierConfigs (names and replica targets)."""

    def __init__(self, tiers=()):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        tier_names = [tier.name for tier in tiers]
        # 1. HTTP requests (the middleware).
        self.requests = Counter("zit_requests", "HTTP requests answered by the ingress, by route, status and the "
                                "tier that made their images ('none' when no image).",
                                ["endpoint", "status", "tier"], registry=r)
        self.request_seconds = Histogram("zit_request_duration_seconds", "End-to-end time of HTTP requests inside "
                                         "the ingress.", ["endpoint", "tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("zit_rejections", "Requests the service refused (401, 413, 422, 429, 503), by reason.",
                                  ["endpoint", "status", "reason"], registry=r)
        # 2. Chunks (the dispatcher).
        self.queue_wait = Histogram("zit_queue_wait_seconds", "Time a chunk waited in its tier's queue.", ["tier"],
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.generation = Histogram("zit_generation_seconds", "Time a chunk took on a replica (the handle call).",
                                    ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("zit_seconds_per_step", "Seconds per denoising step of finished chunks.",
                                      ["tier"], buckets=STEP_BUCKETS, registry=r)
        self.images = Counter("zit_images", "Images generated.", ["tier"], registry=r)
        self.chunks = Counter("zit_chunks", "Chunk attempts by outcome: ok, out_of_memory, bad_image, replica_died, "
                              "error.", ["tier", "outcome"], registry=r)
        self.oom = Counter("zit_out_of_memory", "Out-of-memory events: a replica's degraded retry on its own card, "
                           "or a chunk that ran out of memory there.", ["tier"], registry=r)
        self.degraded = Counter("zit_degraded", "Chunks that finished with the degraded profile after an "
                                "out-of-memory error.", ["tier"], registry=r)
        self.retries = Counter("zit_retries", "Chunks retried elsewhere, by reason, from tier and to tier.",
                               ["reason", "tier", "to_tier"], registry=r)
        self.demand = Counter("zit_tier_demand", "Requests the memory model says this tier can hold (whether or not "
                              "it ran them).", ["tier"], registry=r)
        self.encodes = Counter("zit_text_encoder_requests", "Requests sent to the text-encoder stage, by outcome: hit "
                               "(its cache had the prompt), miss (encoded), replica_died, timeout, lost.", ["outcome"],
                               registry=r)
        self.encode_seconds = Histogram("zit_text_encoder_seconds", "Time the text-encoder stage took for a request "
                                        "on its replica (a cache hit: about nothing).", ["outcome"],
                                        buckets=ENCODE_BUCKETS, registry=r)
        self._start_at_zero(tier_names)
        # 3. State at scrape time: this replica's queues (summed over ingress replicas like the events above), and
        # the fleet's state (the same in every replica: what each reads from the registry).
        self.fleet = FleetCollector(tiers)
        r.register(QueueCollector(self.fleet))
        self.scrape = CollectorRegistry(auto_describe=False)
        self.scrape.register(self.fleet)

    def _start_at_zero(self, tier_names: list[str]) -> None:
        """Create every series whose labels are known now, at 0 (the module docstring says why)."""
        for outcome in ENCODE_OUTCOMES:
            self.encodes.labels(outcome=outcome)
        for outcome in ("hit", "miss"):
            self.encode_seconds.labels(outcome=outcome)
        for name in tier_names:
            for per_tier in (self.images, self.oom, self.degraded, self.demand, self.queue_wait, self.generation,
                             self.step_seconds):
                per_tier.labels(tier=name)
            for outcome in CHUNK_OUTCOMES:
                self.chunks.labels(tier=name, outcome=outcome)
            for reason in RETRY_REASONS:
                for to_tier in tier_names:
                    self.retries.labels(reason=reason, tier=name, to_tier=to_tier)
        for endpoint in IMAGE_ENDPOINTS:
            for tier in (*tier_names, NO_TIER):
                self.request_seconds.labels(endpoint=endpoint, tier=tier)
                if tier != NO_TIER:
                    self.requests.labels(endpoint=endpoint, status="200", tier=tier)
            for status, reason in REJECTION_REASONS:
                self.requests.labels(endpoint=endpoint, status=status, tier=NO_TIER)
                self.rejections.labels(endpoint=endpoint, status=status, reason=reason)

    # -- recording (cheap: a dict lookup and an add each) -----------------------------------------------------------

    def request_done(self, endpoint: str, status: int, tier: str, seconds: float, reason: str | None = None) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status), tier=tier).inc()
        self.request_seconds.labels(endpoint=endpoint, tier=tier).observe(seconds)
        if status in REJECTION_STATUSES:
            self.rejections.labels(endpoint=endpoint, status=str(status),
                                   reason=reason or REJECTION_STATUSES[status]).inc()

    def fitting_tiers(self, tiers) -> None:
        for tier in tiers:
            self.demand.labels(tier=tier).inc()

    def queue_waited(self, tier: str, seconds: float) -> None:
        self.queue_wait.labels(tier=tier).observe(seconds)

    def chunk_done(self, tier: str, result, seconds: float) -> None:
        """A chunk came back from `tier` after `seconds`; a degraded result means one out-of-memory on its card."""
        self.generation.labels(tier=tier).observe(seconds)
        self.chunks.labels(tier=tier, outcome="ok").inc()
        self.images.labels(tier=tier).inc(len(result.images))
        if result.seconds_per_step:
            self.step_seconds.labels(tier=tier).observe(result.seconds_per_step)
        if result.degraded:
            self.degraded.labels(tier=tier).inc()
            self.oom.labels(tier=tier).inc()

    def chunk_failed(self, tier: str, reason: str | None) -> None:
        self.chunks.labels(tier=tier, outcome=reason or "error").inc()
        if reason == "out_of_memory":
            self.oom.labels(tier=tier).inc()

    def encoded(self, result, outcome: str) -> None:
        """A request's call to the text-encoder stage ended with `outcome`; `result` (deployments.encoder.Encoded)
        when it answered."""
        self.encodes.labels(outcome=outcome).inc()
        if result is not None:
            self.encode_seconds.labels(outcome=outcome).observe(result.seconds)

    def retried(self, reason: str, from_tier: str, to_tier: str) -> None:
        self.retries.labels(reason=reason, tier=from_tier, to_tier=to_tier).inc()

    def served(self, results) -> None:
        note_request(tier=served_tier(results))

    # -- scraping --------------------------------------------------------------------------------------------------

    def render(self, totals: dict | None = None) -> tuple[bytes, str]:
        """The Prometheus text exposition of everything, and its content type. `totals` (ServiceTotals.update):
        the per-request series summed over every ingress replica, in place of this replica's own."""
        own = generate_latest(self.registry) if totals is None else _exposition(self._families(totals))
        return own + generate_latest(self.scrape), CONTENT_TYPE_LATEST

    def snapshot(self) -> dict:
        """This replica's per-request series (counters, histograms, queue gauges) as plain data for ServiceTotals:
        {"counters": {key: value}, "gauges": {key: value}}, a key being (sample name, sorted label pairs)."""
        out = {"counters": {}, "gauges": {}}
        for family in self.registry.collect():
            into = out["gauges" if family.type == "gauge" else "counters"]
            for sample in family.samples:
                if not sample.name.endswith("_created"):  # when a series began: no sum of that
                    into[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def _families(self, totals: dict):
        """This replica's families, each with the service's summed samples instead of its own."""
        from prometheus_client.metrics_core import Metric

        families, owner = [], {}
        for family in self.registry.collect():
            families.append(Metric(family.name, family.documentation, family.type, family.unit))
            for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
                owner[family.name + suffix] = families[-1]
        for kind in ("counters", "gauges"):
            for (name, labels), value in totals.get(kind, {}).items():
                family = owner.get(name)
                if family is not None:  # a series of another version's code: left out
                    family.add_sample(name, dict(labels), value)
        return families


# The sample names of a family by its type (prometheus_client writes a counter `x` as `x_total`).
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _exposition(families) -> bytes:
    """The text exposition of already-collected families."""

    class _Collected(Collector):
        def collect(self):
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    return generate_latest(registry)


class ServiceTotals:
    """The per-request series of every ingress replica, summed: what GET /metrics serves from any of them, so a
    scrape that lands on any replica (the proxies spread requests) reads the whole service's counts.

    Kept in one place (the fleet registry actor, `FleetRegistry.ingress_metrics`), where each replica sends its
    `ServiceMetrics.snapshot` every registry poll and at each scrape, and gets the sum back. Counters and histograms
    never go down, so Prometheus sees no reset when replicas come and go:
      - a replica's counters are kept at the largest value it sent (two of its calls may arrive out of order);
      - a replica not heard from for `stale_s` (it died, or stopped: scaled down, redeployed) has its last counters
        kept in `departed`, summed in for good; its gauges (queue depth) leave with it. Were it only late and sends
        again, its counters move back from `departed` to it.
    What a replica counted after its last send before it died is not in the sum (at most one poll period's worth).
    The counts restart from the live replicas' if the registry actor itself restarts (Prometheus sees one reset).
    """

    def __init__(self, stale_s: float):
        self.stale_s = stale_s
        self.live: dict[str, tuple[float, dict]] = {}  # replica -> (when heard, snapshot)
        self.folded: dict[str, tuple[float, dict]] = {}  # replica -> (when folded, counters now in `departed`)
        self.departed: dict = {}
        self.served: dict = {}  # the counters last returned: never returned lower
        self.groups: dict[str, str | None] = {}  # replica -> its group (`update`)

    def update(self, replica: str, snapshot: dict, now: float, group: str | None = None) -> dict:
        """`replica`'s snapshot in; the sums out, with the replicas running of its `group` (the ingress replicas of
        one configuration: a redeploy's old replicas share no limits with the new ones)."""
        if replica in self.folded:  # it was only late: its counters are its own again
            _, counters = self.folded.pop(replica)
            _add(self.departed, counters, -1)
        _, previous = self.live.get(replica, (0.0, {}))
        counters = dict(snapshot.get("counters", {}))
        for key, value in previous.get("counters", {}).items():
            if value > counters.get(key, value - 1):
                counters[key] = value
        self.live[replica] = (now, {"counters": counters, "gauges": dict(snapshot.get("gauges", {}))})
        self.groups[replica] = group
        for name, (heard, _) in list(self.live.items()):
            if now - heard > self.stale_s:
                self.gone(name, now)
        for name, (when, _) in list(self.folded.items()):
            if now - when > 100 * self.stale_s:  # it is not coming back
                del self.folded[name]
        return self.totals(group)

    def gone(self, replica: str, now: float) -> None:
        """`replica` stopped (it said goodbye, or went silent): its counters stay in the sums, its gauges leave."""
        heard = self.live.pop(replica, None)
        self.groups.pop(replica, None)
        if heard is not None:
            _add(self.departed, heard[1]["counters"], 1)
            self.folded[replica] = (now, heard[1]["counters"])

    def totals(self, group: str | None = None) -> dict:
        """{"counters": ..., "gauges": ..., "replicas": the ingress replicas of `group` heard from within `stale_s`}.
        Each
        counter at least what it was last served: a sum whose float terms moved between replicas and `departed`
        can come out a hair lower, and a departed replica's late snapshot is older than what was kept of it."""
        out = {"counters": dict(self.departed), "gauges": {},
               "replicas": sum(1 for name in self.live if self.groups.get(name) == group)}
        for _, kept in self.live.values():
            for kind in ("counters", "gauges"):
                _add(out[kind], kept[kind], 1)
        counters = out["counters"]
        for key, value in self.served.items():
            if counters.get(key, value) < value:
                counters[key] = value
        self.served = dict(counters)
        return out

    def replicas(self) -> list[str]:
        return sorted(self.live)


def _add(into: dict, values: dict, sign: int) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + sign * value


class QueueCollector(Collector):
    """This ingress replica's queue depth per tier (the dispatcher's TierQueues, through the FleetCollector's
    `watch_queues`): per replica, so summed over replicas like the per-request series."""

    def __init__(self, fleet: "FleetCollector"):
        self.fleet = fleet

    def collect(self):
        return self.fleet._queues()


class FleetCollector(Collector):
    """Queue depth, replicas and cards, rendered from what the ingress already holds; a scrape calls nothing remote.

    `watch_queues` hands it the dispatcher's TierQueues; `observe_reports` the registry's replica reports (each with
    `card` = GpuSnapshot.to_dict(), or that plus `error` when NVML failed, and `link`, the copy rate the replica
    uses: `card_link`); `observe_card_nodes` Ray's card nodes.
    A card is `zit_card_up` 1 while its replica reports a reading, 0 once its reading fails or its replica stops
    reporting without saying goodbye (cards no replica ever ran on, and cards whose replica Serve stopped on purpose,
    have no zit_card_up); `zit_card_node_up` says whether Ray still sees the card's node (cards of a tier scaled to
    zero stay node-up with no replica, so a dead node means a card is missing, unless the node is a Kubernetes pod
    whose replica was stopped on purpose: KubeRay then removes the idle pod).
    """

    def __init__(self, tiers=()):
        self.tiers = list(tiers)
        self.queues: dict = {}
        self.min_replicas = 0
        self.lost = dict
        self.stage_reports: list[dict] = []
        self.stage_expected = 0  # stage replicas configured (0: no stage, every generator encodes)
        self.reports: list[dict] = []
        self.reported_at: float | None = None
        self.cards: dict[str, dict[str, str]] = {}  # uuid -> card labels, for every card ever seen
        self.reported: set[str] = set()  # cards a replica has reported from (the ones zit_card_up is about)
        self.retired: set[str] = set()  # cards whose replica stopped on purpose and none reports from them now
        self.nodes: dict[str, bool] = {}  # uuid -> node alive
        self.pods: set[str] = set()  # cards whose node is a Kubernetes pod (KubeRay removes idle ones)

    def watch_queues(self, queues: dict, min_replicas: int = 0, lost=dict) -> None:
        """`min_replicas`: what an autoscaled tier (a queue that is `scalable`) keeps at least; `lost`: a callable
        giving the tiers lost now (Dispatcher.lost), by name."""
        self.queues = queues
        self.min_replicas = min_replicas
        self.lost = lost

    def observe_stage(self, reports: list[dict]) -> None:
        """The text-encoder stage's replica reports (deployments/encoder.py describe): its replicas and caches."""
        self.stage_reports = reports

    def observe_reports(self, reports: list[dict], retired: list[str] = ()) -> None:
        """`retired`: cards whose replica stopped on purpose (FleetRegistry.retired_cards): no zit_card_up for them
        until a replica reports from them again, so scaling down raises no alert."""
        live = set()
        for report in reports:
            card = report.get("card")
            if card and card.get("uuid"):
                self.cards[card["uuid"]] = _card_labels(card, report.get("tier"))
                live.add(card["uuid"])
        self.retired = set(retired) - live
        self.reported = (self.reported - self.retired) | live
        self.reports = reports
        self.reported_at = time.monotonic()

    def observe_card_nodes(self, nodes: list[dict]) -> None:
        """Ray's card nodes (deployments.registry.card_nodes): dicts with `alive` and the node's zit/ labels. A card
        whose node died and joined again has both in Ray's table: it is up when any of its nodes is alive."""
        from runtime.nodes import LABEL_CARD, LABEL_HOST, LABEL_MODEL, LABEL_POD, LABEL_TIER

        alive: dict[str, bool] = {}
        for node in nodes:
            labels = node.get("labels") or {}
            uuid = labels.get(LABEL_CARD)
            if not uuid:
                continue
            alive[uuid] = alive.get(uuid, False) or bool(node.get("alive"))
            if labels.get(LABEL_POD) == "true":
                self.pods.add(uuid)
            self.cards.setdefault(uuid, {"card": uuid, "model": labels.get(LABEL_MODEL, ""),
                                         "tier": labels.get(LABEL_TIER, ""), "host": labels.get(LABEL_HOST, "")})
        self.nodes.update(alive)

    def collect(self):
        yield from self._replicas()
        yield from self._cards()
        yield from self._stage()
        yield from self._hosts()

    def _hosts(self):
        from deployments.hostmem import hosts_view

        total = GaugeMetricFamily("zit_host_memory_total_bytes", "Host RAM in total (the cgroup's limit in a "
                                  "container; a simulated host's from its fleet file).", labels=["host"])
        used = GaugeMetricFamily("zit_host_memory_used_bytes", "Host RAM in use, all processes (the kernel's "
                                 "reading; a simulated host's accounting of its replicas).", labels=["host"])
        need = GaugeMetricFamily("zit_host_memory_need_bytes", "Host RAM the host's replicas need by the host-memory "
                                 "model (cluster/host_memory.py; each shared weight set once).", labels=["host"])
        for host in hosts_view(self.reports + self.stage_reports):
            for family, key in ((total, "ram_bytes"), (used, "used_bytes"), (need, "need_bytes")):
                if host[key] is not None:
                    family.add_metric([host["host"]], host[key])
        return total, used, need

    def _stage(self):
        replicas = GaugeMetricFamily("zit_text_encoder_replicas", "Text-encoder stage replicas reporting.")
        configured = GaugeMetricFamily("zit_text_encoder_replicas_target", "Text-encoder stage replicas configured "
                                       "(0: no stage, every generator encodes its own chunks).")
        cache_bytes = GaugeMetricFamily("zit_text_encoder_cache_bytes", "Bytes of prompt embeddings the stage's "
                                        "caches hold, all replicas.")
        entries = GaugeMetricFamily("zit_text_encoder_cache_entries", "Prompts whose embeddings the stage's caches "
                                    "hold, all replicas.")
        replicas.add_metric([], len(self.stage_reports))
        configured.add_metric([], self.stage_expected)
        caches = [r.get("cache") or {} for r in self.stage_reports]
        cache_bytes.add_metric([], sum(c.get("bytes", 0) for c in caches))
        entries.add_metric([], sum(c.get("entries", 0) for c in caches))
        return replicas, configured, cache_bytes, entries

    def _queues(self):
        running = GaugeMetricFamily("zit_queue_running", "Chunks running on the tier.", labels=["tier"])
        waiting = GaugeMetricFamily("zit_queue_waiting", "Chunks waiting in the tier's queue.", labels=["tier"])
        limit = GaugeMetricFamily("zit_queue_limit", "Most chunks that may wait in the tier's queue.", labels=["tier"])
        for name, queue in self.queues.items():
            running.add_metric([name], queue.running)
            waiting.add_metric([name], queue.waiting)
            limit.add_metric([name], queue.limit)
        return running, waiting, limit

    def _replicas(self):
        live = GaugeMetricFamily("zit_replicas", "Generator replicas reporting to the fleet registry.",
                                 labels=["tier", "deployment"])
        busy = GaugeMetricFamily("zit_replicas_busy", "Replicas running a job at their last report.",
                                 labels=["tier", "deployment"])
        target = GaugeMetricFamily("zit_replicas_target", "Replicas configured for the tier (autoscaled: the most "
                                   "it may have).", labels=["tier", "deployment"])
        least = GaugeMetricFamily("zit_replicas_min", "Replicas the tier keeps at least: the configured ones, or an "
                                  "autoscaled tier's min_replicas (0: it may sit at zero while larger tiers serve).",
                                  labels=["tier", "deployment"])
        lost = GaugeMetricFamily("zit_tier_lost", "1 while the tier is lost: its card nodes are dead and no replica of "
                                 "it runs, so its chunks go to other tiers; 0 otherwise.", labels=["tier", "deployment"])
        lost_now = self.lost()
        per_tier = Tally(r.get("tier") for r in self.reports)
        busy_tier = Tally(r.get("tier") for r in self.reports if r.get("busy"))
        for tier in self.tiers:
            labels = [tier.name, f"Generator_{tier.name}"]
            live.add_metric(labels, per_tier.get(tier.name, 0))
            busy.add_metric(labels, busy_tier.get(tier.name, 0))
            target.add_metric(labels, tier.num_replicas)
            queue = self.queues.get(tier.name)
            scalable = queue is not None and queue.scalable
            least.add_metric(labels, min(self.min_replicas, tier.num_replicas) if scalable else tier.num_replicas)
            lost.add_metric(labels, 1.0 if tier.name in lost_now else 0.0)
        families = [live, busy, target, least, lost]
        if self.reported_at is not None:
            age = GaugeMetricFamily("zit_fleet_report_age_seconds", "Seconds since the ingress last read the fleet "
                                    "registry (card and replica metrics are this old).")
            age.add_metric([], time.monotonic() - self.reported_at)
            families.append(age)
        return families

    def _cards(self):
        def family(name, help_text):
            return GaugeMetricFamily(name, help_text, labels=list(CARD_LABELS))

        up = family("zit_card_up", "1 while the card's replica reports an NVML reading; 0 when the reading failed or "
                                   "the replica stopped reporting.")
        node_up = family("zit_card_node_up", "1 while Ray sees the card's node alive; 0 when the node is dead.")
        used = family("zit_card_memory_used_bytes", "Card memory in use, all processes (NVML).")
        total = family("zit_card_memory_total_bytes", "Card memory in total (NVML).")
        util = family("zit_card_utilization_ratio", "GPU utilisation over NVML's last sample period, 0..1.")
        temp = family("zit_card_temperature_celsius", "GPU temperature.")
        power = family("zit_card_power_watts", "Board power draw.")
        generation = GaugeMetricFamily(
            "zit_card_pcie_link_generation", "PCIe link generation of the card (NVML), kind=current or max; idle "
            "cards lower the current one to save power.", labels=[*CARD_LABELS, "kind"])
        width = GaugeMetricFamily(
            "zit_card_pcie_link_width", "PCIe link width in lanes of the card (NVML), kind=current or max; current "
            "below max: the link trained down (a riser or slot fault).", labels=[*CARD_LABELS, "kind"])
        link = GaugeMetricFamily(
            "zit_card_link_bytes_per_second", "Host-to-device copy rate the service uses for the card "
            "(cluster/link.py), by source: measured on the card, its PCIe link's rate, or the default.",
            labels=[*CARD_LABELS, "source"])
        throughput = GaugeMetricFamily(
            "zit_card_pcie_throughput_bytes_per_second", "Bytes per second NVML's PCIe counters saw, direction=tx "
            "(sent by the card) or rx (received by it); absent where the driver has no counters.",
            labels=[*CARD_LABELS, "direction"])
        reading = {}
        on_card: dict[str, list[dict]] = {}  # a split card hosts several replicas
        for report in self.reports:
            card = report.get("card")
            if card and card.get("uuid"):
                reading[card["uuid"]] = card
                on_card.setdefault(card["uuid"], []).append(report)
        for uuid, labels in self.cards.items():
            values = [labels[key] for key in CARD_LABELS]
            if uuid in self.nodes and (self.nodes[uuid] or not (uuid in self.retired and uuid in self.pods)):
                # The dead node of a pod whose replica was scaled away on purpose is no missing card: KubeRay removed
                # the idle worker pod, and Ray keeps dead nodes in its table. On bare metal a dead node is missing.
                node_up.add_metric(values, 1.0 if self.nodes[uuid] else 0.0)
            if uuid not in self.reported:
                continue  # a card no replica was placed on yet: its node says whether it is there
            card = reading.get(uuid)
            ok = card is not None and not card.get("error") and card.get("memory_total") is not None
            up.add_metric(values, 1.0 if ok else 0.0)
            if not ok:
                continue  # no stale numbers for a card that is not reporting
            used.add_metric(values, card["memory_used"])
            total.add_metric(values, card["memory_total"])
            for gauge, key, scale in ((util, "utilization_pct", 0.01), (temp, "temperature_c", 1.0),
                                      (power, "power_w", 1.0)):
                if card.get(key) is not None:  # NVML leaves out what a card does not support
                    gauge.add_metric(values, card[key] * scale)
            for gauge, kind, key in ((generation, "current", "pcie_gen"), (generation, "max", "pcie_max_gen"),
                                     (width, "current", "pcie_width"), (width, "max", "pcie_max_width"),
                                     (throughput, "tx", "pcie_tx_bytes_s"), (throughput, "rx", "pcie_rx_bytes_s")):
                if card.get(key) is not None:
                    gauge.add_metric([*values, kind], card[key])
            rate = card_link(on_card.get(uuid, []))
            if rate and rate.get("bytes_s") is not None:
                link.add_metric([*values, rate.get("source") or "default"], rate["bytes_s"])
        return up, node_up, used, total, util, temp, power, generation, width, link, throughput


def card_link(reports: list[dict]) -> dict | None:
    """The host-to-device copy rate (cluster/link.py Link.as_dict) the service uses for one card, from the reports of
    the replicas on it: a replica's own link (measured on a real card when it started), a measured one where any
    replica measured it (a split card hosts several), else the card reading's (its PCIe link's rate or the
    default); None when no report says."""
    own = [r["link"] for r in reports if r.get("link")]
    read = [r["card"]["link"] for r in reports if (r.get("card") or {}).get("link")]
    measured = [link for link in own if link.get("source") == "measured"]
    return next(iter(measured or own or read), None)


# A card reading's PCIe fields (cluster/nvml.py GpuSnapshot; None where NVML does not say).
PCIE_FIELDS = ("pcie_gen", "pcie_width", "pcie_max_gen", "pcie_max_width", "pcie_tx_bytes_s", "pcie_rx_bytes_s")


def card_link_view(reports: list[dict], reading: dict) -> dict:
    """What GET /v1/fleet shows of a card's link: `link`, the copy rate the service uses for it (`card_link`:
    measured where a replica measured it), `link_degraded` (why the link runs below its maximum, or None:
    cluster/link.py degraded) and NVML's PCIe fields, from `reading` (the card's freshest reading) and the `reports`
    of the replicas on it."""
    return {"link": card_link(reports) or reading.get("link"), "link_degraded": reading.get("link_degraded"),
            **{key: reading.get(key) for key in PCIE_FIELDS}}


def _card_labels(card: dict, tier: str | None) -> dict[str, str]:
    return {"card": card["uuid"], "model": card.get("name") or "", "tier": tier or card.get("tier") or "",
            "host": card.get("host") or ""}


# -- the HTTP side ---------------------------------------------------------------------------------------------------

# Serve freezes a copy of the FastAPI app when the Ingress class is decorated, so a middleware cannot reach the
# Ingress instance through app.state. Each ingress replica process holds exactly one Ingress, which installs its
# metrics here when it starts.
_installed: ServiceMetrics | None = None


def install(metrics: ServiceMetrics | None) -> None:
    """Make `metrics` the ones `RecordRequests` records into (the Ingress of this process calls this once)."""
    global _installed
    _installed = metrics


def _endpoint(scope) -> str:
    """The route template that handled (or would handle) the request: '/v1/images/{name}', never the raw path."""
    from starlette.routing import Match

    route = scope.get("route")
    if route is None:  # answered before routing (413 from the body limit): find the route it was meant for
        for candidate in getattr(scope.get("app"), "routes", ()):
            if candidate.matches(scope)[0] == Match.FULL:
                route = candidate
                break
    return getattr(route, "path", None) or UNMATCHED


class RecordRequests:
    """Outermost HTTP middleware: count every request but the scrape itself, with its route, status, tier and
    latency (until the last byte of its answer left, a stream's included). Pure ASGI: no task and stream per request,
    as an `@app.middleware` function costs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        metrics = _installed
        if scope["type"] != "http" or metrics is None or scope["path"] == METRICS_PATH:
            return await self.app(scope, receive, send)
        note: dict = {}
        token = _request_note.set(note)  # the handler runs in this task: what it notes lands in `note`
        started = time.perf_counter()
        status = 500

        async def watching_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            _request_note.reset(token)
            try:
                metrics.request_done(_endpoint(scope), status, note.get("tier", NO_TIER),
                                     time.perf_counter() - started, note.get("reason"))
            except Exception:  # counting must never turn an answered request into a 500
                logger.exception("recording request metrics failed")
