import pytest
from pydantic import ValidationError

from cluster.requests import parse_size
from deployments.schemas import ImageGenerationRequest


def make(**fields):
    return ImageGenerationRequest.model_validate({"prompt": "a red fox", **fields})


def test_defaults_follow_the_turbo_recipe():
    request = make()
    assert (request.n, request.steps, request.guidance_scale) == (1, 9, 0.0)
    assert (request.width, request.height) == (1024, 1024)
    assert request.response_format == "b64_json" and request.output_format == "png"


@pytest.mark.parametrize(
    "size, expected",
    [("256x256", (256, 256)), ("512x768", (512, 768)), (" 64X2048 ", (64, 2048))],
)
def test_size_parses_width_then_height(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize(
    "size, says",
    [
        ("1000x1024", "width must be a multiple of 16; got 1000 (try 992 or 1008)"),
        ("1024x1000", "height must be a multiple of 16"),
        ("32x32", "between 64 and 2048"),
        ("4096x1024", "between 64 and 2048"),
        ("big", "size must look like '1024x1024'"),
        ("1024", "size must look like"),
        ("-16x16", "size must look like"),
    ],
)
def test_bad_size_says_what_to_change(size, says):
    with pytest.raises(ValidationError, match=r"(?s)" + says.replace("(", r"\(").replace(")", r"\)")):
        make(size=size)


@pytest.mark.parametrize(
    "field, value",
    [("n", 0), ("n", 11), ("steps", 0), ("steps", 51), ("seed", -1), ("seed", 2**32), ("guidance_scale", -1),
     ("response_format", "binary"), ("output_format", "gif"), ("prompt", "   "), ("prompt", "a\x00b")],
)
def test_out_of_range_fields_are_rejected(field, value):
    with pytest.raises(ValidationError) as info:
        make(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_unknown_field_is_named():
    with pytest.raises(ValidationError) as info:
        make(sampler="euler")
    error = info.value.errors()[0]
    assert error["type"] == "extra_forbidden" and error["loc"] == ("sampler",)


def test_openai_only_fields_are_accepted():
    request = make(quality="hd", style="vivid", background="auto", moderation="low", user="u1", model="dall-e-3")
    assert request.quality == "hd"


@pytest.mark.parametrize("field", ["n", "seed", "steps", "output_compression"])
def test_a_boolean_is_not_taken_for_an_integer(field):
    with pytest.raises(ValidationError) as info:
        make(**{field: True})
    assert [(error["loc"], error["type"]) for error in info.value.errors()] == [((field,), "int_type")]
    assert getattr(make(**{field: 1}), field) == 1


def test_the_written_body_is_the_response_model_json():
    """image_generation_body writes what FastAPI would have written from ImageGenerationResponse, byte for byte in
    meaning: base64 copied as is, a URL escaped, metadata as JSON."""
    import base64
    import json

    from deployments.schemas import ImageData, ImageGenerationResponse, image_generation_body

    png = bytes(range(256)) * 40
    metadata = {"model": "z", "chunks": [{"tier": "vram_8", "seconds": 1.25, "degraded": False}], "text_encoder": None}
    url = 'http://h/v1/images/a"b.png'
    body = image_generation_body(17, [("b64_json", base64.b64encode(png), 3), ("url", url, 4)], metadata)
    expected = ImageGenerationResponse(created=17, metadata=metadata, data=[
        ImageData(b64_json=base64.b64encode(png).decode(), seed=3), ImageData(url=url, seed=4)])
    assert json.loads(body) == expected.model_dump(exclude_none=True)
    parsed = ImageGenerationResponse.model_validate_json(body)
    assert base64.b64decode(parsed.data[0].b64_json) == png and parsed.data[1].url == url
