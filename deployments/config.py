"""The service configuration: one pydantic model read by the CLI, serve_config.yaml and the Helm chart alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.pipeline import REAL_MODEL_ID
from cluster.tiers import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, TierConfig, cpu_tier

if TYPE_CHECKING:
    from deployments.lora import LoraSettings

# Requests one ingress replica holds at most (Serve's max_ongoing_requests; more wait at the proxy). Each is a
# coroutine waiting on cards, so the ingress's CPU, not this, is what limits it (bench/front_capacity.py).
INGRESS_MAX_ONGOING = 256
# A new replica is ready this long after its model load time (Ray starts the worker, Serve checks its health).
COLD_START_OVERHEAD_S = 5.0


class AutoscalingSettings(BaseModel):
    """`autoscaling` in the service config: the policy's knobs (autoscaling/policy.py PolicyConfig, through
    autoscaling.serve_policy.policy_config) and the start. The policy itself is named by import path, so this
    layer needs nothing of autoscaling/."""

    model_config = ConfigDict(extra="forbid")

    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas per tier at deployment; None: one per card (then the policy trims).")
    min_replicas: int = Field(0, ge=0, description="Replicas every tier keeps, idle or not.")
    target_wait_s: float = Field(20.0, gt=0, description="Longest a chunk should wait in a tier's queue.")
    target_utilization: float = Field(0.35, gt=0, le=1, description="Busy share a tier is sized for.")
    downscale_delay_s: float = Field(120.0, ge=0, description="How long the need stays lower before scaling down.")
    idle_timeout_s: float = Field(300.0, ge=0, description="Seconds without work before a tier goes to zero.")
    cold_start_s: float = Field(60.0, ge=0, description="Model load time assumed until replicas have measured it.")
    metrics_interval_s: float = Field(2.0, gt=0, description="How often replicas report their metrics to Serve.")
    ingress_target_requests: int = Field(
        64, ge=1, le=INGRESS_MAX_ONGOING, description=(
            "Requests one ingress replica should hold (its limit is 256); with `ingress_max_replicas` above "
            "`ingress_replicas`, the ingress is sized for this many per replica."))

    def serve_autoscaling_config(self, tier: str, cards: int, prior_units_per_s: float | None = None,
                                 vram_bytes: int | None = None) -> dict:
        """The deployment's `autoscaling_config` for a tier of `cards` cards (`vram_bytes`: its cards' memory, which
        orders the tiers for the application-level policy)."""
        initial = cards if self.initial_replicas is None else min(self.initial_replicas, cards)
        return {
            "min_replicas": min(self.min_replicas, cards),
            "max_replicas": max(cards, 1),
            "initial_replicas": initial,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": 2 * self.metrics_interval_s,
            # The policy holds its own delays (hysteresis, idle timeout): Serve applies its decisions as they come.
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 0.0,
            "policy": {"policy_function": "autoscaling.serve_policy:TierAutoscaler",
                       "policy_kwargs": {"tier": tier, "settings": self.model_dump(),
                                         "prior_units_per_s": prior_units_per_s, "vram_bytes": vram_bytes}},
        }

    def ingress_autoscaling_config(self, least: int, most: int) -> dict:
        """The ingress's `autoscaling_config`: between `least` and `most` replicas, sized by the requests they hold
        (autoscaling/serve_policy.py IngressAutoscaler)."""
        return {
            "min_replicas": least,
            "max_replicas": most,
            "initial_replicas": least,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": 2 * self.metrics_interval_s,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 0.0,  # the policy holds its own (downscale_delay_s)
            "policy": {"policy_function": "autoscaling.serve_policy:IngressAutoscaler",
                       "policy_kwargs": {"ingress": self.ingress_target_requests,
                                         "downscale_delay_s": self.downscale_delay_s}},
        }

    def stage_autoscaling_config(self, most: int) -> dict:
        """The text-encoder stage's `autoscaling_config`: between one replica and `most` (the cards that host it),
        by the requests its replicas hold (autoscaling/policy.py stage_replicas)."""
        return {
            "min_replicas": 1,
            "max_replicas": max(1, most),
            "initial_replicas": 1,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": 2 * self.metrics_interval_s,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": self.downscale_delay_s,
            "policy": {"policy_function": "autoscaling.serve_policy:StageAutoscaler",
                       "policy_kwargs": {"stage": "text_encoder"}},
        }


class TextEncoderSettings(BaseModel):
    """`text_encoder` in the service config: where the text-encoder stage runs (cluster/stages.py) and its cache.

    `placement` is what the operator asks; `where`, `cards`, `tier`, `profile` and `reserve_bytes` are what `zit up`
    (or the Helm chart) resolved it to for the fleet at hand (`resolve`). Unresolved ('auto' or 'card' with no
    `where`), the stage is off and every generator keeps its own encoder, as the pipeline has it."""

    model_config = ConfigDict(extra="forbid")

    placement: Literal["auto", "card", "cpu", "local"] = Field(
        "auto", description="'auto': on the card with the most VRAM to spare, else in every generator; 'card': on a "
        "card or refuse to start; 'cpu': on the head's CPU; 'local': in every generator.")
    replicas: int = Field(1, ge=1, le=16, description="Stage replicas: one per card that hosts one ('card'), or on "
                          "the head ('cpu').")
    cache_mb: int = Field(256, ge=0, description="Prompt embeddings each stage replica keeps (least recently used go "
                          "first); 0 turns the cache off. A real prompt's embeddings are about 0.3 MB in bf16.")
    wait_s: float = Field(120.0, gt=0, description="Longest a request waits for the stage to answer before it gets "
                          "503 with Retry-After (a cold encode of the real model on a card takes about a second).")
    where: Literal["card", "cpu", "local"] | None = Field(None, description="Resolved: where the stage runs.")
    cards: list[str] = Field(default_factory=list, description="Resolved: NVML uuids of the cards hosting it.")
    tiers: list[str] = Field(default_factory=list, description="Resolved: the tiers of those cards; each plans with "
                             "`reserve_bytes` less memory.")
    profile: dict | None = Field(None, description="Resolved: the stage's profile (cluster/stages.py stage_profile).")
    reserve_bytes: int = Field(0, ge=0, description="Resolved: the stage's predicted peak on each of its cards.")

    @property
    def enabled(self) -> bool:
        """Whether a stage encodes for the generators (resolved to a card or the CPU)."""
        return self.where in ("card", "cpu")

    def resolve(self, placement) -> "TextEncoderSettings":
        """These settings with a cluster.stages.StagePlacement filled in."""
        return self.model_copy(update={
            "where": placement.where, "cards": list(placement.cards), "tiers": list(placement.tiers),
            "reserve_bytes": placement.reserve_bytes,
            "profile": placement.profile.model_dump() if placement.profile else None})


class ServiceConfig(BaseModel):
    """Everything the Serve application needs; `build_app` takes exactly this."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tiny",
        description=(
            "'tiny' (random tiny weights built offline), a local diffusers-format Z-Image-Turbo folder, "
            f"or '{REAL_MODEL_ID}' once `zit download` has fetched it."
        ),
    )
    model_name: str = Field(
        "z-image-turbo", min_length=1, description="Name reported by /v1/models and accepted in a request's `model`."
    )
    tiers: list[TierConfig] = Field(
        default_factory=lambda: [cpu_tier()], min_length=1, description="Generator deployments, one per tier."
    )
    max_image_side: int = Field(
        MAX_IMAGE_SIDE, ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE,
        description="Largest width or height a request may ask for.",
    )
    max_n: int = Field(10, ge=1, le=10, description="Most images one request may ask for (OpenAI allows 1..10).")
    max_prompt_chars: int = Field(4000, ge=1, description="Longest prompt (and negative prompt) accepted, in characters.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still running after this gets 504.")
    image_ttl_s: float = Field(3600.0, gt=0, description="How long images returned as URLs stay downloadable.")
    image_store_mb: int = Field(256, ge=1, description="Memory for images returned as URLs, in one store on the head "
                                "for every ingress replica; oldest go first.")
    public_url: str | None = Field(
        None, description="Base URL clients reach the service at (for url responses); default: the request's host."
    )
    validate_responses: bool = Field(
        False, description=("Build each OpenAI image response as its pydantic model and let FastAPI validate and "
                            "write it (a pass over every image's bytes, about 3x the ingress's CPU per 1024x1024 "
                            "image), instead of writing its JSON once: to debug a client, and the baseline of "
                            "bench/front_capacity.py."),
    )
    ingress_replicas: int = Field(
        1, ge=1, description=("Ingress replicas (at least, when autoscaled). Each admits its share of every tier's "
                              "queue bound and of each API key's rate, by the replicas running; URL images, "
                              "progress and the metrics' counts are shared (docs/architecture.md). `zit up` "
                              "chooses 2 where the head has 4 cores or more, the Helm chart 2.")
    )
    ingress_max_replicas: int | None = Field(
        None, ge=1, description=("Most ingress replicas when the service is autoscaled (`autoscaling`): Serve adds "
                                 "them as the requests held pass `autoscaling.ingress_target_requests` per replica. "
                                 "None: `ingress_replicas`, fixed.")
    )
    ingress_resource: str | None = Field(
        "zit_ingress",
        description=(
            "A Ray resource only the head node has: the ingress is placed there, so losing a card's node never "
            "takes the HTTP entry point with it. `zit up` and the Helm chart give the head this resource; set "
            "None on a cluster you started yourself without it."
        ),
    )
    api_keys_file: str | None = Field(
        None, description="File of API keys (one per line, `name:key`); when set, every API call needs one."
    )
    rate_limit_per_minute: int | None = Field(
        None, ge=1, description="Requests each API key may make per minute (token bucket); none when unset."
    )
    tier_policy: Literal["tier_aware", "round_robin", "largest"] = Field(
        "tier_aware",
        description=(
            "How chunks choose a tier: tier_aware (memory model, load, retries elsewhere). round_robin and largest "
            "are the baselines the benchmarks and tests measure against: they ignore the memory model (round_robin) "
            "or use only the largest tier (largest), and never retry."
        ),
    )
    link_aware: bool = Field(
        True, description="Take each card's PCIe link into the time model, the tier choice and the in-tier router "
        "(cluster/link.py). false: every card is taken at the default copy rate, as before links were read (the "
        "baseline bench/fleet_routing.py --links measures against).",
    )
    lora_dir: str | None = Field(
        None,
        description=(
            "Folder of LoRA adapters (`<name>.safetensors`) requests may name in `lora`; the same path on every node. "
            "None: LoRA is off. With model 'tiny', `zit up` serves the tiny model's own adapters by default."
        ),
    )
    lora_slots: int = Field(
        2, ge=1, le=16, description="Adapters one replica keeps loaded (Serve model multiplexing; least recently used "
        "goes first). The memory model reserves this many times the largest adapter on every card.",
    )
    lora_fuse: bool = Field(
        False, description="Fuse the requested adapter into the weights (faster steps; a switch of adapter or scale "
        "costs an unfuse and a fuse, and in bf16 each rounds the weights a little). Only on tiers whose transformer "
        "is resident in its compute dtype; elsewhere adapters stay unfused.",
    )
    lora_reserve_params: int | None = Field(
        None, ge=0, description="Parameters reserved per adapter slot. None: the largest adapter in lora_dir when the "
        "app is built; adapters added later that are larger are refused until a restart.",
    )
    autoscaling: AutoscalingSettings | None = Field(
        None,
        description=(
            "Replicas per tier follow demand (autoscaling/serve_policy.py): up to one per card, down to zero after "
            "idle_timeout_s. None: every tier runs its configured replicas, always."
        ),
    )
    in_tier_router: Literal["vram_aware", "ray_default"] = Field(
        "vram_aware", description="Replica choice within a tier: VramAwareRouter, or Ray's PowerOfTwoChoices."
    )
    text_encoder: TextEncoderSettings = Field(
        default_factory=TextEncoderSettings,
        description="The text-encoder stage: encodes each request once (cached) for every tier that runs it "
        "(deployments/encoder.py); resolved by `zit up` for the fleet.",
    )

    def lora_settings(self) -> "LoraSettings | None":
        """What replicas and the ingress need to serve LoRA, or None when it is off. The per-slot reserve is the
        configured one, else the largest adapter in the folder now (build_app fixes it once for the whole app)."""
        from deployments.lora import LoraLibrary, LoraSettings

        if not self.lora_dir:
            return None
        reserve = self.lora_reserve_params
        if reserve is None:
            reserve = LoraLibrary(self.lora_dir).largest_params()
        return LoraSettings(folder=self.lora_dir, slots=self.lora_slots, fuse=self.lora_fuse, reserve_params=reserve)

    @model_validator(mode="after")
    def _tier_names_unique(self) -> "ServiceConfig":
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique; repeated: {dupes}")
        if self.ingress_max_replicas is not None and self.ingress_max_replicas < self.ingress_replicas:
            raise ValueError(f"ingress_max_replicas ({self.ingress_max_replicas}) is below ingress_replicas "
                             f"({self.ingress_replicas}); raise it, or leave it out for a fixed count")
        return self


def load_service_config(path: Path | None, overrides: dict) -> ServiceConfig:
    """ServiceConfig from a serve_config.yaml (its first application's args) or a plain YAML of the same fields, with
    `overrides` (those not None) on top. Raises pydantic's ValidationError for a file the service would refuse,
    yaml.YAMLError for one that is not YAML, OSError for one that cannot be read."""
    import yaml

    data: dict = {}
    if path is not None:
        raw = yaml.safe_load(path.read_text()) or {}
        if "applications" in raw:
            data = dict(raw["applications"][0].get("args") or {})
        else:
            data = raw
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServiceConfig.model_validate(data)
