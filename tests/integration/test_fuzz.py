"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis): no 5xx, every response conforms to the schema.

The service under fuzz has small limits (images up to 256 pixels a side, n up to 2), so the valid requests the
fuzzer finds are cheap to generate and the invalid ones must come back as 4xx with a message.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from cluster.tiers import TierConfig
from deployments.config import ServiceConfig
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fuzz_url(serve_port):
    config = ServiceConfig(tiers=[TierConfig(name="cpu")], max_image_side=256, max_n=2, max_prompt_chars=500)
    return deploy(serve_port, config)


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


def test_api_never_fails_with_5xx_and_conforms_to_its_schema(fuzz_url):
    """Every operation of the service's OpenAPI schema, 25 generated requests each (valid and invalid)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/images/generations" for op in operations)
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(timeout=120)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            case.validate_response(response, checks=CHECKS)

        check()


@pytest.mark.parametrize("body, status", [
    ({"prompt": "a\x01b\u202e\U0001F98A", "size": "64x64", "steps": 1}, 200),  # control and bidi characters: drawn
    ({"prompt": "x" * 100_000, "size": "64x64"}, 422),
    ({"prompt": "fox", "size": "64x64", "n": 10**12}, 422),
    ({"prompt": "fox", "size": "64x64", "steps": "many"}, 422),
    ({"prompt": "fox", "size": "sixtyfour"}, 422),
    ({"prompt": "fox", "size": "64x64", "seed": 1.5}, 422),
    ({"prompt": ["fox"], "size": "64x64"}, 422),
    ({"prompt": "fox", "size": "64x64", "output_format": "bmp"}, 422),
])
def test_hostile_inputs_get_a_4xx_and_the_service_keeps_serving(fuzz_url, body, status):
    import httpx

    response = httpx.post(f"{fuzz_url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == status, response.text[:300]
    if status != 200:
        assert response.json()["error"]["message"]
    assert httpx.post(f"{fuzz_url}/v1/images/generations", json={"prompt": "ok", "size": "64x64", "steps": 1},
                      timeout=120).status_code == 200
