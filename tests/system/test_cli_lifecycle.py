"""The commands a newcomer types, as processes: `zit up` (default, --fleet, --cpu), the README's curl,
`zit generate`, `zit node`, `zit down`.

These start and stop whole Ray clusters with `ray start` / `ray stop`, which ends every Ray process on the machine,
so `make test` runs them in a pytest process of their own (marker `lifecycle`).
"""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from runtime.local import free_port

pytestmark = [pytest.mark.system, pytest.mark.lifecycle]

ZIT = [sys.executable, "-m", "cli.main"]


def zit(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*ZIT, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def raylets() -> int:
    out = subprocess.run(["ps", "-eo", "comm"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip() == "raylet")


def ray_nodes() -> list[dict]:
    """Alive nodes of the running cluster with their labels and resources, read by a separate driver."""
    code = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(json.dumps([{'id': n['NodeID'], 'labels': n['Labels'], 'resources': n['Resources']} "
            "for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def stop_afterwards():
    yield
    down = zit("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert raylets() == 0


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free now."""
    import random
    import socket

    for _ in range(200):
        first = random.randint(20000, 40000)
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def test_default_up_serves_the_simulated_mixed_fleet_one_replica_per_card(stop_afterwards, tmp_path, repo_root):
    port, proxies = free_port(), free_ports(5)
    up = zit("up", "--detach", "--port", str(port), "--ingress-replicas", "2", "--proxy-port-from", str(proxies))
    assert up.returncode == 0, up.stdout + up.stderr
    url = f"http://127.0.0.1:{port}"
    # 1. It says plainly what it serves on.
    assert "Serving on the SIMULATED fleet mixed.yaml" in up.stdout
    assert f"ZIT Cluster is serving at {url}" in up.stdout and "zit down" in up.stdout
    assert "ingress: 2 replica(s) (--ingress-replicas)" in up.stdout

    # 2. One replica per card, each on the Ray node of its own card and tier.
    fleet = httpx.get(f"{url}/v1/fleet", timeout=30).json()
    expected = {c["uuid"]: c["tier"] for c in json.loads(zit("fleet", "--fleet", str(repo_root / "cluster" /
                                                                                    "fleets" / "mixed.yaml"),
                                                             "--json").stdout)}
    nodes = {n["id"]: n for n in ray_nodes()}
    for _ in range(10):  # replicas report every 2 s; the first reports may still be on their way
        if len(fleet["replicas"]) == len(expected):
            break
        time.sleep(2)
        fleet = httpx.get(f"{url}/v1/fleet", timeout=30).json()
    assert len(fleet["replicas"]) == len(expected) == 5
    assert {c["uuid"] for c in fleet["cards"]} == set(expected)
    for replica in fleet["replicas"]:
        node = nodes[replica["node_id"]]
        card = replica["card"]
        assert node["labels"]["zit/card"] == card["uuid"]  # the card it reports is its node's card
        assert replica["tier"] == node["labels"]["zit/tier"] == card["tier"] == expected[card["uuid"]]
        assert node["resources"].get(replica["tier"]) == 1.0
        assert replica["simulated"] and card["memory_used"] > 0  # it holds the real model's resident weights
    assert all(c["replica"] for c in fleet["cards"])
    assert [t["replicas_running"] for t in fleet["tiers"]] == [1, 1, 1, 1, 1]

    # 3. A simulated card refuses what the real model could not hold on it: a job sent past the router straight to
    #    the 4 GB card fails with CUDA's out-of-memory message (after the replica's own degraded retry), the same
    #    size on the 24 GB card succeeds.
    code = (
        "import ray; from ray import serve; from cluster.requests import GenerationJob\n"
        "ray.init(address='auto', logging_level='ERROR')\n"
        "job = GenerationJob(prompt='x', width=1536, height=1536, steps=2, guidance_scale=0, seeds=[1, 2])\n"
        "encoded = serve.get_deployment_handle('TextEncoder', 'zit').encode.remote('x', None, False).result()\n"
        "job = job.model_copy(update={'encoded': encoded.embeddings})\n"
        "print('24GB', len(serve.get_deployment_handle('Generator_vram_24', 'zit').generate.remote(job)"
        ".result().images))\n"
        "try:\n"
        "    one = job.model_copy(update={'seeds': [1]})\n"
        "    serve.get_deployment_handle('Generator_vram_4', 'zit').generate.remote(one).result()\n"
        "except Exception as exc:\n"
        "    print('4GB', type(exc).__name__, str(exc)[-600:])\n"
    )
    direct = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "24GB 2" in direct.stdout, direct.stdout + direct.stderr
    assert "ChunkOutOfMemory" in direct.stdout and "CUDA out of memory" in direct.stdout, direct.stdout
    assert "simulated NVIDIA GeForce GTX 1650" in direct.stdout

    # 4. The README's curl, run as written (with this test's port), writes fox.png.
    readme = (repo_root / "README.md").read_text()
    curl_line = next(line for line in readme.splitlines() if line.startswith("curl ") and "generations" in line)
    curl = subprocess.run(curl_line.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert curl.returncode == 0, curl.stderr
    image = Image.open(tmp_path / "fox.png")
    assert image.format == "PNG" and image.size == (256, 256)

    # 5. zit generate writes one file per image; a bad size is refused with the reason.
    generated = zit("generate", "a red fox", "--size", "128x64", "--n", "2", "--seed", "9", "-o",
                    str(tmp_path / "out"), "--url", url)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["zit-10.png", "zit-9.png"]
    assert all(Image.open(f).size == (128, 64) for f in files)
    bad = zit("generate", "a red fox", "--size", "100x100", "--url", url)
    assert bad.returncode == 1 and "multiple of 16" in bad.stdout

    # 6. Two ingress replicas behind an HTTP proxy on the head and one on each card node (each on its own port here):
    #    an image request works through every proxy, and between them both ingress replicas answer.
    ingress = set()
    for proxy in [port, *range(proxies, proxies + 5)]:
        deadline = time.monotonic() + 90
        while True:  # a card node's proxy starts once its replica is placed
            try:
                if httpx.get(f"http://127.0.0.1:{proxy}/-/healthz", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no Serve proxy answers on port {proxy}\n{up.stdout}"
            time.sleep(1)
        response = httpx.post(f"http://127.0.0.1:{proxy}/v1/images/generations", timeout=120,
                              json={"prompt": "a red fox", "size": "64x64", "steps": 1, "seed": 5})
        assert response.status_code == 200, (proxy, response.text[:300])
        ingress.add(response.headers["x-zit-ingress"])
        ingress |= {httpx.get(f"http://127.0.0.1:{proxy}/healthz", timeout=30).json()["replica"] for _ in range(6)}
    assert len(ingress) == 2, ingress


def test_cpu_up_then_a_host_joins_its_cards_as_nodes_of_their_tiers(stop_afterwards, repo_root):
    up = zit("up", "--cpu", "--detach", "--port", str(free_port()))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "Serving on the CPU" in up.stdout
    fleet = repo_root / "cluster" / "fleets" / "mixed.yaml"
    joined = zit("node", "--address", "127.0.0.1:6379", "--fleet", str(fleet), "--host", "host-a",
                 "--node-ip", "127.0.0.1")
    assert joined.returncode == 0, joined.stdout + joined.stderr
    cards = [n for n in ray_nodes() if "zit/card" in n["labels"]]
    assert sorted(n["labels"]["zit/tier"] for n in cards) == ["vram_12", "vram_4"]
    assert all(n["resources"].get("GPU") == 1.0 and n["resources"].get(n["labels"]["zit/tier"]) == 1.0 for n in cards)
    assert {n["labels"]["zit/model"] for n in cards} == {"nvidia-geforce-gtx-1650", "nvidia-geforce-rtx-3060"}
    # The same host again, the head named without its port: its cards are in the cluster already, nothing joins.
    again = zit("node", "--address", "127.0.0.1", "--fleet", str(fleet), "--host", "host-a", "--node-ip", "127.0.0.1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("is already in the cluster") == 2 and "joined as" not in again.stdout, again.stdout
    assert len([n for n in ray_nodes() if "zit/card" in n["labels"]]) == 2


def test_down_twice_is_harmless_and_generate_without_a_service_says_to_start_one():
    again = zit("down")
    assert again.returncode == 0 and "No Ray cluster is running" in again.stdout
    result = zit("generate", "a fox", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "zit up" in result.stdout
