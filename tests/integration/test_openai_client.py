"""The official `openai` Python client, unchanged, against the running service (base_url = service + /v1)."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


@pytest.fixture()
def oai(base_url):
    # Any key works here: this service config sets no api_keys_file, and without one the service asks for no key
    # (with one, api_key must be a key from that file; see deployments/auth.py).
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="anything", timeout=120, max_retries=0) as client:
        yield client


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_b64_json_with_n_greater_than_one_gives_n_images(oai):
    result = oai.images.generate(model="z-image-turbo", prompt="a red fox", n=3, size="128x128",
                                 response_format="b64_json")
    assert isinstance(result, openai.types.ImagesResponse)
    assert result.created > 0
    assert len(result.data) == 3
    for item in result.data:
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (128, 128)
        assert item.url is None


def test_url_response_is_downloadable(oai):
    result = oai.images.generate(model="z-image-turbo", prompt="a lighthouse", n=1, size="128x64",
                                 response_format="url")
    url = result.data[0].url
    assert url and result.data[0].b64_json is None
    image = Image.open(io.BytesIO(httpx.get(url, timeout=30).content))
    assert image.size == (128, 64)


def test_extensions_pass_through_extra_body_and_seed_reproduces(oai):
    def generate():
        return oai.images.generate(model="z-image-turbo", prompt="a red fox", size="64x64",
                                   response_format="b64_json", extra_body={"seed": 1234, "steps": 3})

    first, again = generate(), generate()
    assert first.model_extra["metadata"]["steps"] == 3
    assert first.data[0].model_extra["seed"] == 1234
    assert first.data[0].b64_json == again.data[0].b64_json


def test_invalid_size_is_the_clients_unprocessable_entity_error(oai):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.images.generate(model="z-image-turbo", prompt="a red fox", size="1000x1000")
    assert caught.value.status_code == 422
    assert "multiple of 16" in caught.value.message
    assert caught.value.param == "size"
    assert caught.value.type == "invalid_request_error"


def test_unknown_model_is_rejected_with_the_served_name(oai):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.images.generate(model="dall-e-3", prompt="a red fox", size="64x64")
    assert "z-image-turbo" in caught.value.message


def test_models_list_names_the_served_model(oai):
    assert [model.id for model in oai.models.list()] == ["z-image-turbo"]
