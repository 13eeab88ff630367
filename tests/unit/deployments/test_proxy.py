"""The proxy's replay of requests whose ingress replica died before answering (deployments/proxy.py), on a stand-in
for Serve's proxy app: one that ends without an answer the way Serve's does when the replica dies."""

import asyncio
import json

from deployments.proxy import ReplayLostRequests, middlewares


class FlakyProxyApp:
    """Reads the whole body, then answers nothing `lost` times (the replica died), then echoes the body."""

    def __init__(self, lost: int, raise_instead: bool = False):
        self.lost = lost
        self.raise_instead = raise_instead
        self.bodies: list[bytes] = []
        self.scopes: list[dict] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        self.scopes.append(dict(scope, given_root_path=scope["root_path"]))
        scope["root_path"] = "/changed"  # as Serve's proxy does to the scope it is given
        if len(self.bodies) <= self.lost:
            if self.raise_instead:
                raise RuntimeError("the replica died")
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def call(app, chunks: list[bytes], disconnect: bool = False):
    """Send a POST with its body in `chunks` through `app`; the messages it answered with."""
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "headers": [], "root_path": ""}
    asyncio.run(ReplayLostRequests(app, wait_s=0)(scope, receive, send))
    return sent


def test_a_request_with_no_answer_is_replayed_once_with_its_whole_body_and_a_fresh_scope():
    app = FlakyProxyApp(lost=1)
    sent = call(app, [b'{"prompt": ', b'"a fox"}'])
    assert app.bodies == [b'{"prompt": "a fox"}'] * 2
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"prompt": "a fox"}'
    first, replay = app.scopes
    assert replay["given_root_path"] == ""  # the first try's change of its scope did not carry over
    assert (b"x-zit-replay", b"1") in replay["headers"] and not first["headers"]


def test_a_proxy_that_raises_before_answering_is_replayed_too():
    app = FlakyProxyApp(lost=1, raise_instead=True)
    assert call(app, [b"{}"])[0]["status"] == 200


def test_when_the_replay_gets_no_answer_either_the_client_gets_a_503_to_retry():
    app = FlakyProxyApp(lost=10)
    sent = call(app, [b"{}"])
    assert len(app.bodies) == 2  # one replay only: a request that kills replicas takes at most one more
    start, body = sent
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    assert json.loads(body["body"])["error"]["type"] == "server_busy"


def test_an_answered_request_is_not_replayed():
    app = FlakyProxyApp(lost=0)
    call(app, [b"{}"])
    assert len(app.bodies) == 1


def test_a_request_whose_client_left_is_not_replayed():
    class LeavingApp(FlakyProxyApp):
        async def __call__(self, scope, receive, send):
            await super().__call__(scope, receive, send)
            await receive()  # the proxy watches for the client's disconnect, and sees it

    app = LeavingApp(lost=5)
    assert call(app, [b"{}"], disconnect=True) == [] and len(app.bodies) == 1


def test_serve_takes_the_hook_as_a_list_of_starlette_middlewares():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert [m.cls for m in validate_http_proxy_callback_return(middlewares())] == [ReplayLostRequests]
