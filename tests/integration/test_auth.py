"""API keys and rate limits over real HTTP on a local Ray Serve."""

import httpx
import pytest

from cluster.tiers import TierConfig
from deployments.config import ServiceConfig
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration

KEY = "zit-test-key-" + "k" * 24
OTHER = "zit-other-key-" + "o" * 24
GENERATE = "/v1/images/generations"
BODY = {"prompt": "a fox", "size": "64x64", "steps": 1}


@pytest.fixture(scope="module")
def url(serve_port, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"ci:{KEY}\nother:{OTHER}\n")
    config = ServiceConfig(tiers=[TierConfig(name="cpu")], api_keys_file=str(keys), rate_limit_per_minute=4)
    return deploy(serve_port, config)


def test_requests_without_a_valid_key_get_401(url):
    for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key-wrong"}, {"Authorization": KEY}):
        response = httpx.post(url + GENERATE, json=BODY, headers=headers, timeout=60)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["error"]["message"]
    assert httpx.get(url + "/v1/fleet", timeout=60).status_code == 401


def test_health_stays_open_for_load_balancers(url):
    assert httpx.get(url + "/healthz", timeout=60).status_code == 200


def test_a_key_works_until_its_rate_limit_then_429_with_retry_after(url):
    headers = {"Authorization": f"Bearer {KEY}"}
    statuses = [httpx.post(url + GENERATE, json=BODY, headers=headers, timeout=120).status_code for _ in range(5)]
    assert statuses[:4] == [200] * 4 and statuses[4] == 429
    limited = httpx.post(url + GENERATE, json=BODY, headers=headers, timeout=60)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    # Another key has its own budget.
    assert httpx.post(url + GENERATE, json=BODY, headers={"Authorization": f"Bearer {OTHER}"},
                      timeout=120).status_code == 200


def test_keys_never_reach_logs_or_metrics(url):
    """After good, wrong and rate-limited calls, no key (right or wrong) is in any Ray log file or in /metrics."""
    import time
    from pathlib import Path

    import ray

    wrong = "zit-wrong-key-" + "w" * 24
    for key in (KEY, wrong, OTHER):
        httpx.post(url + GENERATE, json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    httpx.get(url + "/v1/fleet", headers={"Authorization": f"Bearer {wrong}"}, timeout=60)
    time.sleep(2)  # log lines are flushed by the workers and the log monitor
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("Ingress" in p.name for p in files), "the ingress replica's log is where a leak would show"
    for path in files:
        text = path.read_bytes()
        for key in (KEY, OTHER, wrong):
            assert key.encode() not in text, f"an API key is in {path}"
    metrics = httpx.get(url + "/metrics", timeout=60).text
    assert "zit_requests_total" in metrics
    assert all(key not in metrics for key in (KEY, OTHER, wrong))
