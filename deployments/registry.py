"""The fleet registry: a small Ray actor where every Generator replica reports what it runs on, every few seconds.

`GET /v1/fleet` joins these reports with the card nodes Ray knows (their labels), so operators and the web UI see
every card, its tier, its memory, and the replica on it, including cards whose replica is missing.
"""

from __future__ import annotations

import os
import time

REGISTRY_NAME = "zit-fleet-registry"
REGISTRY_NAMESPACE = "zit"
# Replicas report this often. Two seconds keeps the fleet view live for people while costing nothing measurable.
ZIT_FLEET_REPORT_PERIOD_S = float(os.environ.get("ZIT_FLEET_REPORT_PERIOD_S", "2.0"))
# The resource Ray gives the head node alone ("node:" + "__internal_head__").
HEAD_NODE_RESOURCE = "node:__internal_head__"
# A replica not heard from for three periods is listed as gone (it died or was scaled down).
STALE_AFTER_PERIODS = 3
# How long the id of a replica that stopped on purpose is kept, to drop its reports that arrive after its goodbye.
GONE_KEPT_S = 600.0


class FleetRegistry:
    def __init__(self):
        self._reports: dict[str, tuple[float, dict]] = {}
        self._gone: dict[str, float] = {}  # replicas that stopped on purpose -> when (their late reports are dropped)
        # Per card (so bounded by the fleet): its latest report from any replica, and when a replica on it last
        # stopped on purpose (Serve scaled the tier down, or to zero).
        self._card_seen: dict[str, float] = {}
        self._card_retired: dict[str, float] = {}
        self._ingress = None  # deployments.metrics.ServiceTotals, on the first ingress_metrics call

    def ingress_metrics(self, replica: str, snapshot: dict, group: str | None = None) -> dict:
        """An ingress replica's per-request series (ServiceMetrics.snapshot) in; the whole service's sums out
        (deployments/metrics.py ServiceTotals), so GET /metrics on any ingress replica reads every replica's, with
        how many replicas of its `group` (its configuration) run."""
        return self._totals().update(replica, snapshot, time.time(), group)

    def ingress_gone(self, replica: str) -> None:
        """An ingress replica stops on purpose: it shares no limits from now on; its counts stay in the sums."""
        self._totals().gone(replica, time.time())

    def _totals(self):
        if self._ingress is None:
            from deployments.metrics import ServiceTotals

            self._ingress = ServiceTotals(stale_s=ZIT_FLEET_REPORT_PERIOD_S * STALE_AFTER_PERIODS)
        return self._ingress

    def report(self, info: dict) -> None:
        if info["replica"] in self._gone:
            return  # a late report of a replica that already said goodbye (calls may arrive out of order)
        now = time.time()
        self._reports[info["replica"]] = (now, info)
        uuid = (info.get("card") or {}).get("uuid")
        if uuid:
            self._card_seen[uuid] = now

    def forget(self, replica: str) -> None:
        """The replica stops on purpose: it leaves the fleet now, and its card's silence is no fault."""
        now = time.time()
        _, info = self._reports.pop(replica, (None, {}))
        self._gone[replica] = now
        card = (info or {}).get("card") or {}
        if card.get("uuid") and not card.get("error"):  # a failed card stays failed, whoever stops its replica
            self._card_retired[card["uuid"]] = now

    def replicas(self, max_age_s: float | None = None) -> list[dict]:
        max_age_s = max_age_s or ZIT_FLEET_REPORT_PERIOD_S * STALE_AFTER_PERIODS
        now = time.time()
        for replica, (seen, _) in list(self._reports.items()):
            if now - seen > 10 * max_age_s:  # long gone: drop for good
                del self._reports[replica]
        for replica, when in list(self._gone.items()):
            if now - when > GONE_KEPT_S:
                del self._gone[replica]
        return [
            {**info, "last_report_s": round(now - seen, 2)}
            for seen, info in self._reports.values()
            if now - seen <= max_age_s
        ]

    def retired_cards(self) -> list[str]:
        """Cards whose replica stopped on purpose after the card's latest report from any replica (a tier scaled
        down or to zero): no replica is meant to run there now. A card a newer replica reported from is not one."""
        return sorted(uuid for uuid, when in self._card_retired.items() if when >= self._card_seen.get(uuid, 0.0))


def cluster_actor(cls, name: str, namespace: str = REGISTRY_NAMESPACE):
    """The cluster's one actor of `cls` named `name`, created on first use (detached: it outlives any one replica;
    restarted if it dies), on the head node: a card node can die with its card, the head only with the whole
    service (its marker resource, as Ray Train places its own state actor).

    Calls run one at a time but in the order they arrive, not the order each caller sent them: an in-order actor
    stalls every later call of a caller for 30 s when one of its fire-and-forget calls is lost under load (Ray's
    "Timed out waiting for seq_no"), and these actors' calls are independent updates and reads. Their calls are
    not recorded as task events: several a second per running card would only fill the GCS's event table."""
    import ray

    return (
        ray.remote(cls)
        .options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached", num_cpus=0,
                 resources={HEAD_NODE_RESOURCE: 0.001}, max_restarts=-1, allow_out_of_order_execution=True,
                 enable_task_events=False)
        .remote()
    )


def get_registry():
    return cluster_actor(FleetRegistry, REGISTRY_NAME)


def card_nodes() -> list[dict]:
    """Every Ray node that is a card (has a zit/card label), alive or not, from Ray's node table."""
    import ray

    from runtime.nodes import LABEL_CARD

    nodes = []
    for node in ray.nodes():
        labels = node.get("Labels") or {}
        if LABEL_CARD in labels:
            nodes.append({"node_id": node["NodeID"], "alive": bool(node.get("Alive")), "labels": labels,
                          "resources": node.get("Resources", {})})
    return nodes
