"""LoRA adapters over real HTTP: the operator's folder only, chosen per request, loaded on demand through Serve's
model multiplexing (requests for an adapter go to the replica that holds it), the A1111 prompt syntax."""

import base64
import io
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from cluster.pipeline import models_dir, resolve_model
from cluster.tiers import TierConfig
from cluster.tiny_model import ensure_tiny_loras
from deployments.config import ServiceConfig
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration

GENERATE = "/v1/images/generations"
BODY = {"prompt": "a fox in the snow", "size": "128x128", "steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """The tiny model's two adapters, plus a secret beside the folder and a link in it pointing at the secret."""
    root = tmp_path_factory.mktemp("lora-root")
    folder = root / "loras"
    folder.mkdir()
    for adapter in ensure_tiny_loras(models_dir(), resolve_model("tiny")).iterdir():
        (folder / adapter.name).write_bytes(adapter.read_bytes())
    (root / "secret.safetensors").write_bytes((folder / "tiny-ink.safetensors").read_bytes())
    os.symlink(root / "secret.safetensors", folder / "escape.safetensors")
    # More adapters (each test that needs a fresh one has its own), and a link to a file in a subfolder (allowed).
    for copy in ("tiny-ink-copy", "tiny-ink-three"):
        (folder / f"{copy}.safetensors").write_bytes((folder / "tiny-ink.safetensors").read_bytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.safetensors").write_bytes((folder / "tiny-glow.safetensors").read_bytes())
    os.symlink(folder / "sub" / "deep.safetensors", folder / "deeplink.safetensors")
    return folder


@pytest.fixture(scope="module")
def url(serve_port, lora_dir):
    config = ServiceConfig(tiers=[TierConfig(name="cpu", num_replicas=2, num_cpus=1)], lora_dir=str(lora_dir),
                           lora_slots=1)
    return deploy(serve_port, config)


def generate(url: str, **change) -> dict:
    response = httpx.post(url + GENERATE, json={**BODY, **change}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def pixels(payload: dict) -> np.ndarray:
    data = base64.b64decode(payload["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def test_the_folder_is_listed_with_sizes_and_nothing_outside_it(url):
    listing = httpx.get(url + "/v1/loras", timeout=30).json()
    assert listing["enabled"] is True and listing["slots"] == 1
    by_name = {a["name"]: a for a in listing["data"]}
    assert sorted(by_name) == ["deeplink", "tiny-glow", "tiny-ink", "tiny-ink-copy", "tiny-ink-three"]
    assert by_name["tiny-glow"]["params"] == 2 * by_name["tiny-ink"]["params"] > 0  # rank 8 vs rank 4
    assert listing["reserve_params"] == by_name["tiny-glow"]["params"]
    a1111 = httpx.get(url + "/sdapi/v1/loras", timeout=30).json()
    assert sorted(a["name"] for a in a1111) == sorted(by_name) and all(a["path"] is None for a in a1111)


def test_an_adapter_changes_the_image_reproducibly_and_scale_zero_is_the_base_model(url):
    base = pixels(generate(url))
    ink = pixels(generate(url, lora="tiny-ink"))
    assert np.abs(ink - base).mean() > 1.0
    assert np.array_equal(pixels(generate(url, lora="tiny-ink")), ink)
    glow = pixels(generate(url, lora="tiny-glow", lora_scale=0.5))
    assert np.abs(glow - ink).mean() > 1.0
    assert np.abs(pixels(generate(url, lora="tiny-ink", lora_scale=0.0)) - base).max() <= 1
    assert np.array_equal(pixels(generate(url)), base)  # a request without LoRA after one with it: the base model


@pytest.mark.parametrize("name, says", [
    ("../secret", "no paths"),
    ("/etc/passwd", "no paths"),
    ("loras/tiny-ink", "no paths"),
    ("..", "no paths"),
    ("escape", "outside the LoRA folder"),
    ("tiny-inc", "available: deeplink, tiny-glow, tiny-ink, tiny-ink-copy, tiny-ink-three"),
    ("tiny-ink\n", "no paths"),
])
def test_names_that_leave_the_folder_or_do_not_exist_get_422(url, name, says):
    response = httpx.post(url + GENERATE, json={**BODY, "lora": name}, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "lora" and says in error["message"]


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(url):
    # An adapter no earlier test used, so exactly one replica holds it after the first request.
    first = generate(url, lora="tiny-ink-copy", seed=100)["metadata"]["chunks"][0]["replica"]
    # Serve learns which replica holds which adapter from the replicas' reports (pushed on load).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        fleet = httpx.get(url + "/v1/fleet", timeout=30).json()
        holders = [r["replica"] for r in fleet["replicas"] if "tiny-ink-copy" in r.get("loras", [])]
        if holders == [first]:
            break
        time.sleep(0.5)
    assert holders == [first]
    time.sleep(1.5)
    replicas = {generate(url, lora="tiny-ink-copy", seed=101 + i)["metadata"]["chunks"][0]["replica"]
                for i in range(12)}
    assert replicas == {first}


def test_a1111_prompt_tags_pick_the_adapter_and_weight(url):
    openai = pixels(generate(url, lora="tiny-ink", lora_scale=0.8, seed=7))
    body = {"prompt": f"{BODY['prompt']} <lora:tiny-ink:0.8>", "steps": 2, "width": 128, "height": 128, "seed": 7}
    response = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))).astype(int)
    assert np.array_equal(image, openai)
    two = httpx.post(url + "/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:tiny-ink:1> <lora:tiny-glow:1>"},
                     timeout=60)
    assert two.status_code == 422 and "one LoRA per request" in two.json()["error"]["message"]
    escape = httpx.post(url + "/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:../secret:1>"}, timeout=60)
    assert escape.status_code == 422 and "no paths" in escape.json()["error"]["message"]


def test_a_link_to_a_file_in_a_subfolder_serves_that_file(url):
    assert np.array_equal(pixels(generate(url, lora="deeplink", seed=21)), pixels(generate(url, lora="tiny-glow",
                                                                                            seed=21)))


def test_one_slot_keeps_one_adapter_per_replica(url):
    """Adapters in turn on two replicas of one slot each: the replica that took a fresh one evicted what it held."""
    for name in ("tiny-ink", "tiny-glow", "tiny-ink-three"):
        last = generate(url, lora=name, seed=5)["metadata"]["chunks"][0]["replica"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the registry's reports come every 2 s
        held = {r["replica"]: r.get("loras", []) for r in httpx.get(url + "/v1/fleet", timeout=30).json()["replicas"]}
        if "tiny-ink-three" in held.get(last, []):
            break
        time.sleep(0.5)
    assert held[last] == ["tiny-ink-three"]
    assert all(len(names) <= 1 for names in held.values())


def test_without_a_folder_lora_is_a_422_that_says_so(serve_port):
    plain = deploy(serve_port, ServiceConfig(tiers=[TierConfig(name="cpu")]))
    assert httpx.get(plain + "/v1/loras", timeout=30).json() == {"enabled": False, "data": []}
    response = httpx.post(plain + GENERATE, json={**BODY, "lora": "tiny-ink"}, timeout=60)
    assert response.status_code == 422 and "no LoRA folder" in response.json()["error"]["message"]
