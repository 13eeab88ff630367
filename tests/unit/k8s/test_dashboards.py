"""The chart's Grafana dashboards come from k8s/dashboards.py (Grafana's SDK): the committed JSON is what the module
builds, Grafana's own dashboard model reads it back unchanged, the UIDs and titles operators import stay, and every
panel says what it shows, in which unit, and where its value turns bad. (tests/system/test_observability.py runs
every query against a real Prometheus scraping the service.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CHART_DASHBOARDS = REPO / "k8s" / "zit-cluster" / "dashboards"


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("zit_dashboards", REPO / "k8s" / "dashboards.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # its dataclass needs its module registered
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture(scope="module")
def built(module):
    return {b.filename: b.json for b in module.build()}


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_the_committed_json_is_what_the_module_builds(built):
    committed = {path.name: path.read_text() for path in CHART_DASHBOARDS.glob("*.json")}
    assert set(committed) == set(built), "run `make dashboards` and commit k8s/zit-cluster/dashboards/"
    stale = [name for name in built if committed[name] != built[name]]
    assert not stale, f"{stale} differ from k8s/dashboards.py: run `make dashboards` and commit the result"


def test_the_check_mode_fails_on_a_hand_edit(module, tmp_path, built):
    for name, text in built.items():
        (tmp_path / name).write_text(text)
    assert module.main(["--check", "--out", str(tmp_path)]) == 0
    edited = json.loads(built["zit-fleet.json"])
    edited["panels"][1]["title"] = "edited by hand"
    (tmp_path / "zit-fleet.json").write_text(json.dumps(edited))
    assert module.main(["--check", "--out", str(tmp_path)]) == 1


def test_grafanas_model_reads_every_dashboard_back_unchanged(built):
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    def without_empty(node):  # the model writes an empty `custom: {}` where a panel sets none: the same thing
        if isinstance(node, dict):
            return {k: without_empty(v) for k, v in node.items() if v != {}}
        return [without_empty(v) for v in node] if isinstance(node, list) else node

    register_default_plugins()
    encoder = JSONEncoder(sort_keys=True, indent=2)
    for name, text in built.items():
        decoded = Dashboard.from_json(json.loads(text))
        assert without_empty(json.loads(encoder.encode(decoded))) == without_empty(json.loads(text)), name


def test_operators_keep_the_uids_titles_and_tag_they_import(built):
    dashboards = {name: json.loads(text) for name, text in built.items()}
    assert {name: (d["uid"], d["title"]) for name, d in dashboards.items()} == {
        "zit-fleet.json": ("zit-fleet", "ZIT Cluster / Fleet overview"),
        "zit-cards.json": ("zit-cards", "ZIT Cluster / Cards"),
        "zit-errors.json": ("zit-errors", "ZIT Cluster / Errors"),
    }
    assert all(d["tags"] == ["zit-cluster"] for d in dashboards.values())


def test_every_panel_has_a_unit_a_description_thresholds_and_a_unique_id(built):
    for name, text in built.items():
        dashboard = json.loads(text)
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), name
        for panel in panels(dashboard):
            if panel["type"] == "row":
                assert panel["title"].endswith("?"), (name, panel["title"])  # rows are an operator's questions
                continue
            where = (name, panel["title"])
            defaults = panel["fieldConfig"]["defaults"]
            assert defaults.get("unit"), where
            assert len(panel.get("description", "")) >= 20, where
            steps = defaults["thresholds"]["steps"]
            assert steps[0]["value"] is None and all(s["value"] is not None for s in steps[1:]), where
            assert [s["value"] for s in steps[1:]] == sorted(s["value"] for s in steps[1:]), where
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), where


def test_panels_that_mirror_an_alert_turn_red_at_its_threshold(built):
    """The 5xx ratio, queue fill, VRAM and report-age panels change colour where their alert fires."""
    import yaml

    rules = yaml.safe_load((REPO / "k8s" / "zit-cluster" / "rules" / "zit-alerts.yaml").read_text())
    exprs = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    red = {}
    for text in built.values():
        for panel in panels(json.loads(text)):
            steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
            red.update({panel["title"]: s["value"] for s in steps if s["color"] == "red"})
    assert red["5xx ratio"] == 0.05 and "> 0.05" in exprs["ZitHighErrorRate"]
    assert red["Queue fill by tier"] == 0.8 and "> 0.8" in exprs["ZitQueueSaturated"]
    assert red["VRAM used per card"] == 0.95 and "> 0.95" in exprs["ZitCardNearVramLimit"]
    assert red["Fleet report age"] == 30 and "> 30" in exprs["ZitFleetReportsStale"]
