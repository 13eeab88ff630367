"""One local Ray cluster (CPU only) and Serve for all integration tests; each module deploys the service config it
needs (the default one below unless it asks for another), redeploying only when the config changes. The cluster
ends with the package, before the system tests start clusters of their own."""

from pathlib import Path

import httpx
import pytest

from cluster.tiers import TierConfig
from deployments.config import ServiceConfig
from runtime.local import HEAD_RESOURCES, free_port

_deployed: dict = {}
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    """Run the modules on the default service config first and those deploying their own after them, each module's
    tests in their order: every change of config redeploys the service (about 11 s)."""
    slots = [i for i, item in enumerate(items) if item.path.parent == HERE]
    ours = [items[i] for i in slots]
    default = {item.path for item in ours if "base_url" in item.fixturenames}
    own = {item.path for item in ours} - default
    for slot, k in zip(slots, sorted(range(len(ours)), key=lambda k: (ours[k].path in own, k))):
        items[slot] = ours[k]


@pytest.fixture(scope="package")
def serve_port():
    import ray
    from ray import serve

    from runtime.local import ensure_ray_process_env

    ensure_ray_process_env()  # as every cluster the project starts: the proxy replays lost requests (deployments/proxy.py)
    # Logical CPUs, not cores: enough slots for the replicas the tests deploy on a 2-core machine.
    ray.init(address="local", num_cpus=8, resources=HEAD_RESOURCES, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield port
    _deployed.clear()
    serve.shutdown()
    ray.shutdown()


def deploy(port: int, config: ServiceConfig) -> str:
    """Serve `config` as the app "zit" (replacing whatever runs) unless it already runs; return the URL."""
    from ray import serve

    from deployments.app import build_app

    if _deployed.get("config") != config:
        serve.run(build_app(config), name="zit", route_prefix="/")
        _deployed["config"] = config
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def service_config() -> ServiceConfig:
    # max_n=2 so that n > 2 is split into chunks run in parallel by two replicas.
    return ServiceConfig(
        model="tiny",
        tiers=[TierConfig(name="cpu", num_replicas=2, num_cpus=1, profile={"max_n": 2, "max_pixels": 1024 * 1024})],
        max_prompt_chars=200,
    )


@pytest.fixture(scope="module")
def base_url(serve_port, service_config) -> str:
    return deploy(serve_port, service_config)


@pytest.fixture()
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as http:
        yield http
