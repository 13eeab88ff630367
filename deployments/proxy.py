"""What runs in every Serve HTTP proxy in front of the ingress: a request whose ingress replica dies before it
answers is sent again (to another replica), not lost.

Serve's proxy answers nothing when the replica handling a request dies (a RayActorError is a bare 500 from uvicorn,
with no body and no hint to retry). With more than one ingress replica (ServiceConfig.ingress_replicas) the proxy
spreads requests over them, so losing one would cost every request it held. `ReplayLostRequests` wraps the proxy's
ASGI app: it keeps the request body as the proxy reads it, and when the app ends without having started a response
and the client is still there, it replays the request once (with an `x-zit-replay` header), which Serve's router now
sends to a live replica. Only requests with no answer started are replayed: a stream already under way ends where it
ends. One replay only: a request that itself brings its replica down (a bug, an out-of-memory kill) takes at most one
more with it. When the replay gets no answer either, the client gets the service's 503 with Retry-After, in the
OpenAI error shape.

A replay runs the request's generation again: chunks the dead replica had already sent to cards still run there,
for no one (the cost of the fault is that card time, not the request). A request with a seed gets the same images.

Installed through Serve's proxy hook: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:middlewares in the
environment of every Ray node (runtime/local.py RAY_PROCESS_ENV, Dockerfile.gpu), read when a proxy starts.
"""

from __future__ import annotations

import asyncio
import json
import logging

logger = logging.getLogger("ray.serve")

CALLBACK_IMPORT_PATH = "deployments.proxy:middlewares"
# Tries per request: the first and one replay (Serve's router drops a dead replica after its first failed call). One
# only: a request that itself kills its replica (a bug, an out-of-memory kill) must not take a second one with it.
ATTEMPTS = 2
# A header on the replay, for the ingress's log and the client's answer.
REPLAY_HEADER = b"x-zit-replay"
# Wait before a replay: time for the router to learn the replica is gone.
REPLAY_WAIT_S = 0.2
# Bodies larger than this are not kept for a replay (the service refuses bodies over 1 MiB anyway: 413).
MAX_REPLAY_BODY = 4 << 20
RETRY_AFTER_S = 1


def middlewares() -> list:
    """Serve's proxy callback: the middlewares to wrap the proxy's app in."""
    from starlette.middleware import Middleware

    return [Middleware(ReplayLostRequests)]


class ReplayLostRequests:
    """Pure ASGI middleware (no task or stream per request): see the module docstring."""

    def __init__(self, app, attempts: int = ATTEMPTS, wait_s: float = REPLAY_WAIT_S):
        self.app = app
        self.attempts = attempts
        self.wait_s = wait_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        kept: list[dict] = []  # the request's body messages, as the app read them
        state = {"size": 0, "replayable": True, "gone": False, "started": False}

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["size"] += len(message.get("body", b""))
                if state["size"] > MAX_REPLAY_BODY:
                    state["replayable"] = False
                    kept.clear()
                elif state["replayable"]:
                    kept.append(message)
            elif message["type"] == "http.disconnect":
                state["gone"] = True
            return message

        async def watching_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        error = None
        for attempt in range(self.attempts):
            error = None
            # A fresh scope each try: the proxy changes the one it is given (its root_path) in place.
            headers = list(scope.get("headers", ()))
            if attempt:
                headers.append((REPLAY_HEADER, str(attempt).encode()))
            try:
                await self.app(dict(scope, headers=headers),
                               _replaying(kept, recording_receive) if attempt else recording_receive, watching_send)
            except Exception as exc:  # the proxy raised: the same as no answer, if none started
                if state["started"]:
                    raise
                error = exc
            if state["started"] or state["gone"] or not state["replayable"] or attempt == self.attempts - 1:
                break
            logger.warning("%s %s: no answer from its ingress replica (it died?); replaying it on another one",
                           scope.get("method"), scope.get("path"))
            await asyncio.sleep(self.wait_s)
        if state["started"] or state["gone"]:
            return
        if error is not None:
            logger.warning("request failed at the proxy: %r", error)
        body = json.dumps({"error": {
            "message": "the ingress replica handling this request stopped before it answered, and no other one "
                       "answered either; retry", "type": "server_busy", "param": None, "code": None}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(RETRY_AFTER_S).encode())]})
        await send({"type": "http.response.body", "body": body})


def _replaying(kept: list[dict], receive):
    """A receive that gives the kept body messages again, then reads on from the client: the rest of a body the
    first try had not read, then its disconnect."""
    pending = list(kept)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
