"""Two ingress replicas behind one proxy: an image returned as a URL is served by either of them (one image store
for the service), and every request is answered whichever replica the proxy picks."""

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
