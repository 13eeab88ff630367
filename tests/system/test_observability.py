"""Observability against the real tools: Debian's Prometheus scrapes the service on a simulated mixed fleet while it
serves traffic; the metric names and labels are read back through Prometheus' HTTP API; every Grafana dashboard
query (variables substituted) must return data there; the alert rules load into that Prometheus and pass
`promtool check rules` and `promtool test rules`.

The fleet is the mixed one with a GTX 1650 that fails allocations above 1500 MiB (tests/system/prometheus/fleet.yaml)
and the cheapest tier is always tried first, so the first request lands on the 1650, runs out of memory and is
retried on a larger tier: out-of-memory, retry and failed-chunk series get real data, not just zeros.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cluster.nvml import load_fleet
from runtime.local import free_port
from tests.system.conftest import deploy, fleet_cluster, wait_for_replicas
from tests.unit.deployments.test_metrics import EXPOSED_SERIES

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "prometheus"
FLEET = HERE / "fleet.yaml"
RULES = REPO / "k8s" / "zit-cluster" / "rules" / "zit-alerts.yaml"
DASHBOARDS = sorted((REPO / "k8s" / "zit-cluster" / "dashboards").glob("*.json"))
# Grafana's variables as the test sets them: every template variable is "All" (its allValue, `.*`); the interval
# variables are 5 minutes, more than the whole test, so rates see every sample it scraped.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "5m", "__range": "5m"}
ALL = ".*"
LABELS_ALLOWED = {"__name__", "job", "instance", "endpoint", "status", "tier", "card", "model", "host", "deployment",
                  "reason", "outcome", "to_tier", "kind", "source", "direction", "le"}
PROMPT = "a red fox in the snow, observability"



def require_prometheus() -> None:
    """The real tools or a failure that says how to get them (`make test` installs them): never a silent skip."""
    missing = [tool for tool in ("prometheus", "promtool") if not shutil.which(tool)]
    assert not missing, f"{', '.join(missing)} not found: run tests/tools/install.sh (or apt-get install prometheus)"


# -- Prometheus --------------------------------------------------------------------------------------------------


class Prometheus:
    """Debian's prometheus binary on a free loopback port, scraping `target` every second, with the alert rules."""

    def __init__(self, target: str):
        self.dir = Path(tempfile.mkdtemp(prefix="zit-prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "zit", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }))
        check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("prometheus did not get ready in 60 s")

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        payload = response.json()
        assert payload.get("status") == "success", f"{expr}: {payload}"
        return payload["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        response = httpx.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=30)
        return response.json()["data"]

    def series(self, match: str) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/series", params={"match[]": match}, timeout=30).json()["data"]

    def wait_for(self, expr: str, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the service under traffic, scraped ------------------------------------------------------------------------------


def generate(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "steps": 2, **body}, timeout=300)


@pytest.fixture(scope="module")
def scraped():
    """(prometheus, url, cards, responses) after traffic has been scraped."""
    require_prometheus()
    env = {"ZIT_TIER_SLACK": "1000000"}  # cheapest tier first: the first request meets the faulty 1650
    with fleet_cluster(FLEET, env) as (cards, port):
        url = deploy(cards, port)
        wait_for_replicas(url, len(cards), timeout_s=240)
        prometheus = Prometheus(f"127.0.0.1:{port}")
        try:
            # Counters a request creates (a route's first status) appear at their value, and rate() counts only
            # what changes after a series' first sample: so scrape before the traffic, and send it in two rounds.
            assert prometheus.wait_for('count_over_time(up{job="zit"}[1m]) >= 3 and up{job="zit"} == 1')
            responses = {"oom": generate(url, size="256x256", n=1, seed=1)}
            for round_ in (1, 2):
                with ThreadPoolExecutor(4) as pool:
                    responses["parallel"] = list(pool.map(lambda s: generate(url, size="256x256", n=2, seed=s),
                                                          (10, 20, 30, 40)))
                responses["invalid"] = generate(url, size="100x100")
                responses["models"] = httpx.get(f"{url}/v1/models", timeout=30)
                if round_ == 1:
                    time.sleep(3)  # scraped between the rounds
            # Everything the assertions read must have been scraped: the last request's status, the retry, and Ray's
            # card nodes (read by the ingress every 2 s, with the reports).
            for expr in ('zit_requests_total{status="422"} > 0', "zit_retries_total > 0", "zit_card_node_up",
                         'zit_requests_total{endpoint="/v1/models"}', "zit:request_slow:ratio_rate5m"):
                assert prometheus.wait_for(expr), f"Prometheus never saw {expr}"
            time.sleep(3)  # a few more scrapes, so every counter has samples on both sides of its last change
            yield prometheus, url, cards, responses
        finally:
            prometheus.stop()


def test_traffic_was_served_with_a_retry_and_a_rejection(scraped):
    _, _, _, responses = scraped
    assert responses["oom"].status_code == 200, responses["oom"].text
    retries = responses["oom"].json()["metadata"]["retries"]
    assert retries and retries[0]["reason"] == "out_of_memory" and retries[0]["from"] == "vram_4"
    assert [r.status_code for r in responses["parallel"]] == [200] * 4
    assert responses["invalid"].status_code == 422


def test_the_metrics_endpoint_speaks_prometheus_text(scraped):
    _, url, _, _ = scraped
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE zit_requests_total counter" in response.text
    assert "/metrics" not in httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]


def test_prometheus_has_every_metric_with_its_labels(scraped):
    prometheus, _, cards, _ = scraped
    names = {row["metric"]["__name__"] for row in prometheus.query('count by (__name__) ({__name__=~"zit_.+"})')}
    expected = EXPOSED_SERIES | {"zit_card_node_up", "zit_host_memory_total_bytes", "zit_host_memory_used_bytes",
                                 "zit_host_memory_need_bytes"}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    # Labels: only the low-cardinality ones, no prompt anywhere.
    for series in prometheus.series('{__name__=~"zit_.+"}'):
        assert set(series) <= LABELS_ALLOWED, series
        assert not any("fox" in value for value in series.values()), series
    # One series per card, labelled with its uuid, name, tier and host as the fleet file says.
    fleet = {card.uuid: card for card in load_fleet(FLEET)}
    rows = prometheus.query("zit_card_memory_total_bytes")
    assert {row["metric"]["card"] for row in rows} == set(fleet) == {card.uuid for card in cards}
    for row in rows:
        card = fleet[row["metric"]["card"]]
        assert (row["metric"]["model"], row["metric"]["tier"], row["metric"]["host"]) == (card.name, card.tier,
                                                                                         card.host)
        assert float(row["value"][1]) == card.memory_total
    assert {row["metric"]["tier"] for row in prometheus.query("zit_replicas == 1")} == {c.tier for c in cards}
    assert all(row["value"][1] == "1" for row in prometheus.query("zit_card_node_up"))
    # Requests by route and status, rejections by reason, the retry by reason and tiers.
    statuses = {(r["metric"]["endpoint"], r["metric"]["status"]) for r in prometheus.query("zit_requests_total")}
    assert {("/v1/images/generations", "200"), ("/v1/images/generations", "422"), ("/v1/models", "200")} <= statuses
    rejected = prometheus.query('zit_rejections_total{status="422", reason="invalid_request", '
                                'endpoint="/v1/images/generations"}')
    assert rejected and float(rejected[0]["value"][1]) >= 1
    retry = prometheus.query('zit_retries_total{reason="out_of_memory", tier="vram_4"} > 0')
    assert retry and retry[0]["metric"]["to_tier"] != "vram_4"
    # Series whose labels are known at start-up exist before their first event, at 0 (docs/observability.md).
    assert prometheus.query('zit_retries_total{reason="node_lost"} == 0')
    assert prometheus.query('zit_rejections_total{reason="tiers_full"} == 0')
    assert float(prometheus.query('zit_out_of_memory_total{tier="vram_4"}')[0]["value"][1]) >= 1
    images = sum(float(row["value"][1]) for row in prometheus.query("zit_images_total"))
    assert images == 1 + 2 * 4 * 2


def _substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}", ALL, expr)
    expr = re.sub(r"\$(\w+)", ALL, expr)
    return expr


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def test_dashboards_use_the_datasource_variable():
    assert {path.name for path in DASHBOARDS} >= {"zit-fleet.json", "zit-cards.json", "zit-errors.json"}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        for panel in _panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"


def test_every_dashboard_query_returns_data(scraped):
    prometheus = scraped[0]
    empty = []
    queries = 0
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                queries += 1
                expr = _substitute(target["expr"])
                values = [float(row["value"][1]) for row in prometheus.query(expr)]
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{path.name} / {panel['title']} / {target['refId']}: {expr} -> {values}")
    assert queries >= 30
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_every_dashboard_variable_has_values(scraped):
    prometheus = scraped[0]
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] != "query":
                continue
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", _substitute(query))
            assert match, f"{path.name}: variable {variable['name']} is not label_values(selector, label): {query}"
            assert prometheus.label_values(match.group(2), match.group(1)), (path.name, variable["name"])


def test_recording_rules_evaluate_on_live_data_and_no_alert_fires(scraped):
    prometheus = scraped[0]
    assert [float(r["value"][1]) for r in prometheus.query("zit:request_slow:ratio_rate5m")] == [0.0]
    assert prometheus.query("zit:request_errors:ratio_rate5m")
    rules = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=30).json()["data"]["groups"]
    assert all(rule["health"] == "ok" for group in rules for rule in group["rules"]), rules
    firing = [a for a in httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
              if a["state"] == "firing"]
    # The out-of-memory alert is the one the test's fault must fire; nothing else is wrong with this fleet.
    assert {a["labels"]["alertname"] for a in firing} <= {"ZitOutOfMemory"}, firing


def test_promtool_checks_and_unit_tests_the_alert_rules():
    require_prometheus()
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(["promtool", "test", "rules", str(HERE / "alerts_test.yaml")], capture_output=True,
                           text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    # Every alert of the rules file has a unit test.
    alerts = set(re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)", (HERE / "alerts_test.yaml").read_text()))
    assert alerts and alerts <= tested, f"alerts without a unit test: {sorted(alerts - tested)}"
