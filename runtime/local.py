"""Start, reach and stop the local Ray cluster that `zit up` serves from.

Ray runs as its own processes (`ray start`), so `zit up --detach` can return and `zit down` can find it again.
Every process of one cluster must agree on RAY_AUTH_MODE; `ensure_auth_mode` sets it once for this process and the
children it starts (token auth, Ray's default, unless the operator set something else).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

# The head node's marker resource (deployments.config.ServiceConfig.ingress_resource): the ingress is placed there.
HEAD_RESOURCES = {"zit_ingress": 100.0}
# Ray's GCS port on the head. 6379 is Ray's own default, so other Ray tools find the cluster without flags.
RAY_HEAD_PORT = 6379


class RayStartFailed(RuntimeError):
    pass


def ensure_auth_mode() -> str:
    """Token auth unless RAY_AUTH_MODE says otherwise; returns the mode in force."""
    return os.environ.setdefault("RAY_AUTH_MODE", "token")


# How the Ray processes this project starts are tuned (`zit up`, `zit node`, the test fleets, Dockerfile.gpu). An
# operator's own value of any of these wins. Both measured in docs/benchmarks.md (the load section):
# - glibc gives every thread that allocates its own malloc arena (up to 8 per core), and memory freed in one arena is
#   not reused by another: Ray's processes are heavily threaded (gRPC, the core worker), so their resident memory
#   creeps up under load. Two arenas keep them flat.
# - A chunk's images (PNG, a few hundred KiB to a few MiB) and the ingress's JSON answer are bigger than Ray's 100 KiB
#   inline limit, so each went through the object store: put on the card's node, pulled by the head's raylet in
#   5 MiB chunks. Returned inline (in the reply of the call itself, up to 10 MiB, which is also Ray's limit on what
#   one reply carries inline), they skip both raylets, whose memory then no longer swings by megabytes from one
#   request to the next. Larger results still use the store.
# - Ray preloads its bundled jemalloc into the raylet, the GCS and the agents (an empty RAY_JEMALLOC_LIB_PATH turns
#   that off). Under jemalloc an idle raylet's resident memory rose about 0.1 MiB a minute without end (10 -> 16.8 MiB
#   in 72 minutes; its live heap stayed flat); under glibc with two arenas it stays flat at about 7 MiB.
RAY_PROCESS_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "RAY_max_direct_call_object_size": str(10 * 1024 * 1024),
    "RAY_JEMALLOC_LIB_PATH": "",
    # Every Serve proxy replays a request whose ingress replica died before answering (deployments/proxy.py).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy:middlewares",
}


def ensure_ray_process_env() -> None:
    """Set RAY_PROCESS_ENV for the Ray processes this process starts (they inherit its environment)."""
    for key, value in RAY_PROCESS_ENV.items():
        os.environ.setdefault(key, value)


def ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def start_head(
    *, node_ip: str = "127.0.0.1", num_cpus: int | None = None, dashboard: bool = False,
    resources: dict[str, float] | None = None, labels: dict[str, str] | None = None,
) -> bool:
    """Start a Ray head on this machine. Returns False when one is already running (and leaves it as it is)."""
    import json

    ensure_auth_mode()
    ensure_ray_process_env()
    cmd = [
        ray_executable(), "start", "--head",
        f"--port={RAY_HEAD_PORT}",
        f"--node-ip-address={node_ip}",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
        # Cards join as nodes of their own (runtime/nodes.py); the head runs the proxy, the ingress and CPU work.
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--include-dashboard={'true' if dashboard else 'false'}",
        "--dashboard-host=127.0.0.1",
    ]
    cmd.append(f"--resources={json.dumps({**HEAD_RESOURCES, **(resources or {})})}")
    if labels:
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return True
    output = proc.stdout + proc.stderr
    if "already running" in output or "already in use" in output and is_running():
        return False
    raise RayStartFailed(f"`{' '.join(cmd)}` failed:\n{output[-3000:]}")


def head_address() -> str:
    return f"127.0.0.1:{RAY_HEAD_PORT}"


def is_running() -> bool:
    """Whether a Ray cluster started on this machine is up (Ray writes its address here while it runs)."""
    ensure_auth_mode()
    marker = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    if not marker.exists():
        return False
    proc = subprocess.run([ray_executable(), "status"], capture_output=True, text=True, timeout=60)
    return proc.returncode == 0


def stop() -> None:
    """Stop every Ray process started on this machine."""
    ensure_auth_mode()
    subprocess.run([ray_executable(), "stop", "--force"], capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


