"""`zit up --detach`, the README's curl, `zit generate`, `zit down`: the commands a newcomer types, as processes.

These start and stop a whole Ray cluster with `ray start` / `ray stop`, which ends every Ray process on the machine,
so `make test` runs them in a pytest process of their own (marker `lifecycle`).
"""

import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = [pytest.mark.system, pytest.mark.lifecycle]

ZIT = [sys.executable, "-m", "cluster.cli"]


def zit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*ZIT, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def raylets() -> int:
    out = subprocess.run(["ps", "-eo", "comm"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip() == "raylet")


@pytest.fixture()
def running_service(tmp_path):
    from tests.integration.conftest import free_port

    port = free_port()
    up = zit("up", "--detach", "--port", str(port))
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield port, up.stdout
    finally:
        down = zit("down")
        assert down.returncode == 0, down.stdout + down.stderr


def test_up_curl_generate_down(running_service, tmp_path, repo_root):
    port, up_output = running_service
    url = f"http://127.0.0.1:{port}"
    assert f"ZIT Cluster is serving at {url}" in up_output
    assert "zit down" in up_output

    # The README's curl, run as written (with this test's port): it writes fox.png.
    readme = (repo_root / "README.md").read_text()
    curl_line = next(line for line in readme.splitlines() if line.startswith("curl ") and "generations" in line)
    curl = subprocess.run(curl_line.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert curl.returncode == 0, curl.stderr
    image = Image.open(tmp_path / "fox.png")
    assert image.format == "PNG" and image.size == (256, 256)

    generated = zit("generate", "a red fox", "--size", "128x64", "--n", "2", "--seed", "9", "-o", str(tmp_path / "out"),
                    "--url", url)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["zit-10.png", "zit-9.png"]
    assert all(Image.open(f).size == (128, 64) for f in files)

    bad = zit("generate", "a red fox", "--size", "100x100", "--url", url)
    assert bad.returncode == 1 and "multiple of 16" in bad.stdout


def test_down_stops_every_ray_process(tmp_path):
    from tests.integration.conftest import free_port

    up = zit("up", "--detach", "--port", str(free_port()))
    assert up.returncode == 0, up.stdout + up.stderr
    assert raylets() >= 1
    down = zit("down")
    assert down.returncode == 0 and "Stopped." in down.stdout
    assert raylets() == 0
    again = zit("down")
    assert again.returncode == 0 and "No Ray cluster is running" in again.stdout


def test_generate_without_a_service_says_to_start_one(tmp_path):
    from tests.integration.conftest import free_port

    result = zit("generate", "a fox", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "zit up" in result.stdout
