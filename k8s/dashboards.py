"""The Grafana dashboards of the chart, as code (Grafana's own SDK, grafana-foundation-sdk), one function each.

    make dashboards          # writes k8s/zit-cluster/dashboards/*.json from this module
    python k8s/dashboards.py --check   # exit 1 when the committed JSON differs from what this module builds

The committed JSON is what the chart ships (templates/configmap-dashboards.yaml, one ConfigMap per file for
Grafana's sidecar); a unit test fails when it drifts from this module, and the observability system test runs
every panel's query against a real Prometheus scraping the service. The metrics are declared in
deployments/metrics.py; docs/observability.md says how to add a panel.

Every panel answers one question an operator asks, carries a unit, a description and thresholds (a single base
step where no value is bad), and sits in a row named for the question it helps with. The pieces several panels
share (the data source and tier/host/card variables, rate and latency queries, the stat and time series panel
shapes) are written once below.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model

OUT = Path(__file__).resolve().parent / "zit-cluster" / "dashboards"
TAG = "zit-cluster"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# Thresholds of the alert rules (k8s/zit-cluster/rules/zit-alerts.yaml), so a panel turns red where an alert fires.
SLO_SLOW_RATIO = 0.01  # requests over 60 s: the latency objective
ERROR_RATIO = 0.05  # ZitHighErrorRate
QUEUE_FILL = 0.8  # ZitQueueSaturated
VRAM_FULL = 0.95  # ZitCardNearVramLimit
REPORT_AGE_S = 30  # ZitFleetReportsStale


# -- shared pieces -------------------------------------------------------------------------------------------------


def steps(*pairs: tuple[float | None, str]) -> dash.ThresholdsConfig:
    """Absolute thresholds: (value, colour) pairs, the first with value None (the base)."""
    return dash.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(
        [model.Threshold(value=value, color=color) for value, color in pairs])


# No value is bad (throughput, counts): one base step, so the colour says nothing it should not.
NEUTRAL = (None, "green")


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().datasource(DATASOURCE).expr(expr).legend_format(legend).ref_id(ref).range()


def table_query(expr: str, ref: str) -> prometheus.Dataquery:
    """An instant query whose series become table rows (their labels columns, the value `Value #<ref>`)."""
    return (prometheus.Dataquery().datasource(DATASOURCE).expr(expr).ref_id(ref).instant()
            .format(prometheus_model.PromQueryFormat.TABLE))


def tier_filter(*more: str) -> str:
    """A label matcher on the tier variable (and `more` matchers), for inside a metric's braces."""
    return ", ".join((*more, 'tier=~"$tier"'))


# Requests that made images (the others count under tier "none").
IMAGES = 'tier!="none"'
CARD_FILTER = 'tier=~"$tier", host=~"$host", card=~"$card"'
CARD_LEGEND = "{{model}} · {{host}}"


def datasource_variable() -> dash.DatasourceVariable:
    return dash.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, source: str) -> dash.QueryVariable:
    """A multi-value variable of one label's values in `source` (a series selector), "All" by default."""
    values = f"label_values({source}, {name})"
    return (dash.QueryVariable(name).label(label).datasource(DATASOURCE).query(values).multi(True).include_all(True)
            .all_value(".*").current(model.VariableOption(selected=True, text=["All"], value=["$__all"]))
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.NUMERICAL_ASC))  # vram_4 before vram_12


def base(uid: str, title: str, description: str) -> dash.Dashboard:
    """What every dashboard of the chart has: its uid and title, the tag that links them, a 10 s refresh over the
    last hour, the data source variable, and links to the other ZIT dashboards and to Ray's Serve dashboard."""
    return (dash.Dashboard(title).uid(uid).description(description).tags([TAG]).editable()
            .tooltip(model.DashboardCursorSync.CROSSHAIR).refresh("10s").time("now-1h", "now").timezone("browser")
            .with_variable(datasource_variable())
            .link(dash.DashboardLink("ZIT Cluster").type(model.DashboardLinkType.DASHBOARDS).tags([TAG])
                  .as_dropdown(True).include_vars(False).keep_time(True))
            .link(dash.DashboardLink("Ray Serve").type(model.DashboardLinkType.LINK).url("/d/rayServeDashboard")
                  .keep_time(True).tooltip("Ray's own Serve dashboard (ray_serve_* metrics from each node's metrics "
                                           "export port)")))


def stat_panel(title: str, description: str, unit: str, *queries: prometheus.Dataquery,
               thresholds: tuple = (NEUTRAL,), span: int = 4) -> stat.Panel:
    panel = (stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE).span(span)
             .height(4).thresholds(steps(*thresholds)).color_mode(common.BigValueColorMode.VALUE)
             .graph_mode(common.BigValueGraphMode.AREA)
             .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    for q in queries:
        panel = panel.with_target(q)
    return panel


def graph(title: str, description: str, unit: str, *queries: prometheus.Dataquery, thresholds: tuple = (NEUTRAL,),
          span: int = 12, min_val: float | None = None, max_val: float | None = None) -> timeseries.Panel:
    """A time series panel: legend below as a list, a shared tooltip sorted by value; with more than one threshold
    step the thresholds are drawn as dashed lines."""
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE).span(span)
             .height(8).thresholds(steps(*thresholds))
             .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    if len(thresholds) > 1:
        panel = panel.thresholds_style(common_builders.GraphThresholdsStyleConfig()
                                       .mode(common.GraphThresholdsStyleMode.DASHED))
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def rate_by_tier(title: str, description: str, unit: str, metric: str, *matchers: str,
                 span: int = 12) -> timeseries.Panel:
    """Per-second rate of a per-tier counter, one line per tier."""
    return graph(title, description, unit,
                 query(f"sum by (tier) (rate({metric}{{{tier_filter(*matchers)}}}[{RATE}]))", "{{tier}}"), span=span)


def latency_by_tier(title: str, description: str, histogram: str, *matchers: str,
                    thresholds: tuple = (NEUTRAL,)) -> timeseries.Panel:
    """p50 and p95 of a per-tier histogram of seconds."""
    selector = f"{histogram}_bucket{{{tier_filter(*matchers)}}}"
    return graph(title, description, "s", *(
        query(f"histogram_quantile({q}, sum by (tier, le) (rate({selector}[{RATE}])))", f"{{{{tier}}}} p{pct}", ref)
        for q, pct, ref in ((0.5, 50, "A"), (0.95, 95, "B"))), thresholds=thresholds)


def increase_by(title: str, description: str, metric: str, by: str, legend: str, *matchers: str,
                span: int = 8) -> timeseries.Panel:
    """How many events of a counter happened per rate interval, split by the `by` labels."""
    selector = f"{metric}{{{', '.join(matchers)}}}" if matchers else metric
    return graph(title, description, "short", query(f"sum by ({by}) (increase({selector}[{RATE}]))", legend),
                 span=span)


FIVE_XX_RATIO = (f'(sum(rate(zit_requests_total{{status=~"5.."}}[{RATE}])) or vector(0)) '
                 f'/ sum(rate(zit_requests_total[{RATE}]))')


@dataclass(frozen=True)
class Built:
    """One dashboard: the file it goes to and the JSON Grafana reads."""

    filename: str
    json: str


# -- the dashboards ------------------------------------------------------------------------------------------------


def fleet_overview() -> dash.Dashboard:
    """ZIT Cluster / Fleet overview: is the service healthy, what does it serve, how long does it take, where does
    work wait."""
    return (
        base("zit-fleet", "ZIT Cluster / Fleet overview",
             "Throughput, latency, queues and replicas per tier (deployments/metrics.py).")
        .with_variable(label_variable("tier", "Tier", "zit_replicas"))
        .with_row(dash.Row("Is the service healthy now?"))
        .with_panel(stat_panel(
            "Requests / s", "HTTP requests the ingress answered per second, every route and status.", "reqps",
            query(f"sum(rate(zit_requests_total[{RATE}]))", "requests")))
        .with_panel(stat_panel(
            "Images / s", "Images generated per second on the selected tiers.", "short",
            query(f'sum(rate(zit_images_total{{{tier_filter()}}}[{RATE}]))', "images")))
        .with_panel(stat_panel(
            "Replicas live / target",
            "Generator replicas reporting to the fleet registry, and the replicas configured (autoscaled: the most "
            "the tiers may have). Live below target: replicas loading, failed, or on lost cards.", "short",
            query(f'sum(zit_replicas{{{tier_filter()}}})', "live"),
            query(f'sum(zit_replicas_target{{{tier_filter()}}})', "target", "B")))
        .with_panel(stat_panel(
            "Cards reporting", "Cards whose replica reports an NVML reading, of the cards a replica has reported "
            "from (those scaled away on purpose are left out).", "short",
            query(f'sum(zit_card_up{{{tier_filter()}}})', "reporting"),
            query(f'count(zit_card_up{{{tier_filter()}}})', "known", "B")))
        .with_panel(stat_panel(
            "Requests over 60 s (objective: under 1 %)",
            "Share of the requests that made images and took longer than 60 s, the latency objective's bound "
            "(alerts ZitLatencySLOBurnFast/Slow).", "percentunit",
            query(f'1 - sum(rate(zit_request_duration_seconds_bucket{{{tier_filter(IMAGES)}, le="60.0"}}[{RATE}])) '
                  f'/ sum(rate(zit_request_duration_seconds_count{{{tier_filter(IMAGES)}}}[{RATE}]))', "slow"),
            thresholds=((None, "green"), (SLO_SLOW_RATIO, "red"))))
        .with_panel(stat_panel(
            "5xx ratio", "Share of requests answered with a 5xx (alert ZitHighErrorRate above 5 %).", "percentunit",
            query(FIVE_XX_RATIO, "5xx"), thresholds=((None, "green"), (ERROR_RATIO, "red"))))
        .with_row(dash.Row("What is it serving?"))
        .with_panel(graph(
            "Requests by route and status", "HTTP requests per second by route template and status code.", "reqps",
            query(f"sum by (endpoint, status) (rate(zit_requests_total[{RATE}]))", "{{endpoint}} {{status}}")))
        .with_panel(rate_by_tier("Images per second by tier", "Images each tier generated per second.", "short",
                                 "zit_images_total"))
        .with_panel(rate_by_tier(
            "Demand per tier (requests it could hold)",
            "Requests per second the memory model says each tier can hold, whether or not it ran them.", "reqps",
            "zit_tier_demand_total"))
        .with_panel(rate_by_tier("Chunks finished by tier", "Chunks each tier finished per second.", "ops",
                                 "zit_chunks_total", 'outcome="ok"'))
        .with_row(dash.Row("How long do requests take?"))
        .with_panel(latency_by_tier(
            "End-to-end latency by tier", "Requests that produced images, by the tier that made most of them: "
            "p50 and p95 inside the ingress. The line at 60 s is the latency objective's bound.",
            "zit_request_duration_seconds", IMAGES, thresholds=((None, "green"), (60, "red"))))
        .with_panel(latency_by_tier(
            "Queue wait by tier", "How long chunks waited in their tier's queue before a replica took them "
            "(p50, p95): long waits want more replicas or a larger tier.", "zit_queue_wait_seconds"))
        .with_panel(latency_by_tier(
            "Generation time per chunk by tier", "Time a chunk took on its replica, from handing it over to its "
            "images coming back (p50, p95).", "zit_generation_seconds"))
        .with_panel(graph(
            "Seconds per step by tier", "Mean seconds per denoising step of the chunks each tier finished: the "
            "cards' measured speed.", "s",
            query(f'sum by (tier) (rate(zit_seconds_per_step_sum{{{tier_filter()}}}[{RATE}])) / sum by (tier) '
                  f'(rate(zit_seconds_per_step_count{{{tier_filter()}}}[{RATE}]))', "{{tier}} mean")))
        .with_row(dash.Row("Where does work wait?"))
        .with_panel(graph(
            "Queue depth by tier", "Chunks waiting in each tier's queue at the ingress, and chunks running on its "
            "replicas.", "short",
            query(f'sum by (tier) (zit_queue_waiting{{{tier_filter()}}})', "{{tier}} waiting"),
            query(f'sum by (tier) (zit_queue_running{{{tier_filter()}}})', "{{tier}} running", "B"), span=8))
        .with_panel(graph(
            "Queue fill by tier", "Waiting chunks over the queue's limit; a full queue answers 503 with "
            "Retry-After (alert ZitQueueSaturated above 80 %).", "percentunit",
            query(f'max by (tier) (zit_queue_waiting{{{tier_filter()}}} / zit_queue_limit{{{tier_filter()}}})',
                  "{{tier}}"),
            thresholds=((None, "green"), (QUEUE_FILL, "red")), span=8, min_val=0, max_val=1))
        .with_panel(graph(
            "Replicas per tier", "Replicas reporting, running a job, and configured (autoscaled: the most).",
            "short",
            query(f'sum by (tier) (zit_replicas{{{tier_filter()}}})', "{{tier}} live"),
            query(f'sum by (tier) (zit_replicas_busy{{{tier_filter()}}})', "{{tier}} busy", "B"),
            query(f'sum by (tier) (zit_replicas_target{{{tier_filter()}}})', "{{tier}} target", "C"), span=8))
        .with_row(dash.Row("Is the text encoder keeping up?"))
        .with_panel(graph(
            "Text encoder requests by outcome", "Requests the text-encoder stage answered per second: from its "
            "cache (hit), encoded (miss), or not (replica_died, timeout, lost: those requests got 503). Without the "
            "stage (0 target replicas) every generator encodes its own chunks and this stays at 0.", "reqps",
            query(f"sum by (outcome) (rate(zit_text_encoder_requests_total[{RATE}]))", "{{outcome}}"), span=8))
        .with_panel(graph(
            "Text encoder time per request", "Time the stage took for a request on its replica (p50, p95): a miss "
            "encodes the prompt (about a second on a card, much more on a CPU), a hit takes about nothing.", "s",
            *(query(f'histogram_quantile({q}, sum by (le) (rate(zit_text_encoder_seconds_bucket{{outcome="miss"}}'
                    f'[{RATE}])))', f"miss p{pct}", ref) for q, pct, ref in ((0.5, 50, "A"), (0.95, 95, "B"))),
            span=8))
        .with_panel(stat_panel(
            "Text encoder replicas live / target", "Stage replicas reporting, of those configured; fewer live than "
            "configured makes requests wait for the stage (or get 503 when it is lost).", "short",
            query("sum(zit_text_encoder_replicas)", "live"),
            query("sum(zit_text_encoder_replicas_target)", "target", "B")))
        .with_panel(stat_panel(
            "Text encoder cache", "Prompt embeddings the stage's caches hold (repeated prompts cost no encode).",
            "bytes", query("sum(zit_text_encoder_cache_bytes)", "bytes")))
    )


def cards() -> dash.Dashboard:
    """ZIT Cluster / Cards: which cards are up, how full each is, how hard each works."""
    source = "zit_card_memory_total_bytes"
    return (
        base("zit-cards", "ZIT Cluster / Cards",
             "Every card from NVML, as its replica reported it to the fleet registry: memory, load, health.")
        .with_variable(label_variable("tier", "Tier", source))
        .with_variable(label_variable("host", "Host", f'{source}{{tier=~"$tier"}}'))
        .with_variable(label_variable("card", "Card", f'{source}{{tier=~"$tier", host=~"$host"}}'))
        .with_row(dash.Row("Which cards are up?"))
        .with_panel(
            statetimeline.Panel().title("Card reporting / node alive").description(
                "Per card: whether its replica reports an NVML reading (alert ZitCardDown when not), and whether "
                "Ray sees its node alive (ZitCardMissing when not). A dead node makes its tier lost when no other "
                "card of the tier lives: its work moves to other tiers.").unit("bool_on_off")
            .datasource(DATASOURCE).span(24).height(8).thresholds(steps((None, "red"), (1, "green")))
            .show_value(common.VisibilityMode.NEVER).merge_values(True).row_height(0.8).fill_opacity(70).line_width(0)
            .with_target(query(f"zit_card_up{{{CARD_FILTER}}}", f"{CARD_LEGEND} reading"))
            .with_target(query(f"zit_card_node_up{{{CARD_FILTER}}}", f"{CARD_LEGEND} node", "B")))
        .with_row(dash.Row("How full is each card?"))
        .with_panel(
            bargauge.Panel().title("VRAM used per card").description(
                "Memory in use on each card, all processes, as a share of its total (alert ZitCardNearVramLimit "
                "above 95 %).").unit("percentunit").min(0).max(1).datasource(DATASOURCE).span(12).height(10)
            .thresholds(steps((None, "green"), (0.85, "orange"), (VRAM_FULL, "red")))
            .orientation(common.VizOrientation.HORIZONTAL).display_mode(common.BarGaugeDisplayMode.GRADIENT)
            .show_unfilled(True).reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"])
                                                .values(False))
            .with_target(query(f"zit_card_memory_used_bytes{{{CARD_FILTER}}} / "
                               f"zit_card_memory_total_bytes{{{CARD_FILTER}}}", f"{CARD_LEGEND} · {{{{tier}}}}")))
        .with_panel(
            bargauge.Panel().title("VRAM used / total per card").description(
                "Memory in use and in total on each card, in bytes (NVML).").unit("bytes").datasource(DATASOURCE)
            .span(12).height(10).thresholds(steps(NEUTRAL)).orientation(common.VizOrientation.HORIZONTAL)
            .display_mode(common.BarGaugeDisplayMode.BASIC).show_unfilled(True)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .with_target(query(f"zit_card_memory_used_bytes{{{CARD_FILTER}}}", f"{CARD_LEGEND} used"))
            .with_target(query(f"zit_card_memory_total_bytes{{{CARD_FILTER}}}", f"{CARD_LEGEND} total", "B")))
        .with_panel(graph(
            "VRAM used over time", "Memory in use on each card over time, all processes.", "bytes",
            query(f"zit_card_memory_used_bytes{{{CARD_FILTER}}}", CARD_LEGEND), span=24))
        .with_row(dash.Row("Does each host have the RAM its replicas need?"))
        .with_panel(
            bargauge.Panel().title("Host RAM needed per host").description(
                "What the host's replicas need in host RAM by the host-memory model (each shared weight set once), "
                "as a share of the RAM it has. Above 100 % the kernel or Ray's memory monitor kills replicas: `zit "
                "up` and `zit plan --fleet` say which cards to leave out.").unit("percentunit").min(0).max(1.2)
            .datasource(DATASOURCE).span(12).height(8)
            .thresholds(steps((None, "green"), (0.9, "orange"), (1, "red")))
            .orientation(common.VizOrientation.HORIZONTAL).display_mode(common.BarGaugeDisplayMode.GRADIENT)
            .show_unfilled(True).reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"])
                                                .values(False))
            .with_target(query('zit_host_memory_need_bytes{host=~"$host"} / zit_host_memory_total_bytes{host=~"$host"}',
                               "{{host}}")))
        .with_panel(graph(
            "Host RAM used, needed and total", "Per host: RAM in use (the kernel's reading), what its replicas need "
            "by the model, and its total (the cgroup's limit in a pod).", "bytes",
            query('zit_host_memory_used_bytes{host=~"$host"}', "{{host}} used"),
            query('zit_host_memory_need_bytes{host=~"$host"}', "{{host}} needed", "B"),
            query('zit_host_memory_total_bytes{host=~"$host"}', "{{host}} total", "C"), span=12))
        .with_row(dash.Row("Does each card get its full PCIe link?"))
        .with_panel(pcie_links())
        .with_row(dash.Row("How hard does each card work?"))
        .with_panel(graph(
            "GPU utilisation", "Share of NVML's last sample period in which the card computed.", "percentunit",
            query(f"zit_card_utilization_ratio{{{CARD_FILTER}}}", CARD_LEGEND), min_val=0, max_val=1))
        .with_panel(graph(
            "Temperature", "GPU temperature; consumer cards throttle from about 83 °C.", "celsius",
            query(f"zit_card_temperature_celsius{{{CARD_FILTER}}}", CARD_LEGEND),
            thresholds=((None, "green"), (80, "orange"), (88, "red"))))
        .with_panel(graph(
            "Power", "Board power draw, where the card's NVML reports it.", "watt",
            query(f"zit_card_power_watts{{{CARD_FILTER}}}", CARD_LEGEND), span=24))
    )


def pcie_links() -> table.Panel:
    """One row per card: its PCIe link's lanes and generation against their maximum, and the host-to-device copy
    rate the service uses for it (alert ZitCardPcieLinkDegraded)."""

    def of_kind(metric: str, kind: str) -> str:  # one reading (current or max) per card, without the `kind` label
        return f'max without (kind) ({metric}{{{CARD_FILTER}, kind="{kind}"}})'

    width, gen = "zit_card_pcie_link_width", "zit_card_pcie_link_generation"
    columns = {"model": "Card", "host": "Host", "tier": "Tier", "Value #A": "Lanes", "Value #B": "Lanes (max)",
               "Value #C": "Lanes of max", "Value #D": "Generation", "Value #E": "Generation (max)",
               "Value #F": "Copy rate", "source": "Copy rate from", "card": "UUID"}
    return (
        table.Panel().title("PCIe link per card").description(
            "Per card: the lanes and PCIe generation its link runs at against the most card and slot allow (NVML), "
            "and the host-to-device copy rate the service streams weights at (measured on the card when its "
            "replica started, else its link's generation x lanes, else the default). Lanes below the maximum (red) "
            "mean the link trained down, a riser or slot fault; a generation below the maximum is only a fault "
            "while the card computes, idle cards lower it to save power (alert ZitCardPcieLinkDegraded).")
        .unit("none").datasource(DATASOURCE).span(24).height(8).thresholds(steps(NEUTRAL))
        .align(common.FieldTextAlignment.AUTO).inspect(False)
        .with_target(table_query(of_kind(width, "current"), "A"))
        .with_target(table_query(of_kind(width, "max"), "B"))
        .with_target(table_query(f'{of_kind(width, "current")} / {of_kind(width, "max")}', "C"))
        .with_target(table_query(of_kind(gen, "current"), "D"))
        .with_target(table_query(of_kind(gen, "max"), "E"))
        .with_target(table_query(f"zit_card_link_bytes_per_second{{{CARD_FILTER}}}", "F"))
        # One row per card: the queries' rows joined on their shared labels, then named and ordered.
        .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(model.DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True, "__name__": True, "job": True, "instance": True},
            "indexByName": {name: index for index, name in enumerate(columns)},
            "renameByName": columns}))
        .override_by_name("Lanes of max", [
            model.DynamicConfigValue(id_val="unit", value="percentunit"),
            model.DynamicConfigValue(id_val="thresholds", value={"mode": "absolute", "steps": [
                {"value": None, "color": "red"}, {"value": 1, "color": "green"}]}),
            model.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"})])
        .override_by_name("Copy rate", [model.DynamicConfigValue(id_val="unit", value="Bps")])
    )


def errors() -> dash.Dashboard:
    """ZIT Cluster / Errors: what failed and why, where work moved, what was refused."""
    return (
        base("zit-errors", "ZIT Cluster / Errors",
             "Out-of-memory events, degradations, retries, lost tiers, failed chunks and rejections.")
        .with_variable(label_variable("tier", "Tier", "zit_chunks_total"))
        .with_row(dash.Row("Did a card run out of memory?"))
        .with_panel(increase_by(
            "Out-of-memory events by tier", "A replica's degraded retry on its own card, or a chunk that ran out "
            "of memory there (alert ZitOutOfMemory): the memory model predicted too little.",
            "zit_out_of_memory_total", "tier", "{{tier}}", 'tier=~"$tier"'))
        .with_panel(increase_by(
            "Degraded chunks by tier", "Chunks that finished with the degraded profile (smaller VAE tiles) after "
            "an out-of-memory error.", "zit_degraded_total", "tier", "{{tier}}", 'tier=~"$tier"'))
        .with_panel(increase_by(
            "Retries by reason", "Chunks moved from a tier to another (or to the same after a replica died), by "
            "reason: out_of_memory, bad_image, replica_died, node_lost.", "zit_retries_total",
            "reason, tier, to_tier", "{{reason}}: {{tier}} → {{to_tier}}", 'tier=~"$tier"'))
        .with_row(dash.Row("What failed, and what was refused?"))
        .with_panel(increase_by(
            "Failed chunk attempts by outcome", "Chunk attempts that did not end ok, by tier and outcome.",
            "zit_chunks_total", "tier, outcome", "{{tier}} {{outcome}}", 'tier=~"$tier"', 'outcome!="ok"'))
        .with_panel(increase_by(
            "Rejections by reason", "Requests the service refused, by status and reason: 401, 413, 422 "
            "(invalid_request, no_tier_fits), 429, 503 (tiers_full, retries_exhausted).", "zit_rejections_total",
            "status, reason", "{{status}} {{reason}}"))
        .with_panel(graph(
            "Error ratio (5xx)", "Share of requests answered with a 5xx (alert ZitHighErrorRate above 5 %).",
            "percentunit", query(FIVE_XX_RATIO, "5xx"), thresholds=((None, "green"), (ERROR_RATIO, "red")), span=8))
        .with_row(dash.Row("Is a tier lost, and how much went wrong in this range?"))
        .with_panel(stat_panel(
            "Tiers lost", "Tiers whose card nodes are all dead with no replica left: their chunks go to other "
            "tiers until a card node of theirs joins again (docs/faults.md).", "short",
            query(f'sum(zit_tier_lost{{{tier_filter()}}})', "lost"),
            thresholds=((None, "green"), (1, "red")), span=4))
        .with_panel(stat_panel(
            "Out-of-memory events in range", "Out-of-memory events over the dashboard's time range.", "short",
            query(f'sum(increase(zit_out_of_memory_total{{{tier_filter()}}}[$__range]))', "OOM"),
            thresholds=((None, "green"), (1, "orange")), span=4))
        .with_panel(stat_panel(
            "Retries in range", "Chunks moved over the dashboard's time range, every reason.", "short",
            query(f'sum(increase(zit_retries_total{{{tier_filter()}}}[$__range]))', "retries"), span=4))
        .with_panel(stat_panel(
            "Rejections in range", "Requests refused over the dashboard's time range, every reason.", "short",
            query("sum(increase(zit_rejections_total[$__range]))", "rejections"), span=4))
        .with_panel(stat_panel(
            "Fleet report age", "Seconds since the ingress last read the fleet registry; card and replica numbers "
            "are this old (alert ZitFleetReportsStale above 30 s).", "s",
            query("max(zit_fleet_report_age_seconds)", "age"),
            thresholds=((None, "green"), (REPORT_AGE_S, "red")), span=8))
    )


DASHBOARDS = {"zit-fleet.json": fleet_overview, "zit-cards.json": cards, "zit-errors.json": errors}


def build() -> list[Built]:
    """Every dashboard as the JSON the chart ships: panels numbered in order, keys sorted, two-space indent."""
    encoder = JSONEncoder(sort_keys=True, indent=2)
    built = []
    for filename, make in DASHBOARDS.items():
        dashboard = make().build()
        for number, panel in enumerate(dashboard.panels or [], start=1):
            panel.id_val = number
        built.append(Built(filename, encoder.encode(dashboard) + "\n"))
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a committed dashboard differs from this module's")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the JSON files (default: the chart's)")
    args = parser.parse_args(argv)
    stale = []
    for dashboard in build():
        path = args.out / dashboard.filename
        if path.exists() and path.read_text() == dashboard.json:
            continue
        stale.append(path)
        if not args.check:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(dashboard.json)
    for path in stale:
        print(f"{'differs from k8s/dashboards.py' if args.check else 'wrote'}: {path}")
    if args.check and stale:
        print("run `make dashboards` and commit the result")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
