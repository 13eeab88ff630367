"""One local Ray cluster (CPU only) and one deployed service per test module (system tests start their own)."""

import httpx
import pytest

from cluster.local import HEAD_RESOURCES, free_port
from cluster.tiers import TierConfig
from deployments.config import ServiceConfig


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # Logical CPUs, not cores: enough slots for the replicas the tests deploy on a 2-core machine.
    ray.init(num_cpus=8, resources=HEAD_RESOURCES, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def service_config() -> ServiceConfig:
    # max_n=2 so that n > 2 is split into chunks run in parallel by two replicas.
    return ServiceConfig(
        model="tiny",
        tiers=[TierConfig(name="cpu", num_replicas=2, num_cpus=1, profile={"max_n": 2, "max_pixels": 1024 * 1024})],
        max_prompt_chars=200,
    )


@pytest.fixture(scope="module")
def base_url(ray_cluster, service_config) -> str:
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(service_config), name="zit", route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as http:
        yield http
