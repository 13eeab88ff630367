"""Two ingress replicas behind one proxy: an image returned as a URL is served by either of them (one image store
for the service), every request is answered whichever replica the proxy picks, GET /metrics counts both, and a
replica killed under load loses no request (the proxy replays them)."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.tiers import TierConfig
from deployments.config import ServiceConfig
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def url(serve_port):
    return deploy(serve_port, ServiceConfig(tiers=[TierConfig(name="cpu")], ingress_replicas=2))


def test_both_ingress_replicas_answer(url):
    seen = {httpx.get(f"{url}/healthz", timeout=60).json()["replica"] for _ in range(40)}
    assert len(seen) == 2, seen


def test_a_url_image_is_served_by_either_ingress_replica(url):
    response = httpx.post(f"{url}/v1/images/generations", timeout=120,
                          json={"prompt": "a fox", "size": "64x64", "steps": 1, "seed": 3, "response_format": "url"})
    assert response.status_code == 200, response.text
    image_url = response.json()["data"][0]["url"]
    answers = [httpx.get(image_url, timeout=60) for _ in range(40)]
    assert [a.status_code for a in answers] == [200] * 40
    assert len({a.content for a in answers}) == 1
    assert len({a.headers["x-zit-ingress"] for a in answers}) == 2  # both replicas served it


def _metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", timeout=60)
    assert response.status_code == 200, response.text
    return sum(sample.value for family in text_string_to_metric_families(response.text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_every_replicas_requests_through_either_replica(url):
    """Each replica counts what it answers; GET /metrics, whichever replica the proxy picks, serves the sum."""
    series = {"endpoint": "/healthz", "status": "200"}
    # The baseline once every replica has sent what earlier tests counted (each sends every poll, 2 s): two readings
    # a poll and a half apart agree.
    before, deadline = -1.0, time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _metric(url, "zit_requests_total", **series)
        if now == before:
            break
        before = now
        time.sleep(3)
    answered = {httpx.get(f"{url}/healthz", timeout=60).json()["replica"] for _ in range(30)}
    assert len(answered) == 2
    deadline = time.monotonic() + 20  # the other replica's counts reach the sum within its next poll (2 s)
    while _metric(url, "zit_requests_total", **series) < before + 30 and time.monotonic() < deadline:
        time.sleep(0.5)
    # Twenty scrapes, spread over both replicas, all read the same sum: 30 more, never fewer.
    assert [_metric(url, "zit_requests_total", **series) for _ in range(20)] == [before + 30] * 20


def test_an_ingress_replica_killed_under_load_loses_no_request(url):
    """Eight image requests spread over both replicas; one replica is killed while it holds some of them. The
    proxy replays those on the other replica (deployments/proxy.py): every request gets its image."""
    import ray

    def ingress_actors():
        return [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Ingress#" in a["name"]]

    body = {"prompt": "a fox in the snow", "size": "256x256", "steps": 4, "response_format": "b64_json"}
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, f"{url}/v1/images/generations", json={**body, "seed": 100 + i},
                               timeout=300) for i in range(8)]
        actors = {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"]) for a in ingress_actors()}
        assert len(actors) == 2, actors
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both replicas hold requests (one tier replica runs them in turn)
            held = {name: ray.get(actor.get_num_ongoing_requests.remote()) for name, actor in actors.items()}
            if all(held.values()) and sum(held.values()) >= 6:
                break
            time.sleep(0.05)
        victim = max(held, key=held.get)
        assert held[victim] > 0, held
        ray.kill(actors[victim], no_restart=False)
        responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * 8, [r.text[:300] for r in responses]
    assert all(len(r.json()["data"][0]["b64_json"]) > 100 for r in responses)
    # Serve replaces the killed replica; both answer again.
    deadline = time.monotonic() + 90
    while len({httpx.get(f"{url}/healthz", timeout=60).json()["replica"] for _ in range(20)}) < 2:
        assert time.monotonic() < deadline, "the killed ingress replica was not replaced"
        time.sleep(1)


def test_an_autoscaled_ingress_adds_replicas_for_the_requests_it_holds(serve_port):
    """`ingress_max_replicas` above `ingress_replicas` with autoscaling on: Serve runs IngressAutoscaler, which asks
    for one replica per `ingress_target_requests` held."""
    from ray import serve

    from deployments.config import AutoscalingSettings

    config = ServiceConfig(tiers=[TierConfig(name="cpu")], ingress_replicas=1, ingress_max_replicas=2,
                           autoscaling=AutoscalingSettings(ingress_target_requests=2, metrics_interval_s=0.5,
                                                           min_replicas=1))
    url = deploy(serve_port, config)

    def ingress_replicas() -> int:
        deployment = serve.status().applications["zit"].deployments["Ingress"]
        return sum(count for state, count in deployment.replica_states.items() if str(state).endswith(
            ("RUNNING", "STARTING")))

    assert ingress_replicas() == 1
    body = {"prompt": "a fox in the snow", "size": "256x256", "steps": 4}
    seen = []
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(httpx.post, f"{url}/v1/images/generations", json={**body, "seed": i}, timeout=300)
                   for i in range(8)]
        deadline = time.monotonic() + 60
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            seen.append(ingress_replicas())
            time.sleep(0.25)
        assert [f.result().status_code for f in futures] == [200] * 8
    assert max(seen) == 2, seen
