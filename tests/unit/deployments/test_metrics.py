"""deployments/metrics.py: names, labels, what each recording call adds, the fleet collector's output from registry
reports (no NVML, no Ray), the request middleware on a plain FastAPI app, and the dispatcher's recording calls."""

import asyncio
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from cluster.link import PCIE_BYTES_S, Link, link_of, pcie_bytes_s
from cluster.memory import load_calibration
from cluster.nvml import load_fleet
from cluster.profiles import tier_profile
from cluster.requests import GenerationResult
from cluster.tiers import GIB, card_tier
from deployments import metrics as metrics_module
from deployments.dispatch import Dispatcher
from deployments.errors import ChunkOutOfMemory
from deployments.metrics import (
    CARD_LABELS,
    NO_TIER,
    UNMATCHED,
    RecordRequests,
    ServiceMetrics,
    card_link,
    card_link_view,
    note_request,
    served_tier,
)
from deployments.scheduler import TierQueue
from deployments.schemas import ImageGenerationRequest

MIB = 1 << 20
# The only label names a zit_ series may carry (plus Prometheus' own `le` on histogram buckets).
ALLOWED_LABELS = {"endpoint", "status", "tier", "card", "model", "host", "deployment", "reason", "outcome", "to_tier",
                  "kind", "source", "direction", "le"}
FLEET = "cluster/fleets/mixed.yaml"
# Every series family a service with traffic and reporting cards exposes (zit_card_node_up also needs Ray's nodes).
EXPOSED_SERIES = {
    "zit_requests_total", "zit_request_duration_seconds_bucket", "zit_rejections_total",
    "zit_queue_wait_seconds_bucket", "zit_generation_seconds_bucket", "zit_seconds_per_step_bucket",
    "zit_images_total", "zit_chunks_total", "zit_out_of_memory_total", "zit_degraded_total", "zit_retries_total",
    "zit_tier_demand_total", "zit_queue_running", "zit_queue_waiting", "zit_queue_limit", "zit_replicas",
    "zit_replicas_busy", "zit_replicas_target", "zit_replicas_min", "zit_fleet_report_age_seconds", "zit_card_up",
    "zit_card_memory_used_bytes", "zit_card_memory_total_bytes", "zit_card_utilization_ratio",
    "zit_card_temperature_celsius", "zit_card_power_watts", "zit_card_pcie_link_generation", "zit_card_pcie_link_width",
    "zit_card_link_bytes_per_second",
}


def tiers():
    return [
        card_tier("vram_4", 1, bf16=False, vram_bytes=3911 * MIB, speed=0.08),
        card_tier("vram_12", 2, bf16=True, vram_bytes=12 * GIB, speed=0.35),
        card_tier("vram_24", 1, bf16=True, vram_bytes=24564 * MIB, speed=1.0),
    ]


def samples(metrics: ServiceMetrics) -> dict[str, list]:
    """Rendered exposition, parsed back: sample name -> [(labels, value)]."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(metrics: ServiceMetrics, name: str, **labels) -> float | None:
    for got, v in samples(metrics).get(name, []):
        if all(got.get(k) == str(want) for k, want in labels.items()):
            return v
    return None


def result(tier="vram_12", images=2, degraded=False, seconds_per_step=0.05) -> GenerationResult:
    return GenerationResult(images=[b"png"] * images, seeds=list(range(images)), tier=tier, replica="r1", device="cpu",
                            seconds=0.5, seconds_per_step=seconds_per_step, degraded=degraded)


def report(card, tier=None, busy=False, link=None, **card_overrides) -> dict:
    """A replica's report as a Generator on a simulated card sends it (deployments/generator.py describe); `link`:
    the one it uses (a real card's is measured), else its card's."""
    memory = {"host": card.host or "h", "simulated": True, "ram_bytes": 32 * GIB, "used_bytes": 4 * GIB,
              "private_bytes": 2 * GIB, "shared": {"transformer-leaves-bfloat16": 11 * GIB}}
    return {"replica": f"rep-{card.uuid[-6:]}", "tier": tier or card.tier, "busy": busy,
            "card": {**card.to_dict(), **card_overrides}, "host_memory": memory,
            "link": (link or link_of(card)).as_dict()}


# -- names and labels --------------------------------------------------------------------------------------------


def test_every_series_has_the_zit_prefix_and_only_low_cardinality_labels():
    m = ServiceMetrics(tiers())
    m.request_done("/v1/images/generations", 200, "vram_12", 1.2)
    m.request_done("/v1/images/generations", 422, NO_TIER, 0.01)
    m.chunk_done("vram_12", result(degraded=True), 0.4)
    m.chunk_failed("vram_4", "out_of_memory")
    m.retried("out_of_memory", "vram_4", "vram_12")
    m.queue_waited("vram_12", 0.02)
    m.fitting_tiers(["vram_12", "vram_24"])
    m.fleet.watch_queues({t.name: TierQueue(t.name, t.num_replicas, 32) for t in tiers()})
    m.fleet.observe_reports([report(card) for card in load_fleet(FLEET)])
    names = samples(m)
    assert names and all(name.startswith("zit_") for name in names)
    for name, rows in names.items():
        for labels, _ in rows:
            assert set(labels) <= ALLOWED_LABELS, (name, labels)
    assert EXPOSED_SERIES <= set(names), EXPOSED_SERIES - set(names)


def test_no_prompt_or_request_id_reaches_a_label():
    m = ServiceMetrics(tiers())
    app = _app(m)
    TestClient(app).post("/generate", json={"prompt": "a secret prompt", "request_id": "req-123"})
    body = m.render()[0].decode()
    assert "secret" not in body and "req-123" not in body


def test_per_tier_counters_start_at_zero_for_every_configured_tier():
    m = ServiceMetrics(tiers())
    for name in ("zit_images_total", "zit_out_of_memory_total", "zit_degraded_total", "zit_tier_demand_total"):
        assert {labels["tier"]: v for labels, v in samples(m)[name]} == {"vram_4": 0, "vram_12": 0, "vram_24": 0}
    assert value(m, "zit_chunks_total", tier="vram_24", outcome="ok") == 0


# -- recording ---------------------------------------------------------------------------------------------------


def test_a_finished_chunk_counts_images_time_steps_and_a_degradation_as_one_out_of_memory():
    m = ServiceMetrics(tiers())
    m.chunk_done("vram_12", result(images=3, degraded=True, seconds_per_step=0.04), 0.7)
    assert value(m, "zit_images_total", tier="vram_12") == 3
    assert value(m, "zit_generation_seconds_count", tier="vram_12") == 1
    assert value(m, "zit_generation_seconds_sum", tier="vram_12") == pytest.approx(0.7)
    assert value(m, "zit_seconds_per_step_bucket", tier="vram_12", le="0.05") == 1
    assert value(m, "zit_degraded_total", tier="vram_12") == 1
    assert value(m, "zit_out_of_memory_total", tier="vram_12") == 1
    assert value(m, "zit_chunks_total", tier="vram_12", outcome="ok") == 1


def test_failed_chunks_count_by_outcome_and_out_of_memory_also_as_an_oom_event():
    m = ServiceMetrics(tiers())
    m.chunk_failed("vram_4", "out_of_memory")
    m.chunk_failed("vram_4", "bad_image")
    m.chunk_failed("vram_4", None)
    assert value(m, "zit_chunks_total", tier="vram_4", outcome="out_of_memory") == 1
    assert value(m, "zit_chunks_total", tier="vram_4", outcome="bad_image") == 1
    assert value(m, "zit_chunks_total", tier="vram_4", outcome="error") == 1
    assert value(m, "zit_out_of_memory_total", tier="vram_4") == 1


def test_rejections_carry_the_noted_reason_or_the_status_default():
    m = ServiceMetrics(tiers())
    m.request_done("/v1/images/generations", 422, NO_TIER, 0.01, reason="no_tier_fits")
    m.request_done("/v1/images/generations", 422, NO_TIER, 0.01)
    m.request_done("/v1/images/generations", 503, NO_TIER, 0.01, reason="tiers_full")
    m.request_done("/v1/images/generations", 200, "vram_4", 0.5)
    m.request_done("/v1/images/generations", 504, NO_TIER, 300)
    rejections = {(labels["status"], labels["reason"]): v for labels, v in samples(m)["zit_rejections_total"] if v}
    assert rejections == {("422", "no_tier_fits"): 1, ("422", "invalid_request"): 1, ("503", "tiers_full"): 1}


def test_a_request_counts_under_the_tier_that_made_most_of_its_images():
    assert served_tier([result("vram_4", 1), result("vram_12", 3)]) == "vram_12"
    assert served_tier([result("vram_4", 2), result("vram_12", 2)]) == "vram_12"  # a tie: the later (larger) tier
    assert served_tier([]) == NO_TIER


# -- the fleet collector: reports in, gauges out, nothing called ---------------------------------------------------


def test_cards_from_reports_become_labelled_gauges_in_bytes_ratio_celsius_and_watts():
    cards = load_fleet(FLEET)
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(card, busy=card.tier == "vram_24") for card in cards])
    rows = samples(m)
    assert len(rows["zit_card_up"]) == len(cards) and all(v == 1 for _, v in rows["zit_card_up"])
    by_card = {labels["card"]: labels for labels, _ in rows["zit_card_memory_total_bytes"]}
    for card in cards:
        labels = by_card[card.uuid]
        assert set(labels) == set(CARD_LABELS)
        assert (labels["model"], labels["tier"], labels["host"]) == (card.name, card.tier, card.host)
        assert value(m, "zit_card_memory_total_bytes", card=card.uuid) == card.memory_total
        assert value(m, "zit_card_memory_used_bytes", card=card.uuid) == card.memory_used
    one = cards[0]
    reading = report(one, utilization_pct=75.0, temperature_c=66.0, power_w=120.5)
    m.fleet.observe_reports([reading])
    assert value(m, "zit_card_utilization_ratio", card=one.uuid) == pytest.approx(0.75)
    assert value(m, "zit_card_temperature_celsius", card=one.uuid) == 66.0
    assert value(m, "zit_card_power_watts", card=one.uuid) == 120.5


def test_a_card_whose_reading_failed_or_whose_replica_went_quiet_is_down_without_stale_numbers():
    a, b, c = load_fleet(FLEET)[:3]
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(a), report(b), report(c)])
    m.fleet.observe_reports([report(a), report(b, error="NVMLError_GpuIsLost: GPU is lost")])
    assert value(m, "zit_card_up", card=a.uuid) == 1
    assert value(m, "zit_card_up", card=b.uuid) == 0 and value(m, "zit_card_up", card=c.uuid) == 0
    for name in ("zit_card_memory_used_bytes", "zit_card_pcie_link_width", "zit_card_pcie_link_generation",
                 "zit_card_link_bytes_per_second"):
        assert value(m, name, card=b.uuid) is None and value(m, name, card=c.uuid) is None, name
    assert value(m, "zit_card_pcie_link_width", card=a.uuid, kind="current") is not None


def test_a_card_whose_replica_was_stopped_on_purpose_is_not_down_until_a_replica_reports_from_it_again():
    from runtime.nodes import LABEL_CARD, LABEL_HOST, LABEL_MODEL, LABEL_POD, LABEL_TIER

    a, b, c = load_fleet(FLEET)[:3]
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(a), report(b), report(c)])
    # b's and c's replicas were scaled away (they said goodbye to the registry), and their nodes died: b's is a
    # Kubernetes pod KubeRay removed, c's a bare-metal host that went down.
    m.fleet.observe_reports([report(a)], retired=[b.uuid, c.uuid])
    m.fleet.observe_card_nodes([{"alive": alive, "labels": {LABEL_CARD: card.uuid, LABEL_TIER: card.tier,
                                                            LABEL_MODEL: card.name, LABEL_HOST: "h", **extra}}
                                for card, alive, extra in ((a, True, {}), (b, False, {LABEL_POD: "true"}),
                                                           (c, False, {}))])
    assert value(m, "zit_card_up", card=a.uuid) == 1
    assert value(m, "zit_card_up", card=b.uuid) is None and value(m, "zit_card_up", card=c.uuid) is None
    assert value(m, "zit_card_node_up", card=b.uuid) is None  # a pod removed on purpose is no missing card
    assert value(m, "zit_card_node_up", card=c.uuid) == 0  # a host that died is
    # The registry forgets the goodbye; the collector does not: b stays quiet until a replica runs there again.
    m.fleet.observe_reports([report(a)])
    assert value(m, "zit_card_up", card=b.uuid) is None
    m.fleet.observe_reports([report(a), report(b)])
    m.fleet.observe_reports([report(a)])  # ... and then goes quiet without a goodbye: down again
    assert value(m, "zit_card_up", card=b.uuid) == 0


def test_the_registry_remembers_which_cards_were_left_on_purpose_and_drops_late_reports():
    from deployments.registry import FleetRegistry

    a, b = load_fleet(FLEET)[:2]
    registry = FleetRegistry()
    registry.report(report(a))
    registry.report(report(b))
    registry.forget(report(b)["replica"])
    registry.report(report(b))  # a report sent before the goodbye, arriving after it
    assert [r["card"]["uuid"] for r in registry.replicas()] == [a.uuid]
    assert registry.retired_cards() == [b.uuid]
    registry.report({**report(b), "replica": "a-new-replica"})  # Serve placed a replica on b again
    assert registry.retired_cards() == []
    assert {r["replica"] for r in registry.replicas()} == {report(a)["replica"], "a-new-replica"}
    # A card NVML lost stays failed, whoever stops its replica.
    registry.report(report(a, error="NVMLError_GpuIsLost: GPU is lost"))
    registry.forget(report(a)["replica"])
    assert registry.retired_cards() == []


def test_a_card_without_power_or_temperature_support_leaves_those_series_out():
    card = load_fleet(FLEET)[0]
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(card, power_w=None, temperature_c=None)])
    assert value(m, "zit_card_power_watts", card=card.uuid) is None
    assert value(m, "zit_card_temperature_celsius", card=card.uuid) is None
    assert value(m, "zit_card_memory_used_bytes", card=card.uuid) == card.memory_used


def test_a_cards_pcie_link_becomes_current_and_max_generation_and_width_and_the_copy_rate_its_replica_uses():
    one, other = load_fleet(FLEET)[:2]
    # A card on an x1 riser that trained down from x16 and reads gen 1 (of 3); NVML's counters saw its traffic.
    riser = replace(one, pcie_gen=1, pcie_width=1, pcie_max_gen=3, pcie_max_width=16, pcie_tx_bytes_s=2e6,
                    pcie_rx_bytes_s=7e8)
    measured = Link(11.5e9, "measured")  # a real card's replica timed its link when it started
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(riser), report(other, link=measured)])
    assert value(m, "zit_card_pcie_link_generation", card=one.uuid, kind="current") == 1
    assert value(m, "zit_card_pcie_link_generation", card=one.uuid, kind="max") == 3
    assert value(m, "zit_card_pcie_link_width", card=one.uuid, kind="current") == 1
    assert value(m, "zit_card_pcie_link_width", card=one.uuid, kind="max") == 16
    labels = next(l for l, _ in samples(m)["zit_card_pcie_link_width"] if l["card"] == one.uuid)
    assert set(labels) == {*CARD_LABELS, "kind"} and labels["tier"] == one.tier and labels["host"] == one.host
    # The riser streams at its maximum generation x its current width; the other card at what its replica measured.
    assert value(m, "zit_card_link_bytes_per_second", card=one.uuid, source="pcie") == pytest.approx(
        pcie_bytes_s(3, 1))
    assert value(m, "zit_card_link_bytes_per_second", card=other.uuid, source="measured") == 11.5e9
    assert [l["source"] for l, _ in samples(m)["zit_card_link_bytes_per_second"] if l["card"] == other.uuid] == [
        "measured"]
    assert value(m, "zit_card_pcie_throughput_bytes_per_second", card=one.uuid, direction="tx") == 2e6
    assert value(m, "zit_card_pcie_throughput_bytes_per_second", card=one.uuid, direction="rx") == 7e8
    assert value(m, "zit_card_pcie_throughput_bytes_per_second", card=other.uuid) is None  # a simulated card's driver


def test_a_card_whose_nvml_reports_no_link_has_no_pcie_series_and_streams_at_the_default_rate():
    card = replace(load_fleet(FLEET)[0], pcie_gen=None, pcie_width=None, pcie_max_gen=None, pcie_max_width=None)
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(card)])
    assert value(m, "zit_card_pcie_link_generation", card=card.uuid) is None
    assert value(m, "zit_card_pcie_link_width", card=card.uuid) is None
    assert value(m, "zit_card_link_bytes_per_second", card=card.uuid, source="default") == PCIE_BYTES_S
    # A report without its replica's link (an older replica) falls back to the card reading's.
    m.fleet.observe_reports([{**report(card), "link": None}])
    assert value(m, "zit_card_link_bytes_per_second", card=card.uuid, source="default") == PCIE_BYTES_S


def test_a_split_cards_copy_rate_is_the_measured_one_and_the_fleet_view_carries_link_and_pcie_fields():
    card = replace(load_fleet(FLEET)[0], pcie_gen=3, pcie_width=4, pcie_max_gen=3, pcie_max_width=16)
    measured = Link(3.1e9, "measured")
    first, second = report(card), {**report(card, link=measured), "replica": "rep-second"}
    assert card_link([first, second]) == card_link([second, first]) == measured.as_dict()
    assert card_link([first]) == link_of(card).as_dict() and card_link([]) is None
    view = card_link_view([first, second], first["card"])
    assert view["link"] == measured.as_dict()
    assert view["link_degraded"] == "link width x4 of x16"
    assert (view["pcie_gen"], view["pcie_width"], view["pcie_max_gen"], view["pcie_max_width"]) == (3, 4, 3, 16)
    assert view["pcie_tx_bytes_s"] is None and view["pcie_rx_bytes_s"] is None
    assert card_link_view([], {}) == {"link": None, "link_degraded": None, "pcie_gen": None, "pcie_width": None,
                                      "pcie_max_gen": None, "pcie_max_width": None, "pcie_tx_bytes_s": None,
                                      "pcie_rx_bytes_s": None}  # a card node no replica runs on yet
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([first, second])
    assert value(m, "zit_card_link_bytes_per_second", card=card.uuid, source="measured") == 3.1e9
    assert len([l for l, _ in samples(m)["zit_card_link_bytes_per_second"] if l["card"] == card.uuid]) == 1


def test_card_nodes_from_ray_say_which_cards_are_missing_even_without_a_replica():
    from runtime.nodes import LABEL_CARD, LABEL_HOST, LABEL_MODEL, LABEL_TIER

    m = ServiceMetrics(tiers())
    m.fleet.observe_card_nodes([
        {"alive": True, "labels": {LABEL_CARD: "GPU-a", LABEL_TIER: "vram_4", LABEL_MODEL: "gtx-1650",
                                   LABEL_HOST: "host-a"}},
        {"alive": False, "labels": {LABEL_CARD: "GPU-b", LABEL_TIER: "vram_12", LABEL_MODEL: "rtx-3060",
                                    LABEL_HOST: "host-b"}},
        {"alive": True, "labels": {}},  # the head node: not a card
    ])
    assert value(m, "zit_card_node_up", card="GPU-a", tier="vram_4", host="host-a") == 1
    assert value(m, "zit_card_node_up", card="GPU-b") == 0
    assert len(samples(m)["zit_card_node_up"]) == 2
    assert "zit_card_up" not in samples(m)  # no replica ever reported from these cards


def test_replicas_per_tier_include_tiers_with_none_and_their_targets():
    cards = load_fleet(FLEET)
    twelve = next(card for card in cards if card.tier == "vram_12")
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(twelve, busy=True)])
    assert value(m, "zit_replicas", tier="vram_12", deployment="Generator_vram_12") == 1
    assert value(m, "zit_replicas_busy", tier="vram_12") == 1
    assert value(m, "zit_replicas", tier="vram_24") == 0
    assert value(m, "zit_replicas_target", tier="vram_12") == 2
    assert value(m, "zit_fleet_report_age_seconds") < 5


def test_the_least_replicas_of_a_tier_are_its_configured_ones_or_an_autoscaled_tiers_minimum():
    m = ServiceMetrics(tiers())
    assert value(m, "zit_replicas_min", tier="vram_12") == 2  # no queues watched yet: the configured replicas
    queues = {t.name: TierQueue(t.name, t.num_replicas, 32, scalable=t.name != "vram_4") for t in tiers()}
    m.fleet.watch_queues(queues, min_replicas=1)
    assert value(m, "zit_replicas_min", tier="vram_4") == 1  # fixed: its configured replica
    assert value(m, "zit_replicas_min", tier="vram_12") == 1  # autoscaled: min_replicas
    m.fleet.watch_queues(queues, min_replicas=0)
    assert value(m, "zit_replicas_min", tier="vram_24") == 0
    assert value(m, "zit_replicas_target", tier="vram_12") == 2


def test_queue_depth_is_read_from_the_tier_queues_at_scrape_time():
    queue = TierQueue("vram_12", replicas=1, limit=8)

    async def scenario():
        await queue.acquire("interactive", 1.0)
        waiter = asyncio.ensure_future(queue.acquire("batch", 1.0))
        await asyncio.sleep(0)
        m = ServiceMetrics(tiers())
        m.fleet.watch_queues({"vram_12": queue})
        got = (value(m, "zit_queue_running", tier="vram_12"), value(m, "zit_queue_waiting", tier="vram_12"),
               value(m, "zit_queue_limit", tier="vram_12"))
        waiter.cancel()
        return got

    assert asyncio.run(scenario()) == (1, 1, 8)


# -- the middleware ----------------------------------------------------------------------------------------------


class _Body(BaseModel):
    prompt: str
    request_id: str | None = None


def _app(m: ServiceMetrics) -> FastAPI:
    app = FastAPI()

    @app.post("/generate")
    async def generate(body: _Body):
        async def dispatch():  # a task the handler starts writes into the same request note
            note_request(tier="vram_12")

        await asyncio.ensure_future(dispatch())
        return {"ok": True}

    @app.get("/v1/images/{name}")
    async def image(name: str):
        return {"name": name}

    @app.get("/full")
    async def full():
        from fastapi.responses import JSONResponse

        note_request(reason="tiers_full")
        return JSONResponse({"error": "busy"}, status_code=503)

    @app.get("/metrics")
    async def scrape(request: Request):
        return {"ok": True}

    app.add_middleware(RecordRequests)
    metrics_module.install(m)
    return app


@pytest.fixture(autouse=True)
def _uninstall():
    yield
    metrics_module.install(None)


def test_middleware_labels_requests_by_route_template_status_and_noted_tier():
    m = ServiceMetrics(tiers())
    client = TestClient(_app(m))
    assert client.post("/generate", json={"prompt": "x"}).status_code == 200
    assert client.post("/generate", json={"wrong": 1}).status_code == 422
    client.get("/v1/images/abc.png")
    client.get("/v1/images/def.png")
    client.get("/no/such/path")
    client.get("/full")
    client.get("/metrics")  # the scrape itself is not counted
    rows = {(l["endpoint"], l["status"], l["tier"]): v for l, v in samples(m)["zit_requests_total"] if v}
    assert rows == {
        ("/generate", "200", "vram_12"): 1,
        ("/generate", "422", NO_TIER): 1,
        ("/v1/images/{name}", "200", NO_TIER): 2,
        (UNMATCHED, "404", NO_TIER): 1,
        ("/full", "503", NO_TIER): 1,
    }
    assert value(m, "zit_rejections_total", endpoint="/generate", status="422", reason="invalid_request") == 1
    assert value(m, "zit_rejections_total", endpoint="/full", status="503", reason="tiers_full") == 1
    assert value(m, "zit_request_duration_seconds_count", endpoint="/generate", tier="vram_12") == 1


def test_middleware_without_installed_metrics_passes_requests_through():
    m = ServiceMetrics(tiers())
    app = _app(m)
    metrics_module.install(None)
    assert TestClient(app).post("/generate", json={"prompt": "x"}).status_code == 200
    assert not any(v for _, v in samples(m)["zit_requests_total"])


# -- the dispatcher's recording calls --------------------------------------------------------------------------------


class FakeGenerator:
    """A tier's deployment handle: `generate.remote(job)` answers with images, or out of memory."""

    def __init__(self, tier: str, oom: bool = False):
        self.tier, self.oom = tier, oom
        self.generate = SimpleNamespace(remote=self._generate)

    async def _generate(self, job):
        if self.oom:
            raise ChunkOutOfMemory(f"{self.tier}: CUDA out of memory (simulated)")
        return result(self.tier, images=len(job.seeds))


def test_dispatcher_records_demand_queue_wait_images_and_an_out_of_memory_retry():
    small, large = (card_tier("vram_12", 1, bf16=True, vram_bytes=12 * GIB, speed=0.35),
                    card_tier("vram_24", 1, bf16=True, vram_bytes=24564 * MIB, speed=1.0))
    m = ServiceMetrics([small, large])
    generators = {"vram_12": FakeGenerator("vram_12", oom=True), "vram_24": FakeGenerator("vram_24")}
    d = Dispatcher([small, large], {t.name: tier_profile(t) for t in (small, large)}, generators, load_calibration(),
                   metrics=m)
    d.speed.record("vram_12", 0.001, 1.0)  # make the 12 GB tier look fast, so the chunk goes there first
    body = ImageGenerationRequest(prompt="a red fox", size="512x512", n=1, steps=2, seed=7)
    outcome = asyncio.run(d.run(body, 512, 512, 7))
    assert [r.tier for r in outcome.results] == ["vram_24"]
    assert value(m, "zit_tier_demand_total", tier="vram_12") == 1
    assert value(m, "zit_tier_demand_total", tier="vram_24") == 1
    assert value(m, "zit_retries_total", reason="out_of_memory", tier="vram_12", to_tier="vram_24") == 1
    assert value(m, "zit_out_of_memory_total", tier="vram_12") == 1
    assert value(m, "zit_chunks_total", tier="vram_12", outcome="out_of_memory") == 1
    assert value(m, "zit_images_total", tier="vram_24") == 1
    assert value(m, "zit_queue_wait_seconds_count", tier="vram_12") == 1
    assert value(m, "zit_queue_wait_seconds_count", tier="vram_24") == 1
    assert value(m, "zit_queue_running", tier="vram_24") == 0


def test_a_dispatcher_without_metrics_keeps_its_own():
    d = Dispatcher(tiers(), {t.name: tier_profile(t) for t in tiers()}, {}, load_calibration())
    assert isinstance(d.metrics, ServiceMetrics)
    assert re.search(rb"zit_queue_limit\{tier=\"vram_4\"\} 32", d.metrics.render()[0])


def test_a_failure_while_counting_never_fails_the_request():
    m = ServiceMetrics(tiers())
    app = _app(m)

    def broken(*args, **kwargs):
        raise RuntimeError("label trouble")

    m.request_done = broken
    assert TestClient(app).post("/generate", json={"prompt": "x"}).status_code == 200


# -- what dashboards and alerts read exists from start-up --------------------------------------------------------


def queried_metrics() -> set[str]:
    """Every zit_ series name a Grafana dashboard or an alert rule of the chart queries."""
    import json
    from pathlib import Path

    import yaml

    chart = Path(__file__).resolve().parents[3] / "k8s" / "zit-cluster"
    exprs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for dashboard in (chart / "dashboards").glob("*.json"):
        walk(json.loads(dashboard.read_text()))
    for group in yaml.safe_load((chart / "rules" / "zit-alerts.yaml").read_text())["groups"]:
        exprs += [rule["expr"] for rule in group["rules"]]
    names = {name for expr in exprs for name in re.findall(r"\bzit_[a-z_]+[a-z]", expr)}
    histograms = {name for name in names if not name.endswith(("_bucket", "_count", "_sum", "_total"))
                  and f"{name}_bucket" in EXPOSED_SERIES}
    return (names - histograms) | {f"{name}_bucket" for name in histograms}


def test_every_series_a_dashboard_or_alert_reads_exists_before_the_first_request():
    """Start-up: the replicas have reported and Ray's card nodes are known, nothing else has happened. Each queried
    series is there (at 0 for counters), so panels show 0, not "No data"."""
    from runtime.nodes import LABEL_CARD, LABEL_HOST, LABEL_MODEL, LABEL_TIER

    cards = load_fleet(FLEET)
    m = ServiceMetrics(tiers())
    m.fleet.watch_queues({t.name: TierQueue(t.name, t.num_replicas, 32) for t in tiers()})
    m.fleet.observe_reports([report(card) for card in cards])
    m.fleet.observe_card_nodes([{"alive": True, "labels": {LABEL_CARD: c.uuid, LABEL_TIER: c.tier, LABEL_HOST: "h",
                                                          LABEL_MODEL: "m"}} for c in cards])
    queried = queried_metrics()
    assert {"zit_rejections_total", "zit_retries_total"} <= queried  # the two the dashboards missed at start-up
    present = samples(m)
    assert queried <= set(present), sorted(queried - set(present))
    for name in ("zit_rejections_total", "zit_retries_total", "zit_chunks_total", "zit_requests_total"):
        assert all(value == 0 for _, value in present[name])
    retries = {(l["reason"], l["tier"], l["to_tier"]) for l, _ in present["zit_retries_total"]}
    assert ("node_lost", "vram_4", "vram_24") in retries and ("out_of_memory", "vram_12", "vram_24") in retries
    rejections = {(l["status"], l["reason"]) for l, _ in present["zit_rejections_total"]}
    assert {("503", "tiers_full"), ("422", "no_tier_fits"), ("429", "rate_limited")} <= rejections



def test_host_memory_counts_each_hosts_shared_weights_once():
    """Two replicas on host-a mapping the same stored transformer, one on host-b: host-a needs its two replicas' own
    bytes and the transformer once; the totals and readings are each host's."""
    cards = [c for c in load_fleet(FLEET) if c.host in ("host-a", "host-b")][:3]
    m = ServiceMetrics(tiers())
    m.fleet.observe_reports([report(card) for card in cards])
    from collections import Counter

    per_host = Counter(card.host for card in cards)
    for host, count in per_host.items():
        assert value(m, "zit_host_memory_need_bytes", host=host) == count * 2 * GIB + 11 * GIB
        assert value(m, "zit_host_memory_total_bytes", host=host) == 32 * GIB
        assert value(m, "zit_host_memory_used_bytes", host=host) == 4 * GIB


# -- more than one ingress replica: the service's sums ---------------------------------------------------------------


def _replica(requests: int, waiting: int = 0) -> ServiceMetrics:
    """An ingress replica's metrics after `requests` answered images on vram_12 and with `waiting` chunks queued."""
    m = ServiceMetrics(tiers())
    for _ in range(requests):
        m.request_done("/v1/images/generations", 200, "vram_12", 1.2)
    m.fleet.watch_queues({"vram_12": SimpleNamespace(running=0, waiting=waiting, limit=32, scalable=False)})
    return m


def _rendered(metrics: ServiceMetrics, totals: dict, name: str, **labels) -> list[float]:
    body = metrics.render(totals)[0].decode()
    return [sample.value for family in text_string_to_metric_families(body) for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]


def test_every_ingress_replica_serves_the_sum_of_all_replicas_counts_and_queues():
    from deployments.metrics import ServiceTotals

    a, b = _replica(requests=2, waiting=3), _replica(requests=5, waiting=1)
    store = ServiceTotals(stale_s=6)
    store.update("a", a.snapshot(), now=0.0)
    totals = store.update("b", b.snapshot(), now=0.5)
    for replica in (a, b):  # a scrape reads the same through either replica
        assert _rendered(replica, totals, "zit_requests_total", endpoint="/v1/images/generations", status="200",
                         tier="vram_12") == [7.0]
        assert _rendered(replica, totals, "zit_request_duration_seconds_count", endpoint="/v1/images/generations",
                         tier="vram_12") == [7.0]
        assert _rendered(replica, totals, "zit_queue_waiting", tier="vram_12") == [4.0]
    # Without the sums each replica renders only its own.
    assert value(a, "zit_requests_total", endpoint="/v1/images/generations", status="200", tier="vram_12") == 2


def test_the_sums_never_go_down_when_a_replica_leaves_or_its_calls_arrive_out_of_order():
    from deployments.metrics import ServiceTotals

    key = ("zit_requests_total", (("endpoint", "/v1/images/generations"), ("status", "200"), ("tier", "vram_12")))
    queue = ("zit_queue_waiting", (("tier", "vram_12"),))
    store = ServiceTotals(stale_s=6)
    store.update("a", _replica(requests=4, waiting=2).snapshot(), now=0.0)
    store.update("b", _replica(requests=1).snapshot(), now=0.0)
    # An older snapshot of b arrives after a newer one: its counter stays at the larger value.
    totals = store.update("b", _replica(requests=0).snapshot(), now=1.0)
    assert totals["counters"][key] == 5
    # a goes silent (it died, or was scaled down): its counts stay in the sum, its queue leaves with it.
    totals = store.update("b", _replica(requests=3).snapshot(), now=10.0)
    assert totals["counters"][key] == 7 and totals["gauges"][queue] == 0
    assert store.replicas() == ["b"]
    # a was only late: it counts once, as itself again.
    totals = store.update("a", _replica(requests=6).snapshot(), now=11.0)
    assert totals["counters"][key] == 9 and store.replicas() == ["a", "b"]


def test_the_fleet_registry_sums_what_the_ingress_replicas_send():
    from deployments.registry import FleetRegistry

    registry = FleetRegistry()
    registry.ingress_metrics("a", _replica(requests=2).snapshot())
    totals = registry.ingress_metrics("b", _replica(requests=3).snapshot())
    key = ("zit_requests_total", (("endpoint", "/v1/images/generations"), ("status", "200"), ("tier", "vram_12")))
    assert totals["counters"][key] == 5


def test_a_departed_replicas_older_snapshot_arriving_late_never_lowers_a_served_sum():
    from deployments.metrics import ServiceTotals

    key = ("zit_requests_total", (("endpoint", "/v1/images/generations"), ("status", "200"), ("tier", "vram_12")))
    store = ServiceTotals(stale_s=6)
    store.update("a", _replica(requests=5).snapshot(), now=0.0)
    assert store.update("b", _replica(requests=0).snapshot(), now=10.0)["counters"][key] == 5  # a departed with 5
    # A call of a's sent before its last one arrives now: 3, older than the 5 kept of it.
    assert store.update("a", _replica(requests=3).snapshot(), now=11.0)["counters"][key] == 5
    assert store.update("a", _replica(requests=7).snapshot(), now=12.0)["counters"][key] == 7


def test_replicas_share_limits_only_within_their_configuration_and_a_goodbye_takes_effect_at_once():
    from deployments.metrics import ServiceTotals

    key = ("zit_requests_total", (("endpoint", "/v1/images/generations"), ("status", "200"), ("tier", "vram_12")))
    store = ServiceTotals(stale_s=6)
    store.update("old", _replica(requests=4).snapshot(), now=0.0, group="v1")
    totals = store.update("new", _replica(requests=1).snapshot(), now=1.0, group="v2")  # a redeploy's replica
    assert totals["replicas"] == 1 and totals["counters"][key] == 5
    store.update("new-2", _replica(requests=0).snapshot(), now=1.0, group="v2")
    store.gone("new-2", now=1.5)
    totals = store.update("new", _replica(requests=2).snapshot(), now=2.0, group="v2")
    assert totals["replicas"] == 1 and totals["counters"][key] == 6
