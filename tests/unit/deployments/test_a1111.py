"""The A1111 txt2img request (deployments/a1111.py) without Ray: what a real A1111 or Forge client sends is accepted,
the fields this service has no use for change nothing, and wrong types and unknown fields are refused by name."""

from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.a1111 import A1111Api, Txt2ImgRequest
from deployments.config import ServiceConfig
from deployments.http import api

# What A1111 and Forge clients send besides the fields this service uses: every hires-fix, refiner and script field
# of A1111's txt2img API model and Forge's additions, with the values their own UIs fill in.
CLIENT_EXTRAS = {
    "refiner_checkpoint": "", "refiner_switch_at": 0.8, "disable_extra_networks": False, "firstpass_image": None,
    "comments": {}, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": "Use same checkpoint",
    "hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler", "hr_prompt": "",
    "hr_negative_prompt": "", "script_args": [], "infotext": None,
    "hr_additional_modules": ["Use same choices"], "hr_cfg": 1.0, "hr_distilled_cfg": 3.5,
    "enable_hr": False, "denoising_strength": 0.7, "sampler_name": "Euler a", "scheduler": "Automatic",
    "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "eta": 1.0,
    "distilled_cfg_scale": 3.5, "override_settings": {}, "override_settings_restore_afterwards": True,
    "sampler_index": "Euler a", "script_name": None, "alwayson_scripts": {}, "styles": [], "save_images": False,
}
USED = {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7, "steps": 4, "cfg_scale": 1.0, "width": 128,
        "height": 96, "batch_size": 2, "n_iter": 1}


def to_request(body: Txt2ImgRequest):
    """The ImageGenerationRequest the Ingress would generate for `body` (no Ray: `self` needs only the config)."""
    return A1111Api._a1111_to_request(SimpleNamespace(config=ServiceConfig()), body)


def test_a_forge_client_payload_is_accepted_and_its_extra_fields_change_nothing():
    body = Txt2ImgRequest.model_validate({**USED, **CLIENT_EXTRAS})
    assert body.hr_additional_modules == ["Use same choices"] and body.hr_distilled_cfg == 3.5
    assert body.model_dump()["hr_checkpoint_name"] == "Use same checkpoint"  # echoed back as `parameters`
    assert to_request(body) == to_request(Txt2ImgRequest.model_validate(USED))


def test_null_is_accepted_for_every_field_this_service_does_not_use_as_a1111_does():
    nulls = dict.fromkeys(CLIENT_EXTRAS)
    body = Txt2ImgRequest.model_validate({**USED, **nulls})
    assert to_request(body) == to_request(Txt2ImgRequest.model_validate(USED))


def a1111_app() -> TestClient:
    """The txt2img body model on an app with the service's error handlers (the real route needs Ray Serve)."""
    app = FastAPI(middleware=api.user_middleware, exception_handlers=api.exception_handlers)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest) -> dict:
        return {"n": body.n}

    return TestClient(app)


def test_a_field_a1111_does_not_have_is_422_naming_it():
    response = a1111_app().post("/sdapi/v1/txt2img", json={**USED, **CLIENT_EXTRAS, "init_images": ["abc"]})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "init_images"
    assert error["message"] == "unknown field 'init_images': remove it (see /docs for the accepted fields)"


@pytest.mark.parametrize("field", ["seed", "steps", "width", "height", "batch_size", "n_iter"])
def test_a_boolean_for_an_integer_is_422_naming_the_field(field):
    response = a1111_app().post("/sdapi/v1/txt2img", json={**USED, field: True})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert error["message"] == f"{field}: Input should be a valid integer, got true"


def test_plain_json_integers_still_pass():
    response = a1111_app().post("/sdapi/v1/txt2img", json={**USED, **CLIENT_EXTRAS, "batch_size": 3, "n_iter": 2})
    assert response.status_code == 200 and response.json() == {"n": 6}
