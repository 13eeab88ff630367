"""The AUTOMATIC1111 API (/sdapi/v1) with requests shaped the way A1111 clients send them."""

import base64
import io
import json
import threading
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

TXT2IMG = "/sdapi/v1/txt2img"

# What the `webuiapi` client and A1111's own API docs send by default (the hires-fix and sampler-noise knobs
# included), at a size the tiny model makes quickly.
CLIENT_DEFAULTS = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "prompt": "a red fox in the snow", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "scheduler": "Automatic",
    "batch_size": 1, "n_iter": 1, "steps": 4, "cfg_scale": 7.0, "width": 128, "height": 96,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
    "negative_prompt": "blurry", "eta": 1.0, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [],
    "sampler_index": "Euler a", "script_name": None, "send_images": True, "save_images": False,
    "alwayson_scripts": {},
}


def pngs(payload: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(image))) for image in payload["images"]]


def test_client_default_payload_gives_pngs_parameters_and_info(client):
    response = client.post(TXT2IMG, json=CLIENT_DEFAULTS)
    assert response.status_code == 200, response.text
    payload = response.json()
    images = pngs(payload)
    assert [(im.format, im.size) for im in images] == [("PNG", (128, 96))]
    assert payload["parameters"]["prompt"] == "a red fox in the snow"
    assert payload["parameters"]["sampler_name"] == "Euler a"  # echoed as received
    info = json.loads(payload["info"])
    assert info["width"] == 128 and info["height"] == 96 and info["steps"] == 4
    assert info["seed"] == info["all_seeds"][0] and info["seed"] >= 0  # -1 became a random seed
    assert info["cfg_scale"] == 7.0 and info["guidance_scale"] == 6.0
    assert "Seed: %d" % info["seed"] in info["infotexts"][0]


def test_batch_size_times_n_iter_images_with_consecutive_seeds(client):
    body = {"prompt": "a lighthouse", "seed": 500, "batch_size": 2, "n_iter": 2, "steps": 2, "width": 64,
            "height": 64}
    payload = client.post(TXT2IMG, json=body).json()
    assert len(pngs(payload)) == 4
    info = json.loads(payload["info"])
    assert info["all_seeds"] == [500, 501, 502, 503] and info["batch_size"] == 2 and info["n_iter"] == 2


def test_same_seed_through_a1111_and_openai_gives_the_same_image(client):
    a1111 = client.post(TXT2IMG, json={"prompt": "a red fox", "seed": 7, "steps": 3, "width": 64, "height": 64,
                                       "cfg_scale": 1})
    openai = client.post("/v1/images/generations", json={"prompt": "a red fox", "seed": 7, "steps": 3,
                                                         "size": "64x64"})
    assert a1111.json()["images"][0] == openai.json()["data"][0]["b64_json"]


def test_send_images_false_returns_no_images(client):
    payload = client.post(TXT2IMG, json={"prompt": "a fox", "steps": 1, "width": 64, "height": 64,
                                         "send_images": False}).json()
    assert payload["images"] == [] and json.loads(payload["info"])["all_seeds"]


@pytest.mark.parametrize(("change", "says"), [
    ({"width": 500}, "width: must be a multiple of 16 here (A1111 allows 8); got 500 (try 496 or 512)"),
    ({"steps": 0}, "steps"),
    ({"batch_size": 4, "n_iter": 3}, "batch_size x n_iter must be at most 10; got 4 x 3 = 12"),
    ({"enable_hr": True}, "hires fix is not supported; set enable_hr to false"),
    ({"alwayson_scripts": {"controlnet": {"args": []}}}, "extensions are not supported"),
    ({"init_images": ["abc"]}, "unknown field 'init_images'"),
    ({"prompt": "  "}, "prompt must not be empty"),
    ({"negative_prompt": "x" * 201}, "negative_prompt is 201 characters; shorten it to at most 200"),
])
def test_bad_input_is_422_saying_what_to_change(client, change, says):
    response = client.post(TXT2IMG, json={**CLIENT_DEFAULTS, **change})
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]


def test_models_and_options_name_the_served_model(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["z-image-turbo"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "z-image-turbo"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "z-image-turbo"}).status_code == 200
    other = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdxl.safetensors"})
    assert other.status_code == 422 and "z-image-turbo" in other.json()["error"]["message"]
    assert client.get("/sdapi/v1/samplers").json()[0]["name"] == "Euler"


def test_progress_is_idle_then_reports_the_running_job(client):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    body = {"prompt": "a slow fox", "steps": 40, "width": 512, "height": 512, "force_task_id": "task-a1111-1"}
    done = {}
    worker = threading.Thread(target=lambda: done.update(r=client.post(TXT2IMG, json=body)))
    worker.start()
    seen = []
    while worker.is_alive():
        state = client.get("/sdapi/v1/progress").json()
        if state["state"]["job"] == "task-a1111-1":
            seen.append((state["progress"], state["state"]["sampling_step"], state["state"]["sampling_steps"]))
        time.sleep(0.1)
    worker.join()
    assert done["r"].status_code == 200
    assert seen, "the progress endpoint never showed the running job"
    assert all(steps == 40 for _, _, steps in seen)
    assert any(0 < fraction < 1 for fraction, _, _ in seen)
    assert [step for _, step, _ in seen] == sorted(step for _, step, _ in seen)
    internal = client.get("/internal/progress", params={"id_task": "task-a1111-1"}).json()
    assert internal["completed"] is True
