"""The HTTP front door: OpenAI Images API, models, fleet, health. Every API family reaches images through
`Ingress.generate` (limits, admission, tier choice, chunks, retries); the app and its error shape are in http.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import secrets
import time

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response

from cluster.memory import load_calibration
from cluster.profiles import tier_profile
from deployments.a1111 import A1111Api
from deployments.config import ServiceConfig
from deployments.dispatch import ChunkExhausted, Dispatcher, Outcome
from deployments.hostmem import trim_host_memory
from deployments.http import AUTH, ApiError, api, call_service_actor
from deployments.image_store import CONTENT_TYPES
from deployments.lora import LORA_SUFFIX, LoraError, LoraLibrary
from deployments.metrics import install as install_metrics
from deployments.metrics import RecordRequests, card_link_view, note_request
from deployments.progress import ProgressApi, new_request_id
from deployments.reporting import replica_name
from deployments.routing import NoTierFits
from deployments.scheduler import TiersFull
from deployments.schemas import (
    MAX_SEED,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    image_generation_body,
)
from deployments.webui import WebUi

logger = logging.getLogger("ray.serve")

# Outermost middleware (added last): counts every request with its route, status, tier and latency.
api.add_middleware(RecordRequests)

# What a client is told to wait after a 503 because a chunk failed everywhere it could go.
RETRY_AFTER_S = 5
# How long the first request waits for the first reading of the fleet registry (normally a few milliseconds).
FIRST_POLL_WAIT_S = 5.0
# How long a scrape or a poll waits for the fleet registry's metric sums before using the last ones.
TOTALS_WAIT_S = 2.0


class Ingress(A1111Api, ProgressApi, WebUi):
    """Validates requests, picks a tier, splits n into chunks, runs them in parallel and assembles the response."""

    def __init__(self, config: ServiceConfig, generators: dict, encoder=None):
        self.config = config
        self.generators = generators  # tier name -> DeploymentHandle of that tier's Generator
        self.encoder = encoder  # the text-encoder stage's handle, or None (every generator encodes)
        self._images = None  # the service's image store (image_store.SharedImageStore), on first use
        self.replica = replica_name()  # this ingress replica (Serve's id), in /healthz and image responses
        self.model_names = {config.model_name, config.model}
        if config.api_keys_file:
            from deployments.auth import Authenticator

            AUTH.current = Authenticator.from_file(config.api_keys_file, None)
        self.lora = config.lora_settings()
        self.loras = LoraLibrary(self.lora.folder) if self.lora else None
        self.profiles = {tier.name: tier_profile(tier, self.lora.reserved_params if self.lora else 0)
                         for tier in config.tiers}
        self.dispatcher = Dispatcher(config.tiers, self.profiles, generators, load_calibration(), config.tier_policy,
                                     autoscaling=config.autoscaling, encoder=encoder,
                                     encoder_wait_s=config.text_encoder.wait_s)
        self.sharing = 0  # the ingress replicas this one shares the service's limits with (`_share`)
        self._share(config.ingress_replicas)
        self.metrics = self.dispatcher.metrics  # served at GET /metrics (deployments/metrics.py)
        if encoder is not None:
            stage = config.text_encoder
            self.metrics.fleet.stage_expected = len(stage.cards) or stage.replicas
        install_metrics(self.metrics)
        self._totals: dict | None = None  # the service's metric sums the registry last gave (`_service_totals`)
        # The replicas this one shares limits with: those of the same configuration (not a redeploy's old ones).
        self.group = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
        self._poller: asyncio.Future | None = None
        self._registry = None
        self._fleet_state: tuple[list[dict], list[dict]] | None = None  # (replica reports, card nodes), last poll
        self._stage_state: list[dict] = []  # the text-encoder stage's replica reports, last poll
        # Send this replica's counts (and learn its share) from the start, not from the first image request: a
        # replica that only answered health checks and image downloads counts too. (The fleet poll itself starts
        # with the first request, as before: a poll this early could read the reports of the replicas a redeploy
        # is replacing.)
        self._sender: asyncio.Future | None = None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # built outside Serve (unit tests)
            pass
        else:
            self._start_sending()

    # -- API -------------------------------------------------------------------------------------------------

    @api.post("/v1/images/generations", response_model=ImageGenerationResponse, response_model_exclude_none=True)
    async def generations(self, body: ImageGenerationRequest, request: Request) -> Response | ImageGenerationResponse:
        """The OpenAI Images API. The body is written directly (schemas.image_generation_body): each image's bytes
        are base64-encoded once and copied into it once, with no validation pass over megabytes."""
        started = time.perf_counter()
        outcome = await self.generate(body)
        width, height = body.width, body.height
        # Assemble, in seed order.
        pairs = [(image, seed) for result in outcome.results for image, seed in zip(result.images, result.seeds)]
        if body.response_format == "b64_json":
            items = [("b64_json", base64.b64encode(image), seed) for image, seed in pairs]
        else:
            ids = await self._store_images([image for image, _ in pairs], body.output_format)
            items = [("url", self._url(request, f"/v1/images/{image_id}.{body.output_format}"), seed)
                     for image_id, (_, seed) in zip(ids, pairs)]
        metadata = {
            "model": self.config.model_name,
            "size": f"{width}x{height}",
            "steps": body.steps,
            "seconds": round(time.perf_counter() - started, 4),
            "chunks": [
                {"tier": r.tier, "replica": r.replica, "device": r.device, "seeds": r.seeds,
                 "seconds": round(r.seconds, 4), "seconds_per_step": round(r.seconds_per_step, 5),
                 "degraded": r.degraded}
                for r in outcome.results
            ],
            "retries": [retry.as_dict() for retry in outcome.retries],
            # The text-encoder stage's one encode of the request (None: each chunk's generator encoded).
            "text_encoder": outcome.encode,
        }
        if self.config.validate_responses:  # the models, validated and written by FastAPI (response_model)
            return ImageGenerationResponse(created=int(time.time()), metadata=metadata, data=[
                ImageData(**{field: value.decode() if isinstance(value, bytes) else value, "seed": seed})
                for field, value, seed in items])
        return Response(image_generation_body(int(time.time()), items, jsonable_encoder(metadata)),
                        media_type="application/json", headers={"X-Zit-Ingress": self.replica})

    async def generate(self, body: ImageGenerationRequest) -> Outcome:
        """Every API's one path to images: check, admit, route, run, retry; errors as ApiError with the fix."""
        # 1. Check what the schema cannot: configured limits and the model name.
        self._check_limits(body)
        await self._fleet_known()
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - body.n + 1)
        if seed + body.n - 1 > MAX_SEED:
            raise ApiError(422, f"seed + n - 1 must be at most {MAX_SEED}; lower seed", "seed")
        # 2. Admit, choose tiers, run the chunks (with retries elsewhere), within the request's time.
        body.request_id = body.request_id or new_request_id()  # replicas report steps under it (progress.py)
        self.track_progress(body.request_id, body)
        task = asyncio.ensure_future(self.dispatcher.run(body, body.width, body.height, seed))
        task.add_done_callback(lambda _, request_id=body.request_id: self.untrack_progress(request_id))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=self.config.request_timeout_s)
        except NoTierFits as exc:
            note_request(reason="no_tier_fits")
            raise ApiError(422, f"{exc}. Largest request each tier accepts: {exc.largest}", "size") from exc
        except TiersFull as exc:
            note_request(reason="tiers_full")
            retry_after = max(1, math.ceil(exc.retry_after_s))
            raise ApiError(503, f"{exc}", kind="server_busy", headers={"Retry-After": str(retry_after)}) from exc
        except ChunkExhausted as exc:
            note_request(reason="retries_exhausted")
            raise ApiError(503, f"generation failed after retries: {exc}", kind="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except asyncio.TimeoutError as exc:
            task.cancel()
            raise ApiError(504, f"generation took longer than {self.config.request_timeout_s:.0f} s; ask for fewer "
                                "or smaller images", kind="timeout") from exc
        except asyncio.CancelledError:
            task.cancel()  # the client went away: stop queued chunks from running for nobody
            raise
        except Exception as exc:
            logger.exception("generation failed")
            raise ApiError(500, f"generation failed: {exc.__class__.__name__}: {str(exc)[:500]}",
                           kind="server_error") from exc

    @api.get("/v1/images/{name}")
    async def image(self, name: str) -> Response:
        image_id, _, fmt = name.partition(".")
        stored = await self._image_call("get", image_id)
        if stored is None or (fmt and fmt != stored.fmt):
            raise ApiError(404, f"image {name!r} not found: images expire after {self.config.image_ttl_s:.0f} s",
                           "name", kind="not_found_error")
        # Which ingress replica answered: any of them serves any image (one store for the service).
        return Response(stored.data, media_type=CONTENT_TYPES[stored.fmt], headers={"X-Zit-Ingress": self.replica})

    @api.get("/v1/loras")
    async def list_loras(self) -> dict:
        """The LoRA adapters a request may name in `lora`, with their sizes; `enabled` is false without a folder."""
        if self.loras is None:
            return {"enabled": False, "data": []}
        return {"enabled": True, "slots": self.lora.slots, "fuse": self.lora.fuse,
                "reserve_params": self.lora.reserve_params, "data": await asyncio.to_thread(self.loras.describe)}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "zit-cluster"}],
        }

    @api.get("/v1/fleet")
    async def fleet(self) -> dict:
        """Cards (Ray nodes labelled with a card), tiers, and the replica on each card, as the ingress last read them
        (the registry's reports and Ray's node table, every ZIT_FLEET_REPORT_PERIOD_S): it answers while a card
        node dies or the registry restarts, with what it knew last."""
        from deployments.registry import card_nodes, get_registry
        from runtime.nodes import (
            LABEL_BF16,
            LABEL_CARD,
            LABEL_CC,
            LABEL_HOST,
            LABEL_SIMULATED,
            LABEL_SLOTS,
            LABEL_TIER,
            LABEL_VRAM,
        )

        await self._fleet_known()
        if self._fleet_state is not None:  # what the last poll read (at most ZIT_FLEET_REPORT_PERIOD_S old)
            replicas, nodes = self._fleet_state
        else:  # no poll has succeeded yet: read it now
            if self._registry is None:
                self._registry = get_registry()
            replicas, nodes = await asyncio.gather(self._registry.replicas.remote(), asyncio.to_thread(card_nodes))
        on_card: dict[str, list[dict]] = {}  # a split card hosts several replicas
        for r in replicas:
            if r.get("card"):
                on_card.setdefault(r["card"]["uuid"], []).append(r)
        cards = []
        for node in sorted(nodes, key=lambda n: (n["labels"].get(LABEL_HOST, ""), n["labels"][LABEL_CARD])):
            labels = node["labels"]
            hosted = sorted(on_card.get(labels[LABEL_CARD], []), key=lambda r: r["replica"])
            # The freshest reading of the card (every replica on it reads the same card).
            reading = max((r["card"] for r in hosted), key=lambda c: c.get("taken_at") or 0, default={})
            cards.append({
                "uuid": labels[LABEL_CARD],
                "name": reading.get("name"),
                "tier": labels.get(LABEL_TIER),
                "vram_gb": float(labels.get(LABEL_VRAM, 0)),
                "compute_capability": labels.get(LABEL_CC),
                "bf16": labels.get(LABEL_BF16) == "true",
                "simulated": labels.get(LABEL_SIMULATED) == "true",
                "host": labels.get(LABEL_HOST),
                "node_id": node["node_id"],
                "node_alive": node["alive"],
                "memory_total_gib": reading.get("memory_total_gib"),
                "memory_used_gib": reading.get("memory_used_gib"),
                "utilization_pct": reading.get("utilization_pct"),
                "temperature_c": reading.get("temperature_c"),
                "slots": int(labels.get(LABEL_SLOTS, 1)),
                "replica": hosted[0]["replica"] if hosted else None,
                "replicas": [r["replica"] for r in hosted],
                "busy": any(r.get("busy") for r in hosted),
                "loras": sorted({name for r in hosted for name in r.get("loras", [])}),
                "error": reading.get("error"),
                **card_link_view(hosted, reading),
            })
        tiers = []
        short = [t.name for t in self.config.tiers
                 if sum(1 for r in replicas if r.get("tier") == t.name) < t.num_replicas]
        start_errors = await self._start_errors(short)
        for tier in self.config.tiers:
            in_tier = [r for r in replicas if r.get("tier") == tier.name]
            tiers.append({
                "name": tier.name,
                "cards": sum(1 for c in cards if c["tier"] == tier.name),
                "slots": sum(c["slots"] for c in cards if c["tier"] == tier.name),
                "replicas_target": tier.num_replicas,
                "replicas_running": len(in_tier),
                "profile": in_tier[0]["profile"] if in_tier else None,
                "queue": {"running": self.dispatcher.queues[tier.name].running,
                          "waiting": self.dispatcher.queues[tier.name].waiting},
                "lost": self.dispatcher.lost.get(tier.name),
                "start_error": start_errors.get(tier.name),
            })
        routing = {"tier_policy": self.config.tier_policy, "in_tier_router": self.config.in_tier_router}
        from deployments.hostmem import hosts_view

        return {"cards": cards, "tiers": tiers, "replicas": replicas, "routing": routing,
                "text_encoder": self._text_encoder_view(), "hosts": hosts_view(replicas + self._stage_state)}

    @staticmethod
    async def _start_errors(tiers: list[str]) -> dict[str, str]:
        """Why replicas of `tiers` (those running fewer than their target) are not up, as Serve says it: the last
        line of the exception their constructor raised (a host without the RAM: "MemoryError: Cannot allocate
        memory: ..."), for each tier whose deployment is not healthy. Read from the Serve controller only then."""
        if not tiers:
            return {}
        from ray import serve

        from deployments.app import generator_deployment_name

        try:
            status = await asyncio.to_thread(serve.status)
        except Exception:  # the controller is busy or restarting: the view answers without it
            logger.warning("could not read Serve's deployment status for the fleet view", exc_info=True)
            return {}
        names = {generator_deployment_name(tier): tier for tier in tiers}
        out = {}
        for application in status.applications.values():
            for name, deployment in application.deployments.items():
                lines = [line for line in (deployment.message or "").splitlines() if line.strip()]
                failing = str(deployment.status).rsplit(".", 1)[-1] in ("UNHEALTHY", "DEPLOY_FAILED") or str(
                    getattr(deployment, "status_trigger", "")).endswith(("STARTUP_FAILED", "HEALTH_CHECK_FAILED"))
                if name in names and failing and lines:  # not a rollout or an autoscaling step
                    out[names[name]] = lines[-1].strip()[:1000]
        return out

    def _text_encoder_view(self) -> dict:
        """Where the text-encoder stage runs, as configured and as its replicas report, with their caches."""
        stage = self.config.text_encoder
        view = {"placement": stage.placement, "where": stage.where or "local", "cards": stage.cards,
                "tiers": stage.tiers, "reserve_gib": round(stage.reserve_bytes / 2**30, 3),
                "profile": (stage.profile or {}).get("name"), "lost": self.dispatcher.encoder_lost, "replicas": []}
        for report in self._stage_state:
            view["replicas"].append({key: report.get(key) for key in (
                "replica", "where", "stage_card", "technique", "device", "dtype", "host", "busy", "encodes", "cache",
                "last_report_s")})
        return view

    @api.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(self) -> Response:
        """Prometheus text format: requests, latency, queues, replicas and every card, from cached state only."""
        self._start_polling()  # card and replica metrics come from the registry poll
        body, content_type = self.metrics.render(await self._service_totals())
        return Response(body, media_type=content_type)

    async def _service_totals(self) -> dict | None:
        """Every ingress replica's per-request series summed (deployments/metrics.py ServiceTotals), this one's sent
        first: the registry actor holds the sums, so a scrape reads the same counts through any replica. The
        answer also says how many ingress replicas are running: each takes its share of the limits by that. None
        from a registry of an older version, still running from before an upgrade: this replica's own counts."""
        from deployments.registry import get_registry

        if self._registry is None:
            self._registry = get_registry()
        try:
            totals = await asyncio.wait_for(call_service_actor(
                self._registry, "ingress_metrics", self.replica, self.metrics.snapshot(), self.group,
                what="fleet registry"), timeout=TOTALS_WAIT_S)
        except AttributeError:
            return None
        except (asyncio.TimeoutError, ApiError):
            if self._totals is None:
                raise ApiError(503, "the fleet registry is busy or restarting; retry", kind="server_busy",
                               headers={"Retry-After": "1"}) from None
            return self._totals  # the last sums it gave: never this replica's own alone (a counter reset)
        self._totals = totals
        self._share(totals.get("replicas") or 1)
        return totals

    def _share(self, replicas: int) -> None:
        """Admit this replica's share of every tier's queue bound and of each API key's rate, `replicas` sharing
        them (the proxies spread requests evenly): the configured count at start, then the running count, so a
        replica left alone (the other died, or was scaled down) takes the whole bound."""
        if replicas == self.sharing:
            return
        self.sharing = replicas
        for tier in self.config.tiers:
            limit = math.ceil(tier.max_queued_requests / replicas)
            self.dispatcher.tiers[tier.name] = self.dispatcher.tiers[tier.name].model_copy(
                update={"max_queued_requests": limit})
            self.dispatcher.queues[tier.name].limit = limit
        if AUTH.current is not None and self.config.rate_limit_per_minute:
            AUTH.current.rate_per_minute = self.config.rate_limit_per_minute / replicas

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.config.model_name, "tiers": [t.name for t in self.config.tiers],
                "replica": self.replica}

    def __del__(self):
        """Serve stops this replica on purpose (a redeploy, scaling down): the others take its share now."""
        registry = getattr(self, "_registry", None)
        if registry is not None:
            try:
                registry.ingress_gone.remote(self.replica)
            except Exception:  # a registry of an older version, or Ray already gone: it goes stale in 6 s
                pass

    async def check_health(self) -> None:
        """Serve's periodic health check; it also restarts the sending of this replica's counts if it ever ended."""
        self._start_sending()

    def _start_sending(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_counts())

    async def _send_counts(self) -> None:
        """Every ZIT_FLEET_REPORT_PERIOD_S: this replica's counts to the registry, the service's sums and the
        running replica count (its share of the limits) back. Alone in its loop: nothing else it waits for can
        hold it up."""
        from deployments.registry import ZIT_FLEET_REPORT_PERIOD_S

        while True:
            try:
                await self._service_totals()
            except Exception:
                logger.warning("sending this replica's metrics to the fleet registry failed", exc_info=True)
            await asyncio.sleep(ZIT_FLEET_REPORT_PERIOD_S)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _check_limits(self, body: ImageGenerationRequest) -> None:
        cfg = self.config
        if body.model is not None and body.model not in self.model_names:
            raise ApiError(422, f"model {body.model!r} is not served here; use {cfg.model_name!r}", "model")
        for field in ("prompt", "negative_prompt"):
            text = getattr(body, field) or ""
            if len(text) > cfg.max_prompt_chars:
                raise ApiError(422, f"{field} is {len(text)} characters; shorten it to at most "
                                    f"{cfg.max_prompt_chars}", field)
        if body.n > cfg.max_n:
            raise ApiError(422, f"n must be at most {cfg.max_n}; got {body.n}", "n")
        if max(body.width, body.height) > cfg.max_image_side:
            raise ApiError(422, f"size {body.size} is larger than this service's {cfg.max_image_side} pixels per "
                                "side", "size")
        if body.lora is not None:
            if self.loras is None:
                raise ApiError(422, "this service has no LoRA folder (the operator sets lora_dir, or `zit up "
                                    "--lora-dir`); remove 'lora' (or the prompt's <lora:...> tag)", "lora")
            try:
                self.loras.check(body.lora, self.lora)
                body.lora = body.lora.removesuffix(LORA_SUFFIX)  # the name, as replicas and multiplexing know it
            except LoraError as exc:
                raise ApiError(422, str(exc), "lora") from None

    def _start_polling(self) -> None:
        """Follow the fleet registry (live replicas, free memory per tier) from the first request on."""
        if self._poller is None or self._poller.done():
            self._polled = asyncio.Event()
            self._poller = asyncio.ensure_future(self._poll_registry())

    async def _fleet_known(self) -> None:
        """The first request waits (briefly) for the first registry reading: routing on no knowledge of the cards
        could send it to a card that is lost or full."""
        self._start_polling()
        try:
            await asyncio.wait_for(self._polled.wait(), timeout=FIRST_POLL_WAIT_S)
        except asyncio.TimeoutError:
            logger.warning("no fleet registry reading after %.0f s; routing on the configured tiers", FIRST_POLL_WAIT_S)

    async def _poll_registry(self) -> None:
        """Every ZIT_FLEET_REPORT_PERIOD_S: the replicas' reports and Ray's card nodes, into routing (live replicas
        and budgets per tier, lost tiers) and the metrics. A report from a node Ray reports dead is no live
        replica, however fresh."""
        from deployments.dispatch import lost_tiers, stage_lost
        from deployments.encoder import KIND as ENCODER_KIND
        from deployments.registry import ZIT_FLEET_REPORT_PERIOD_S, card_nodes, get_registry

        while True:
            try:
                if self._registry is None:
                    self._registry = get_registry()
                reports, nodes = await asyncio.gather(self._registry.replicas.remote(),
                                                      asyncio.to_thread(card_nodes))
                dead = {node["node_id"] for node in nodes if not node["alive"]}
                reports = [report for report in reports if report.get("node_id") not in dead]
                stage = [report for report in reports if report.get("kind") == ENCODER_KIND]
                reports = [report for report in reports if report.get("kind") != ENCODER_KIND]
                retired = await self._retired_cards()
                self.dispatcher.update_from_reports(reports)
                self.dispatcher.update_lost(lost_tiers(self.config.tiers, reports, nodes, retired))
                self.dispatcher.encoder_lost = stage_lost(self.config.text_encoder, stage, nodes)
                self._polled.set()
                self.metrics.fleet.observe_reports(reports, retired)
                self.metrics.fleet.observe_card_nodes(nodes)
                self.metrics.fleet.observe_stage(stage)
                self._fleet_state = (reports, nodes)
                self._stage_state = stage
            except Exception:
                logger.exception("reading the fleet registry failed; keeping the last known state")
            # The encoded images of finished requests go back to the host (deployments/hostmem.py).
            await asyncio.to_thread(trim_host_memory)
            await asyncio.sleep(ZIT_FLEET_REPORT_PERIOD_S)

    async def _retired_cards(self) -> list[str]:
        try:
            return await self._registry.retired_cards.remote()
        except AttributeError:  # a registry actor of an older version, still running from before an upgrade
            return []

    async def _store_images(self, images: list[bytes], fmt: str) -> list[str]:
        """Put images in the service's image store (one for every ingress replica), with its bounds; their ids."""
        bounds = (self.config.image_store_mb << 20, self.config.image_ttl_s)
        return list(await asyncio.gather(*(self._image_call("put", image, fmt, *bounds) for image in images)))

    async def _image_call(self, method: str, *args):
        from deployments.image_store import get_image_store

        if self._images is None:
            self._images = get_image_store()
        return await call_service_actor(self._images, method, *args, what="image store",
                                        fallback=", or ask for response_format b64_json")

    def _url(self, request: Request, path: str) -> str:
        base = self.config.public_url or str(request.base_url)
        return base.rstrip("/") + path


# The FastAPI routes above are bound to the class here, at import, so every process that imports this module (the
# driver and each replica) sees the same routes. build_app only applies deployment options.
def _bind_routes():
    from ray import serve

    return serve.ingress(api)(Ingress)


HttpIngress = _bind_routes()
