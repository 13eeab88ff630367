"""Per-step progress of running requests: where replicas report steps and where the APIs read them.

1. The ingress gives every request an id and files it with the progress store (`ProgressStore.start`, n and steps).
2. The id travels in each chunk's GenerationJob; the Generator replica running the chunk reports its denoising steps
   (run_job's `on_step`) through a StepReporter, at most every ZIT_PROGRESS_PERIOD_S, plus the first and last step.
3. `progress_view` (pure) combines the chunks of a request into one record: image-steps done of n x steps, the
   fraction, and an ETA from the time since admission. A chunk retried elsewhere starts over, so its fraction can
   fall; the stream holds the bar still until it catches up.
4. Readers: `POST /v1/images/generations/stream` (server-sent events, ProgressApi below), the A1111 progress
   endpoints, the web UI.

The store is one small named Ray actor, like the fleet registry. Reports are fire-and-forget: a lost report costs a
tick of the bar, never a request. Finished requests are kept KEEP_FINISHED_S so a late reader sees the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from typing import AsyncIterator, Iterable, Iterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from deployments.http import ApiError, api, call_service_actor, error_body
from deployments.schemas import ImageGenerationRequest

logger = logging.getLogger("ray.serve")

PROGRESS_NAME = "zit-progress"
PROGRESS_NAMESPACE = "zit"
# A replica reports at most this often per chunk: four updates a second move a bar smoothly, and cost the actor a few
# calls a second per running card even on a fleet of hundreds.
ZIT_PROGRESS_PERIOD_S = float(os.environ.get("ZIT_PROGRESS_PERIOD_S", "0.25"))
# How often the stream reads the store (half the report period, so no report waits long to be seen).
STREAM_POLL_S = ZIT_PROGRESS_PERIOD_S / 2
# Finished requests stay readable this long (a client polling A1111's progress after its txt2img returned).
KEEP_FINISHED_S = 60.0
# A request still "running" after this long lost its finish report (no request is allowed to run this long).
FORGET_RUNNING_S = 3600.0


# One event of the stream as the OpenAPI schema documents it; `data` is JSON text (or `[DONE]`).
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {"event": {"type": "string", "enum": ["start", "progress", "result", "error", "done"]},
                   "data": {"type": "string"}},
    "required": ["event", "data"],
}


def new_request_id() -> str:
    return secrets.token_hex(8)


def progress_view(request_id: str, record: dict, now: float) -> dict:
    """One request's progress from its chunk reports: image-steps done out of n x steps, the fraction, an ETA.

    The ETA extrapolates the time since admission (queueing included) over the fraction still to do; it is None
    until the first step is reported."""
    n, steps = record["n"], record["steps"]
    done = sum(min(c["step"], c["steps"]) * c["images"] * steps / max(c["steps"], 1) for c in record["chunks"].values())
    total = n * steps
    fraction = min(1.0, done / total) if total else 0.0
    elapsed = (record["finished_at"] or now) - record["started_at"]
    if record["finished_at"] is not None:
        eta = 0.0
    elif fraction > 0:
        eta = elapsed * (1 - fraction) / fraction
    else:
        eta = None
    return {
        "request_id": request_id,
        "step": int(round(done)),
        "steps": total,
        "fraction": fraction,
        "eta_s": eta,
        "elapsed_s": elapsed,
        "n": n,
        "images_done": sum(c["images"] for c in record["chunks"].values() if c["step"] >= c["steps"]),
        "started_at": record["started_at"],
        "finished": record["finished_at"] is not None,
    }


class ProgressStore:
    """Progress records by request id (a Ray actor). Times are this actor's clock, so replicas' clocks never mix."""

    def __init__(self):
        self._records: dict[str, dict] = {}

    def start(self, request_id: str, n: int, steps: int) -> None:
        record = self._records.get(request_id)
        if record is not None and record.get("finished_early"):
            # Calls may arrive out of order: the request finished before its start arrived.
            record.update(n=n, steps=steps, finished_early=False)
        else:
            self._records[request_id] = {"n": n, "steps": steps, "chunks": {}, "started_at": time.time(),
                                         "finished_at": None}
        self._expire()

    def step(self, request_id: str, chunk: int, step: int, steps: int, images: int) -> None:
        record = self._records.get(request_id)
        if record is not None and record["finished_at"] is None:
            old = record["chunks"].get(chunk)
            if old is not None and old["steps"] == steps and old["step"] > step:
                return  # an earlier report that arrived late: the bar never goes back for it
            record["chunks"][chunk] = {"step": step, "steps": steps, "images": images}

    def finish(self, request_id: str) -> None:
        now = time.time()
        record = self._records.get(request_id)
        if record is None:  # its start has not arrived yet (calls may arrive out of order)
            record = self._records[request_id] = {"n": 0, "steps": 0, "chunks": {}, "started_at": now,
                                                  "finished_early": True}
        record["finished_at"] = now

    def get(self, request_id: str) -> dict | None:
        record = self._records.get(request_id)
        return progress_view(request_id, record, time.time()) if record is not None else None

    def current(self) -> dict | None:
        """The oldest running request (A1111's 'current job'), with how many run; None when idle."""
        running = [(rid, r) for rid, r in self._records.items() if r["finished_at"] is None]
        if not running:
            return None
        rid, record = min(running, key=lambda item: item[1]["started_at"])
        return {**progress_view(rid, record, time.time()), "running": len(running)}

    def _expire(self) -> None:
        """Forget finished requests after KEEP_FINISHED_S, and running ones past FORGET_RUNNING_S (their ingress
        died before it could report the end)."""
        now = time.time()
        for rid, record in list(self._records.items()):
            finished = record["finished_at"]
            if (finished is not None and now - finished > KEEP_FINISHED_S) or (
                    finished is None and now - record["started_at"] > FORGET_RUNNING_S):
                del self._records[rid]


def get_progress_store():
    from deployments.registry import cluster_actor

    return cluster_actor(ProgressStore, PROGRESS_NAME, PROGRESS_NAMESPACE)


class StepReporter:
    """run_job's `on_step` for one chunk: forwards steps to the store, throttled; never raises into the pipeline."""

    def __init__(self, store, request_id: str, chunk: int, images: int, period_s: float = ZIT_PROGRESS_PERIOD_S,
                 clock=time.monotonic):
        self.store, self.request_id, self.chunk, self.images = store, request_id, chunk, images
        self.period_s, self._clock, self._last = period_s, clock, None

    def __call__(self, step: int, steps: int) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self.period_s and step not in (1, steps):
            return
        self._last = now
        try:
            self.store.step.remote(self.request_id, self.chunk, step, steps, self.images)
        except Exception:  # a progress tick is not worth failing an image for
            logger.debug("progress report failed", exc_info=True)


class ReplicaProgress:
    """What a Generator replica holds: the store handle (looked up once) and a StepReporter per job."""

    def __init__(self):
        self._store = None

    def reporter(self, job) -> StepReporter | None:
        if getattr(job, "request_id", None) is None:
            return None
        try:
            import ray

            if not ray.is_initialized():
                return None
            if self._store is None:
                self._store = get_progress_store()
        except Exception:
            logger.warning("progress store unavailable; running without progress", exc_info=True)
            return None
        return StepReporter(self._store, job.request_id, job.seeds[0], len(job.seeds))


# -- the ingress side ------------------------------------------------------------------------------------------


def sse(event: str, data) -> bytes:
    """One server-sent event; `data` is JSON text (str or bytes, one line) or something to write as JSON."""
    payload = data if isinstance(data, (str, bytes)) else json.dumps(data, separators=(",", ":"))
    payload = payload if isinstance(payload, bytes) else payload.encode()
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


def read_events(lines: Iterable[str]) -> Iterator[tuple[str, object]]:
    """(event, data) from the lines of a server-sent event stream; data is parsed JSON, or the text if it is not."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    yield event, json.loads(text)
                except ValueError:
                    yield event, text
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


class ProgressApi:
    """Mixed into Ingress: request ids and progress reads for every API, and the streaming OpenAI variant."""

    def _progress_store(self):
        store = getattr(self, "_progress_handle", None)
        if store is None:
            store = self._progress_handle = get_progress_store()
        return store

    def track_progress(self, request_id: str, body: ImageGenerationRequest) -> None:
        """File a request with the store (fire-and-forget; progress never holds up a request)."""
        try:
            self._progress_store().start.remote(request_id, body.n, body.steps)
        except Exception:
            logger.warning("progress store unavailable", exc_info=True)

    def untrack_progress(self, request_id: str) -> None:
        try:
            self._progress_store().finish.remote(request_id)
        except Exception:
            logger.warning("progress store unavailable", exc_info=True)

    async def progress_of(self, request_id: str) -> dict | None:
        return await self._read_progress("get", request_id)

    async def current_progress(self) -> dict | None:
        return await self._read_progress("current")

    async def _read_progress(self, method: str, *args):
        """A read of the store; a store that cannot answer is a 503 to retry, never a 500."""
        return await call_service_actor(self._progress_store(), method, *args, what="progress store")

    @api.get("/v1/progress/{request_id}")
    async def progress(self, request_id: str) -> dict:
        """Progress of one request by the id its stream announced (or A1111's force_task_id)."""
        found = await self.progress_of(request_id)
        if found is None:
            raise ApiError(404, f"no request {request_id!r} running or finished in the last {KEEP_FINISHED_S:.0f} s",
                           "request_id", kind="not_found_error")
        return found

    @api.post("/v1/images/generations/stream", responses={200: {"content": {"text/event-stream": {
        "schema": SSE_EVENT_SCHEMA}}, "description": "Server-sent events: start, progress..., result or error, done."}})
    async def generations_stream(self, body: ImageGenerationRequest, request: Request) -> StreamingResponse:
        """The OpenAI Images request, answered as server-sent events: `start` (the request id), `progress`
        ({step, steps, fraction, eta_s, images_done} whenever it moves; step never goes back), then `result` (the
        body /v1/images/generations would return) or `error` (the usual error body with its HTTP status), then
        `done`. Validation errors still come back as a plain 422 before the stream opens."""
        request_id = new_request_id()
        return StreamingResponse(self._stream_events(body, request, request_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          "X-Request-Id": request_id})

    async def _stream_events(self, body, request, request_id) -> AsyncIterator[bytes]:
        body.request_id = request_id
        task = asyncio.ensure_future(self.generations(body, request))
        yield sse("start", {"request_id": request_id, "n": body.n, "steps": body.n * body.steps})
        shown = -1
        try:
            while not task.done():
                await asyncio.wait([task], timeout=STREAM_POLL_S)
                if task.done():
                    break
                try:
                    progress = await self.progress_of(request_id)
                except Exception:
                    progress = None
                if progress is not None and progress["step"] > shown:
                    shown = progress["step"]
                    yield sse("progress", _progress_event(progress))
            try:
                result = task.result()
            except ApiError as exc:
                yield sse("error", {**error_body(exc.message, exc.kind, exc.param), "status": exc.status})
            else:
                steps = body.n * body.steps
                if shown < steps:
                    yield sse("progress", {"step": steps, "steps": steps, "fraction": 1.0, "eta_s": 0.0,
                                           "images_done": body.n, "n": body.n})
                # The JSON /v1/images/generations answers with (the model itself with validate_responses).
                yield sse("result", result.body if hasattr(result, "body") else result.model_dump(exclude_none=True))
            yield sse("done", "[DONE]")
        finally:
            if not task.done():  # the client went away: stop the work it asked for
                task.cancel()


def _progress_event(progress: dict) -> dict:
    eta = progress.get("eta_s")
    return {"step": progress["step"], "steps": progress["steps"], "fraction": round(progress["fraction"], 4),
            "eta_s": None if eta is None else round(eta, 2), "images_done": progress["images_done"],
            "n": progress["n"]}
