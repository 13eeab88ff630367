"""The service over real HTTP on a real local Ray Serve with the tiny ZImagePipeline."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

GENERATE = "/v1/images/generations"


def images_of(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_returns_n_pngs_of_the_requested_size(client):
    response = client.post(GENERATE, json={"prompt": "a red fox", "size": "256x192", "n": 2, "seed": 11})
    images = images_of(response)
    assert [im.format for im in images] == ["PNG", "PNG"]
    assert [im.size for im in images] == [(256, 192), (256, 192)]
    assert [item["seed"] for item in response.json()["data"]] == [11, 12]
    assert response.json()["created"] > 0


def test_same_seed_gives_the_same_image_and_other_seeds_differ(client):
    body = {"prompt": "a lighthouse at dusk", "size": "128x128", "seed": 42}
    first = pixels(images_of(client.post(GENERATE, json=body))[0])
    again = pixels(images_of(client.post(GENERATE, json=body))[0])
    other = pixels(images_of(client.post(GENERATE, json={**body, "seed": 43}))[0])
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 5


def test_large_n_is_split_across_replicas_and_returned_in_seed_order(client):
    response = client.post(GENERATE, json={"prompt": "a red fox", "size": "128x128", "n": 5, "seed": 100})
    images = images_of(response)
    meta = response.json()["metadata"]
    assert [item["seed"] for item in response.json()["data"]] == [100, 101, 102, 103, 104]
    assert [chunk["seeds"] for chunk in meta["chunks"]] == [[100, 101], [102, 103], [104]]
    assert len({chunk["replica"] for chunk in meta["chunks"]}) == 2  # both replicas took part
    # The fourth image equals the same seed generated alone (to float rounding).
    alone = pixels(images_of(client.post(GENERATE, json={"prompt": "a red fox", "size": "128x128", "seed": 103}))[0])
    assert np.abs(pixels(images[3]) - alone).max() <= 1


def test_url_response_serves_the_image(client):
    response = client.post(GENERATE, json={"prompt": "a red fox", "size": "128x128", "response_format": "url",
                                           "output_format": "webp"})
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith(str(client.base_url).rstrip("/") + "/v1/images/") and url.endswith(".webp")
    image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(image.content)).size == (128, 128)
    missing = client.get("/v1/images/nothing-here.png")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_other_output_formats(client, fmt):
    image = images_of(client.post(GENERATE, json={"prompt": "x", "size": "64x64", "output_format": fmt}))[0]
    assert image.format == fmt.upper()


@pytest.mark.parametrize(
    "body, param, says",
    [
        ({"prompt": "a fox", "size": "1000x1024"}, "size", "multiple of 16"),
        ({"prompt": "a fox", "size": "4096x4096"}, "size", "between 64 and 2048"),
        ({"prompt": "a fox", "size": "wide"}, "size", "look like '1024x1024'"),
        ({"prompt": "a fox", "n": 11}, "n", "less than or equal to 10"),
        ({"prompt": "a fox", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "a fox", "steps": 51}, "steps", "less than or equal to 50"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "x" * 201}, "prompt", "shorten it to at most 200"),
        ({"prompt": "a fox", "negative_prompt": "x" * 201}, "negative_prompt", "shorten it to at most 200"),
        ({"prompt": "a fox", "n": True}, "n", "valid integer, got true"),
        ({"size": "64x64"}, "prompt", "prompt is required"),
        ({"prompt": "a fox", "sampler": "euler"}, "sampler", "unknown field 'sampler'"),
        ({"prompt": "a fox", "model": "dall-e-3"}, "model", "use 'z-image-turbo'"),
        ({"prompt": "a fox", "response_format": "bmp"}, "response_format", "b64_json"),
        ({"prompt": "a fox", "seed": 2**32 - 1, "n": 2}, "seed", "lower seed"),
    ],
)
def test_bad_requests_get_422_saying_what_to_change(client, body, param, says):
    response = client.post(GENERATE, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert says in error["message"]


def test_request_too_large_for_every_tier_gets_422_with_the_largest_each_accepts(client):
    response = client.post(GENERATE, json={"prompt": "a fox", "size": "2048x1024"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "size"
    assert "no tier can generate 2048x1024" in error["message"]
    assert "above profile cpu's max_pixels 1048576" in error["message"]
    assert "'side_at_n1': 1024" in error["message"]  # the largest square it does accept


def test_malformed_json_and_huge_body_are_refused(client):
    response = client.post(GENERATE, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]["message"]
    response = client.post(GENERATE, content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert response.status_code == 413
    # Without a Content-Length (chunked), the body is counted as it arrives.
    response = client.post(GENERATE, content=(b" " * (64 << 10) for _ in range(48)),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_service_keeps_serving_after_bad_requests(client):
    for body in ({"prompt": ""}, {"prompt": "a", "size": "17x17"}, {"prompt": "a", "n": 99}):
        assert client.post(GENERATE, json=body).status_code == 422
    assert len(images_of(client.post(GENERATE, json={"prompt": "still here", "size": "64x64"}))) == 1


def test_openai_only_fields_are_ignored(client):
    response = client.post(GENERATE, json={"prompt": "a fox", "size": "64x64", "quality": "hd", "style": "vivid",
                                           "user": "someone", "model": "z-image-turbo"})
    assert len(images_of(response)) == 1


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "z-image-turbo"
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["tiers"] == ["cpu"]


def test_an_abandoned_request_frees_its_replica(client, base_url):
    """The client gives up after 1.5 s on a job of several seconds: the pipeline stops at its next step, so both
    replicas are idle again long before the job would have ended."""
    import time

    import httpx

    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(base_url + GENERATE, json={"prompt": "long", "size": "1024x1024", "n": 2, "steps": 50},
                   timeout=1.5)
    full_job_s = 2 * 50 / 9 * 1.5  # about 1.5 s per 9-step 1024x1024 image on this machine's tiny model
    deadline = started + full_job_s / 2
    while time.monotonic() < deadline:
        replicas = client.get("/v1/fleet").json()["replicas"]
        if replicas and not any(r["busy"] for r in replicas) and time.monotonic() - started > 4:
            break
        time.sleep(0.5)
    replicas = client.get("/v1/fleet").json()["replicas"]
    assert replicas and not any(r["busy"] for r in replicas), replicas
    assert time.monotonic() < deadline


def test_the_endpoints_whose_metrics_start_at_zero_are_the_services_image_routes(client):
    from deployments.metrics import IMAGE_ENDPOINTS

    paths = set(client.get("/openapi.json").json()["paths"])
    assert set(IMAGE_ENDPOINTS) <= paths, set(IMAGE_ENDPOINTS) - paths
