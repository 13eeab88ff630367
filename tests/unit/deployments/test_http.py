"""The service's request limits and error shape (deployments/http.py), on a small app without Ray.

The service's own app gets its routes only when Serve binds the Ingress, so each test builds a FastAPI app with the
service's middleware and exception handlers and one JSON route, and sends it requests in process.
"""

import asyncio

from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.http import MAX_BODY_BYTES, api
from deployments.schemas import ImageGenerationRequest


def service_app() -> tuple[FastAPI, list]:
    """An app with the service's middleware and error handlers; its route records the requests that reach it."""
    app = FastAPI(middleware=api.user_middleware, exception_handlers=api.exception_handlers)
    reached = []

    @app.post("/generate")
    async def generate(body: ImageGenerationRequest) -> dict:
        reached.append(body)
        return {"n": body.n}

    return app, reached


def chunked(total: int, chunk: int = 64 << 10):
    """A JSON body of about `total` bytes (padded with whitespace) sent as a generator: the client sends it chunked,
    with no Content-Length."""
    head = b'{"prompt": "a red fox"'
    yield head
    sent = len(head)
    while sent < total:
        yield b" " * min(chunk, total - sent)
        sent += chunk
    yield b"}"


def test_a_body_over_the_limit_with_content_length_is_413_before_the_route():
    app, reached = service_app()
    response = TestClient(app).post("/generate", content=b" " * (MAX_BODY_BYTES + 1),
                                    headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["message"] == (f"request body is {MAX_BODY_BYTES + 1} bytes; the limit is "
                                                   f"{MAX_BODY_BYTES}")
    assert reached == []


def test_a_chunked_body_over_the_limit_is_413_too():
    app, reached = service_app()
    response = TestClient(app).post("/generate", content=chunked(2 * MAX_BODY_BYTES),
                                    headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["message"] == f"request body is over the limit of {MAX_BODY_BYTES} bytes"
    assert error["type"] == "invalid_request_error"
    assert reached == []


def test_a_chunked_body_under_the_limit_reaches_the_route():
    app, reached = service_app()
    response = TestClient(app).post("/generate", content=chunked(MAX_BODY_BYTES // 2),
                                    headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert len(reached) == 1 and reached[0].prompt == "a red fox"


def test_a_long_chunked_body_is_read_only_up_to_the_limit():
    """At the ASGI level, so the chunks the app pulls are counted: of 100 chunks of 64 KiB it reads one past 1 MiB."""
    app, reached = service_app()
    chunk, chunks = 64 << 10, 100
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b" " * chunk, "more_body": pulled < chunks}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert pulled == MAX_BODY_BYTES // chunk + 1
    assert reached == []


def test_a_boolean_for_an_integer_is_422_naming_the_field_and_the_value():
    app, reached = service_app()
    client = TestClient(app)
    for field in ("n", "steps", "seed"):
        response = client.post("/generate", json={"prompt": "a red fox", field: True})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == field
        assert error["message"] == f"{field}: Input should be a valid integer, got true"
    assert client.post("/generate", json={"prompt": "a red fox", "n": 2}).json() == {"n": 2}
    assert [body.n for body in reached] == [2]


def test_a_long_wrong_value_is_cut_short_in_the_message():
    app, _ = service_app()
    response = TestClient(app).post("/generate", json={"prompt": "a red fox", "n": "x" * 1000})
    message = response.json()["error"]["message"]
    assert message.startswith('n: Input should be a valid integer, got "xxx') and message.endswith("...")
    assert len(message) < 100
