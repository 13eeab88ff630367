"""The FastAPI app every HTTP route hangs on, its error shape, and request-level limits.

Errors use the OpenAI error shape `{"error": {"message", "type", "param", "code"}}` so OpenAI clients raise their
usual exception types; every 4xx message says what to change. Routes live on the Ingress class (and classes it
inherits from, one per API family); Serve binds them to the replica (deployments/ingress.py).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ray.serve")

# A JSON body larger than this is refused before parsing (a 4000-character prompt is ~16 KB even fully escaped).
MAX_BODY_BYTES = 1 << 20


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to change.")
    type: str = Field(description="invalid_request_error, not_found_error, authentication_error, ...")
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error the API returns, in the OpenAI shape."""

    error: ErrorDetail


_ERROR = {"model": ErrorBody}
# Documented on every route, so clients and the fuzzer know every status the service may answer with.
ERROR_RESPONSES = {
    401: {**_ERROR, "description": "Missing or unknown API key (when the service has keys)."},
    404: {**_ERROR, "description": "No such resource (an expired image, an unknown request)."},
    413: {**_ERROR, "description": "Request body over the limit."},
    422: {**_ERROR, "description": "Invalid request; the message says what to change."},
    429: {**_ERROR, "description": "This API key's rate limit; see Retry-After."},
    500: {**_ERROR, "description": "Unexpected server error."},
    503: {**_ERROR, "description": "Every tier that could serve this is full or failing; see Retry-After."},
    504: {**_ERROR, "description": "The request took longer than the service's timeout."},
}

api = FastAPI(title="ZIT Cluster", version="0.1.0", description="Z-Image-Turbo on a mixed GPU fleet.",
              responses=ERROR_RESPONSES)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def call_service_actor(actor, method: str, *args, what: str, fallback: str = ""):
    """`actor.method(*args)` of one of the service's actors (progress store, image store); an actor that cannot
    answer (restarting) is a 503 with Retry-After that names `what`, never a 500."""
    import ray

    try:
        return await getattr(actor, method).remote(*args)
    except ray.exceptions.RayError as error:
        logger.warning("%s did not answer: %s", what, error)
        raise ApiError(503, f"the {what} is unavailable for a moment (it is restarting); retry{fallback}",
                       kind="server_busy", headers={"Retry-After": "1"}) from None


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Turn pydantic's error list into one sentence per problem, naming the field."""
    messages, first_param = [], None
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(loc) or "body"
        first_param = first_param or field
        if error.get("type") == "extra_forbidden":
            messages.append(f"unknown field {field!r}: remove it (see /docs for the accepted fields)")
        elif error.get("type") == "json_invalid":
            messages.append("request body is not valid JSON")
        elif error.get("type") == "missing":
            messages.append(f"{field} is required")
        else:
            msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            if str(error.get("type")).endswith("_type"):  # a value of the wrong JSON type (true for an integer)
                msg += f", got {_shown(error.get('input'))}"
            messages.append(f"{field}: {msg}")
    return JSONResponse(error_body("; ".join(messages), "invalid_request_error", first_param), status_code=422)


def _shown(value, limit: int = 40) -> str:
    """A client's value as JSON, cut to `limit` characters for an error message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)


class _AuthHolder:
    """The replica's Authenticator (or None): one per process, set by the Ingress from its configuration."""

    current = None


AUTH = _AuthHolder()


class _Authenticate:
    """API keys and per-key rate limits, when the service has keys (`AUTH.current`, set by the Ingress). Pure ASGI
    (no task and stream per request, as an `@api.middleware` function costs)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import math

        from deployments.auth import is_open

        auth = AUTH.current
        if scope["type"] != "http" or auth is None or is_open(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        name = auth.identify(Headers(scope=scope).get("authorization"))
        if name is None:
            response = JSONResponse(
                error_body("missing or unknown API key: send `Authorization: Bearer <key>`", "authentication_error"),
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        wait_s = auth.admit(name)
        if wait_s is not None:
            response = JSONResponse(
                error_body(f"rate limit of {auth.rate_per_minute:g} requests per minute reached for this key; retry "
                           f"in {math.ceil(wait_s)} s", "rate_limit_error"),
                status_code=429, headers={"Retry-After": str(math.ceil(wait_s))})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


api.add_middleware(_Authenticate)


class _LimitBody:
    """Refuses a request body over MAX_BODY_BYTES with 413; outermost of the service's middleware (before the key).

    A Content-Length over the limit is refused before anything is read (a body with one is held to it by the HTTP
    server). A body without one (chunked) is read here first, and refused as soon as the bytes received pass the
    limit, so at most the limit plus one chunk is ever held; under it, the route gets it as one message. A GET or HEAD
    without Content-Length is passed on unread: no route reads its body, and streaming GETs read on to learn when the
    client leaves.
    Pure ASGI: an `@api.middleware` function could count the body only through Request.stream(), after which the
    route would get an empty body.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return await _body_too_large(f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}",
                                         scope, receive, send)
        if length is not None or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left mid-body: the route hears it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                return await _body_too_large(f"request body is over the limit of {MAX_BODY_BYTES} bytes",
                                             scope, receive, send)
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        pending = [message]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


async def _body_too_large(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error_body(message, "invalid_request_error"), status_code=413)(scope, receive, send)


api.add_middleware(_LimitBody)


