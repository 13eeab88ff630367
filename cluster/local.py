"""Start, reach and stop the local Ray cluster that `zit up` serves from.

Ray runs as its own processes (`ray start`), so `zit up --detach` can return and `zit down` can find it again.
Every process of one cluster must agree on RAY_AUTH_MODE; `ensure_auth_mode` sets it once for this process and the
children it starts (token auth, Ray's default, unless the operator set something else).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Ray's GCS port on the head. 6379 is Ray's own default, so other Ray tools find the cluster without flags.
RAY_HEAD_PORT = 6379


class RayStartFailed(RuntimeError):
    pass


def ensure_auth_mode() -> str:
    """Token auth unless RAY_AUTH_MODE says otherwise; returns the mode in force."""
    return os.environ.setdefault("RAY_AUTH_MODE", "token")


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
    cmd = [
        ray_executable(), "start", "--head",
        f"--port={RAY_HEAD_PORT}",
        f"--node-ip-address={node_ip}",
        f"--num-cpus={num_cpus or os.cpu_count() or 1}",
        # Cards join as nodes of their own (cluster/node.py); the head runs the proxy, the ingress and CPU work.
        "--num-gpus=0",
        "--disable-usage-stats",
        f"--include-dashboard={'true' if dashboard else 'false'}",
        "--dashboard-host=127.0.0.1",
    ]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
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
