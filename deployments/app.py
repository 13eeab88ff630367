"""build_app: the one place where plain classes become Serve deployments with per-tier options.

serve_config.yaml points at `deployments.app:build_app`; Serve validates its `args` into ServiceConfig.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.stages import staged_tiers
from deployments.config import INGRESS_MAX_ONGOING, ServiceConfig
from deployments.encoder import TextEncoder
from deployments.generator import Generator
from deployments.ingress import HttpIngress
from deployments.router import ZIT_ROUTING_STATS_PERIOD_S, VramAwareRouter
from runtime.nodes import TEXT_ENCODER_RESOURCE

# Seconds Serve waits for a replica to finish its requests when it is scaled down or redeployed.
GRACEFUL_SHUTDOWN_S = 30.0


APP_IMPORT_PATH = "deployments.app:build_app"
# The application-level autoscaling policy (autoscaling/serve_policy.py FleetAutoscaler) as serve_config.yaml, the
# Helm chart and `zit up` name it (`autoscaling_policy`): by import path, so this layer imports nothing of it.
APPLICATION_POLICY = {"policy_function": "autoscaling.serve_policy:FleetAutoscaler"}


TEXT_ENCODER_DEPLOYMENT = "TextEncoder"
# Where Serve runs HTTP proxies (`zit up`, serve_config.yaml, the Helm chart): on every node with a replica, so a load
# balancer in front spreads over them and the head is not the one door. Each forwards to any ingress replica, and
# replays a request whose ingress replica died (deployments/proxy.py).
PROXY_LOCATION = "EveryNode"


def generator_deployment_name(tier: str) -> str:
    return f"Generator_{tier}"


def _prior_units_per_s(tier) -> float:
    """The throughput prior of a tier's autoscaler: the time model for its profile at its slowest card's speed and
    link (an x1 riser's card streams its weights 15 times slower than on a x16 slot: the tier needs more replicas)."""
    from cluster.speed import prior_units_per_s
    from cluster.tiers import tier_link

    if tier.device != "cuda":
        return prior_units_per_s("vram_24", 1.0, True)
    return prior_units_per_s(tier.name, tier.speed, tier.bf16, tier_link(tier))


def build_app(config: ServiceConfig) -> Application:
    """One Ingress plus one Generator deployment per configured tier."""
    if isinstance(config, dict):  # `serve run module:build_app key=value` passes a dict
        config = ServiceConfig.model_validate(config)
    if config.lora_dir:
        from deployments.lora import lora_folder

        # An absolute folder (replicas run elsewhere) and the LoRA memory reserve fixed once, so the ingress and
        # every replica plan with the same number.
        config = config.model_copy(update={"lora_dir": str(lora_folder(config.lora_dir))})
        config = config.model_copy(update={"lora_reserve_params": config.lora_settings().reserve_params})
    # The text-encoder stage, when resolved to a card or the CPU: every tier's profile without its own encoder, and
    # the tiers of the cards that host it planned with its memory taken (cluster/stages.py staged_tiers).
    stage = config.text_encoder
    if stage.where == "card" and stage.profile is None:  # the chart names the hosting tiers; the memory model the rest
        from cluster.profiles import tier_profile
        from cluster.stages import place_on_tiers

        stage = stage.resolve(place_on_tiers(config.tiers, {t.name: tier_profile(t) for t in config.tiers},
                                             stage.tiers, stage.replicas))
    config = config.model_copy(update={"text_encoder": stage, "tiers": staged_tiers(
        config.tiers, stage.where, stage.tiers, stage.reserve_bytes)})
    if not config.link_aware:  # every card at the time model's default rate, as before links were read
        config = config.model_copy(update={"tiers": [t.model_copy(update={"link_aware": False})
                                                     for t in config.tiers]})
    lora = config.lora_settings()
    encoder = text_encoder_deployment(config).bind(stage, config.model) if stage.enabled else None
    generators = {}
    for tier in config.tiers:
        # Autoscaled: between the policy's minimum and one replica per card (the tier's configured count).
        replicas = ({"autoscaling_config": config.autoscaling.serve_autoscaling_config(
                        tier.name, tier.num_replicas, _prior_units_per_s(tier), tier.vram_bytes)}
                    if config.autoscaling is not None else {"num_replicas": tier.num_replicas})
        deployment = serve.deployment(Generator).options(
            name=generator_deployment_name(tier.name),
            **replicas,
            max_ongoing_requests=tier.max_ongoing_requests,
            max_queued_requests=tier.max_queued_requests,
            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
            request_router_config=RequestRouterConfig(
                request_routing_stats_period_s=ZIT_ROUTING_STATS_PERIOD_S,
                **({"request_router_class": VramAwareRouter} if config.in_tier_router == "vram_aware" else {}),
            ),
            ray_actor_options={
                "num_cpus": tier.num_cpus,
                "num_gpus": tier.num_gpus,
                "resources": dict(tier.resources),
            },
        )
        generators[tier.name] = deployment.bind(tier, config.model, lora)
    most = config.ingress_max_replicas or config.ingress_replicas
    scaling = ({"autoscaling_config": config.autoscaling.ingress_autoscaling_config(config.ingress_replicas, most)}
               if config.autoscaling is not None and most > config.ingress_replicas
               else {"num_replicas": config.ingress_replicas})
    ingress = serve.deployment(HttpIngress).options(
        name="Ingress",
        **scaling,
        # The ingress only validates and waits; it must not hold a CPU a Generator could use. It stays on the head.
        ray_actor_options={"num_cpus": 0,
                           "resources": {config.ingress_resource: 0.01} if config.ingress_resource else {}},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
    )
    return ingress.bind(config, generators, encoder)


def text_encoder_deployment(config: ServiceConfig):
    """The text-encoder stage as a deployment: one replica per card that hosts it (each offers the stage's
    resource once) or `replicas` on the head's CPU; autoscaled with the service (within those bounds, by the
    requests it holds) when the service is."""
    stage = config.text_encoder
    if stage.where == "card":  # one per card zit up chose, or `replicas` on the pods of the chart's worker group
        replicas, resources = len(stage.cards) or stage.replicas, {TEXT_ENCODER_RESOURCE: 1.0}
    else:  # the head's CPU
        replicas = stage.replicas
        resources = {config.ingress_resource: 0.01} if config.ingress_resource else {}
    scaling = ({"autoscaling_config": config.autoscaling.stage_autoscaling_config(replicas)}
               if config.autoscaling is not None else {"num_replicas": replicas})
    return serve.deployment(TextEncoder).options(
        name=TEXT_ENCODER_DEPLOYMENT, **scaling, max_ongoing_requests=64, graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        ray_actor_options={"num_cpus": 1, "num_gpus": 0, "resources": resources},
    )


def deploy_schema(config: ServiceConfig, name: str, host: str, port: int) -> "ServeDeploySchema":
    """What `serve deploy serve_config.yaml` hands Serve for `config`: the builder by import path, the settings as
    args, the application-level autoscaling policy (autoscaling/serve_policy.py FleetAutoscaler)."""
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate({
        "proxy_location": PROXY_LOCATION,
        "http_options": {"host": host, "port": port},
        "applications": [{"name": name, "route_prefix": "/", "import_path": APP_IMPORT_PATH,
                          "args": config.model_dump(mode="json"),
                          "autoscaling_policy": APPLICATION_POLICY}],
    })


def deploy(config: ServiceConfig, name: str, host: str, port: int, poll_s: float = 1.0,
           progress=None, progress_every_s: float = 30.0) -> None:
    """Deploy `config` the way serve_config.yaml and KubeRay do (Serve builds the app from its import path; only
    that path takes an application-level autoscaling policy) and wait until it runs. Serve must be started (serve.
    start) with the same host and port. While it waits, `progress` (a callable taking a line) hears every
    `progress_every_s` which deployments are not ready and why (Serve's message: replicas loading, or waiting for
    resources no node has). Raises RuntimeError with Serve's message if the deployment fails."""
    import time

    from ray.serve.context import _get_global_client  # Ray's own `serve run config.yaml` deploys through it

    _get_global_client().deploy_apps(deploy_schema(config, name, host, port))
    started = last_said = time.monotonic()
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {name} {status.status.lower()}: {status.message}")
        if progress is not None and status is not None and time.monotonic() - last_said >= progress_every_s:
            last_said = time.monotonic()
            waiting = [f"{d}: {s.status}" + (f" ({s.message.strip()[:300]})" if s.message else "")
                       for d, s in status.deployments.items() if s.status != "HEALTHY"]
            progress(f"still deploying after {last_said - started:.0f} s: " + ("; ".join(waiting) or status.status))
        time.sleep(poll_s)
