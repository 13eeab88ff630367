"""Simulated fleets as real multi-node Ray clusters in the test process (runtime.simfleet.fleet_cluster), one per
test module (the modules on the mixed fleet share one, run one after the other), and the helpers to deploy the
service on them."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from cluster.tiers import tiers_for_cards
from deployments.config import ServiceConfig, TextEncoderSettings
from runtime.simfleet import active_stage, fleet_cluster

FLEETS = Path(__file__).resolve().parents[2] / "cluster" / "fleets"
TEST_FLEETS = Path(__file__).resolve().parent / "fleets"


def deploy(cards, port: int, configured=None, **settings) -> str:
    """Deploy the service for these cards (replacing any running one) and return its URL; the text-encoder stage
    where the fleet cluster placed it (as `zit up` does), unless `settings` say otherwise."""
    from ray import serve

    from deployments.app import build_app

    settings.setdefault("text_encoder", TextEncoderSettings().resolve(active_stage()))
    config = ServiceConfig(tiers=tiers_for_cards(cards, configured), **settings)
    serve.run(build_app(config), name="zit", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def deploy_once(mixed_fleet, configured=None, **settings) -> str:
    """deploy() on the shared mixed-fleet cluster, unless the same service already runs there: a redeploy restarts
    every replica (about a minute on this fleet), so the modules that can share one service do."""
    cards, port = mixed_fleet
    key = repr((configured, sorted(settings.items())))
    if _shared.get("deployed") != key:
        _shared.pop("deployed", None)
        deploy(cards, port, configured, **settings)
        _shared["deployed"] = key
    return f"http://127.0.0.1:{port}"


def tiny_lora_dir() -> str:
    """The tiny model's LoRA folder (built offline on first use): the shared service has it, for the web UI."""
    from cluster.pipeline import models_dir, resolve_model
    from cluster.tiny_model import ensure_tiny_loras

    return str(ensure_tiny_loras(models_dir(), resolve_model("tiny")))


def wait_for_replicas(url: str, count: int, timeout_s: float = 60) -> dict:
    """GET /v1/fleet until `count` replicas have reported."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        fleet = httpx.get(f"{url}/v1/fleet", timeout=30).json()
        if len(fleet["replicas"]) >= count or time.monotonic() > deadline:
            return fleet
        time.sleep(1)


def wait_for_policy(url: str, tier_policy: str, in_tier_router: str, reads: int = 3, timeout_s: float = 60) -> None:
    """GET /v1/fleet until `reads` answers in a row come from an ingress with this routing: after a redeploy the
    proxy may still hand a request or two to the ingress being replaced."""
    import time

    deadline, seen = time.monotonic() + timeout_s, 0
    while seen < reads:
        routing = httpx.get(f"{url}/v1/fleet", timeout=30).json().get("routing")
        seen = seen + 1 if routing == {"tier_policy": tier_policy, "in_tier_router": in_tier_router} else 0
        assert time.monotonic() < deadline, f"the ingress still routes with {routing}"
        time.sleep(0.5)


# The mixed fleet's cluster, kept from one module that uses `mixed_fleet` to the next (starting one takes about a
# minute); each module deploys the service it needs on it.
_shared: dict = {}


def _end_shared_cluster() -> None:
    stack = _shared.pop("stack", None)
    _shared.clear()
    if stack is not None:
        stack.close()


def _uses_mixed_fleet(item) -> bool:
    return "mixed_fleet" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    """The modules on the mixed fleet run last, one after the other, so they share its cluster (and its service, see
    deploy_once), and the tests marked `redeploys` (a service of their own) after all of them; the others keep
    their order, and each module's tests theirs."""
    here = Path(__file__).resolve().parent
    ours = [i for i, item in enumerate(items) if item.path.parent == here]
    shared = {items[i].path for i in ours if _uses_mixed_fleet(items[i])}
    def rank(item) -> int:  # 0: shares the service; 1, 2, ...: `redeploys(order=...)`, in that order
        marker = item.get_closest_marker("redeploys")
        return 0 if marker is None else marker.kwargs.get("order", 1)

    order = sorted(ours, key=lambda i: (items[i].path in shared, rank(items[i]), i))
    moved = [items[i] for i in order]
    for slot, item in zip(ours, moved):
        items[slot] = item


def pytest_sessionfinish(session):
    _end_shared_cluster()


_next: dict = {}  # the item the runner goes on to after the one it tears down (None after the last)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    _next["item"] = nextitem


@pytest.fixture(scope="module", autouse=True)
def _one_cluster_at_a_time(request):
    """A module that does not use the mixed fleet ends its shared cluster first (one process runs one Ray cluster),
    and the last stretch of tests that uses it ends it after itself (the tests after it must not see its simulated
    cards). A module's tests may come in two stretches (a `redeploys` test runs after the other modules')."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.path == request.path]
    if not any(_uses_mixed_fleet(items[i]) for i in mine):
        _end_shared_cluster()
    yield
    following = _next.get("item")
    rest = items[items.index(following):] if following in items else []
    if not any(_uses_mixed_fleet(item) for item in rest):
        _end_shared_cluster()


@pytest.fixture(scope="module")
def mixed_fleet():
    """The mixed fleet's cluster, at the fault scenario's time scale (bench/faults.py; test_faults.py runs on it
    last): a 1024x1024 chunk on the RTX 3070 takes about half a second."""
    from bench.faults import TIME_SCALE

    if "fleet" not in _shared:
        stack = ExitStack()
        _shared["fleet"] = stack.enter_context(fleet_cluster(FLEETS / "mixed.yaml", {"ZIT_SIM_TIME_SCALE": TIME_SCALE}))
        _shared["stack"] = stack
    yield _shared["fleet"]
