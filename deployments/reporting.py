"""How a replica of ours (a Generator, a text-encoder stage) tells the fleet registry it exists: who it is, a report
every ZIT_FLEET_REPORT_PERIOD_S from a daemon thread (never from the request path), and a goodbye when Serve stops
it on purpose, so its silence is not read as a failure."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

logger = logging.getLogger("ray.serve")

# How long a stopping replica waits for the fleet registry to take its goodbye.
GOODBYE_WAIT_S = 2.0


def replica_name() -> str:
    """Serve's id of this replica; host-pid outside Serve (unit tests, benchmarks)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"{socket.gethostname()}-{os.getpid()}"


def in_ray() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    if not in_ray():
        return None
    import ray

    return ray.get_runtime_context().get_node_id()


def start_reporting(describe: Callable[[], dict], stop: threading.Event) -> None:
    """Send `describe()` to the fleet registry now and every period until `stop` is set (outside Ray: nothing)."""
    if not in_ray():
        return
    from deployments.registry import ZIT_FLEET_REPORT_PERIOD_S, get_registry

    registry = get_registry()

    def loop() -> None:
        while True:
            try:
                registry.report.remote(describe())
            except Exception:
                logger.exception("fleet report failed")
            if stop.wait(ZIT_FLEET_REPORT_PERIOD_S):
                break  # stopping: the replica has said goodbye

    threading.Thread(target=loop, name="zit-fleet-report", daemon=True).start()


def say_goodbye(replica: str) -> None:
    """Tell the registry that `replica` stops on purpose, waiting briefly: the process ends soon after, and a lost
    goodbye would look like a failed card."""
    if not in_ray():
        return
    import ray

    from deployments.registry import get_registry

    try:
        ray.wait([get_registry().forget.remote(replica)], timeout=GOODBYE_WAIT_S)
    except Exception:
        logger.warning("could not tell the fleet registry that replica %s stops", replica, exc_info=True)
