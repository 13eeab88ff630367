"""`zit plan`: which tier can hold a request, by the memory model (cluster/planning.py), printed for people or JSON.

  zit plan --size 1024x1024 --n 4 [--steps 9] [--guidance G] [--fleet FILE] [--config FILE] [--json]

With --fleet it also says what each host's replicas need in host RAM against what it has (cluster/host_memory.py);
cards their host cannot hold are planned without, as `zit up` starts them. --json prints {"tiers": [one object per
tier], "text_encoder": where it runs, "hosts": [one object per host]}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.memory import Calibration, load_calibration, uses_cfg
from cluster.planning import default_tiers, plan
from cluster.profiles import Profile
from cluster.stages import StagePlacement
from cluster.requests import parse_size
from cluster.tiers import vram_tiers


def service_tiers(
    config_path: str | Path | None, fleet: str | Path | None = None
) -> tuple[dict[str, tuple[int, bool]], dict[str, Profile], "StagePlacement | None", dict]:
    """The tiers (budget, bf16), the profiles, the text-encoder stage's placement and each host's need in host RAM
    (cluster.host_memory.HostNeed by host; none without a fleet file) the service runs with this config file (the
    defaults without one), as `zit up --config FILE --fleet FILE` builds them: one tier per VRAM
    class of the fleet file's cards (without one, every VRAM tier at its nominal size, bf16 as its typical card, and
    no stage: there is no card to place it on), each with the file's settings for that tier (`tiers_for_cards`),
    the stage placed as the file's `text_encoder` asks (runtime.nodes.plan_card_nodes) and the tiers planned beside
    it (cluster.stages.staged_tiers), and each profile through `cluster.profiles.tier_profile`, as the ingress plans
    with it: the tier's `profile` overrides and the adapters a LoRA folder (`lora_dir`) reserves. Raises ValueError
    (pydantic's, or a ProfileError / LoraError naming the knob, or the stage's refusal) for a file the service would
    refuse, OSError for one that cannot be read.
    """
    from types import SimpleNamespace

    import yaml

    from cluster.profiles import tier_profile
    from cluster.stages import staged_tiers
    from cluster.tiers import tier_budget, tiers_for_cards
    from deployments.config import ServiceConfig, load_service_config

    try:
        config = load_service_config(Path(config_path), {}) if config_path else ServiceConfig()
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path} is not valid YAML: {exc}") from None
    configured = config.tiers if "tiers" in config.model_fields_set else None
    lora = config.lora_settings()
    reserved = lora.reserved_params if lora else 0
    placement, hosts = None, {}
    if fleet is not None:
        from cluster.nvml import load_fleet
        from runtime.nodes import host_ram_of, plan_card_nodes

        stage = config.text_encoder
        cards = load_fleet(fleet)
        host_ram, head_host = host_ram_of(cards, fleet)
        _, _, tiers, placement, hosts = plan_card_nodes(cards, fleet, configured, stage.placement, stage.replicas,
                                                        reserved, host_ram, head_host)
        tiers = staged_tiers(tiers, placement.where, list(placement.tiers), placement.reserve_bytes)
    else:
        cards = [SimpleNamespace(tier=name, bf16=bf16, memory_total=budget, slots=1, speed=None)
                 for name, (budget, bf16) in default_tiers().items()]
        tiers = tiers_for_cards(cards, configured)
    return ({t.name: (tier_budget(t), t.bf16) for t in tiers},
            {t.name: tier_profile(t, reserved) for t in tiers}, placement, hosts)


def _format_table(rows: list[dict], width: int, height: int, n: int, cal: Calibration, guidance: float = 0.0) -> str:
    guided = f", guidance {guidance:g} (classifier-free: transformer batch doubled)" if guidance > 0 else ""
    lines = [f"{n} x {width}x{height}{guided}  (calibration: {cal.source}, {cal.card or 'no card'}, {cal.date})", ""]
    header = f"{'tier':<9} {'VRAM':>6} {'fits':<4} {'peak GB':>7}  {'chunks':<12} {'largest (side@n=1, n@size)':<27} technique"
    lines += [header, "-" * len(header)]
    for r in rows:
        largest = f"{r['largest']['side_at_n1']}px, n={r['largest']['n_at_size']}"
        chunks = "+".join(map(str, r["chunks"])) or "-"
        lines.append(
            f"{r['tier']:<9} {r['vram_gb']:>6.1f} {'yes' if r['fits'] else 'no':<4} {r['peak_gb']:>7.2f}  "
            f"{chunks:<12} {largest:<27} {r['technique']}"
        )
    for r in rows:
        if not r["fits"]:
            lines.append(f"  {r['tier']}: {r['reason']}")
    return "\n".join(lines)


def _format_hosts(hosts: dict) -> str:
    """Each host's RAM need against what it has (cluster/host_memory.py), a line per replica under it."""
    if not hosts:
        return ""
    lines = ["", "host RAM (steady + the largest load transient; replicas start one at a time):"]
    for need in hosts.values():
        had = f"{need.ram_bytes / 2**30:.1f} GiB" if need.ram_bytes is not None else "not given"
        verdict = "" if need.ram_bytes is None else ("  ok" if need.need <= need.ram_bytes else "  TOO SMALL")
        lines.append(f"  {need.host}: needs {need.need / 2**30:.1f} GiB, has {had}{verdict} "
                     f"({need.ray_nodes} Ray node(s){', the head' if need.head else ''}: "
                     f"{need.fixed / 2**30:.1f} GiB)")
        for what, e in need.replicas:
            lines.append(f"    {what:<40} keeps {(e.runtime + e.private) / 2**30:5.1f} GiB of its own"
                         + (f" + maps {', '.join(e.shared)}" if e.shared else ""))
        for name, size in need.shared.items():
            lines.append(f"    shared once: {name:<28} {size / 2**30:5.1f} GiB")
        for line in need.changed:
            lines.append(f"    changed: {line}")
        for card, why in need.left_out:
            lines.append(f"    left out: {card}: {why}")
    return "\n".join(lines)


def check_guidance(guidance: float) -> float:
    """`guidance` if a request may carry it as guidance_scale (the API's own bounds), else ValueError saying so."""
    from pydantic import ValidationError

    from deployments.schemas import ImageGenerationRequest

    try:
        ImageGenerationRequest(prompt="plan", guidance_scale=guidance)
    except ValidationError as exc:
        raise ValueError(f"--guidance {guidance:g}: {exc.errors()[0]['msg']} (a request's guidance_scale)") from None
    return guidance


def cmd_plan(args: argparse.Namespace) -> int:
    profiles, placement, hosts = None, None, {}
    try:
        width, height = parse_size(args.size)
        guidance = check_guidance(args.guidance)
        cal = load_calibration(args.calibration)
        if args.config or args.fleet:
            tiers, profiles, placement, hosts = service_tiers(args.config, args.fleet)
        else:
            tiers = None
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if args.n < 1:
        print(f"error: --n must be at least 1; got {args.n}", flush=True)
        return 2
    if tiers == {}:
        where = f"{args.fleet}" if args.fleet else f"{args.config}'s tiers"
        print(f"error: no card in {where} reaches the smallest tier ({min(vram_tiers().values()):g} GB)")
        return 2
    rows = plan(width, height, args.n, args.steps, tiers, cal, uses_cfg(guidance), profiles)
    stage = placement.reason if placement else "in every generator (give --fleet to place the text-encoder stage)"
    if args.json:
        print(json.dumps({"tiers": rows, "text_encoder": stage, "hosts": [h.to_dict() for h in hosts.values()]},
                         indent=2), flush=True)
    else:
        print(_format_table(rows, width, height, args.n, cal, guidance) + f"\ntext encoder: {stage}"
              + _format_hosts(hosts), flush=True)
    return 0 if any(r["fits"] for r in rows) else 1


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="which tiers can hold a request, by the memory model")
    p.add_argument("--size", default="1024x1024", help="WxH (default %(default)s)")
    p.add_argument("--n", type=int, default=1, help="images in the request (default %(default)s)")
    p.add_argument("--steps", type=int, default=9, help="denoising steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="the request's guidance_scale (default %(default)s, Turbo's); above 0 classifier-free "
                        "guidance doubles the transformer's batch")
    p.add_argument("--fleet", type=Path, help="plan for the tiers of this fleet file instead of every tier")
    p.add_argument("--config", type=Path,
                   help="the service's config (serve_config.yaml or a YAML of service settings, as `zit up --config` "
                        "reads): plan with its tier profile overrides and LoRA reserve, as the service does")
    p.add_argument("--calibration", type=Path, help="calibration JSON (default: $ZIT_CALIBRATION_FILE or shipped)")
    p.add_argument("--json", action="store_true", help="print JSON: {\"tiers\": [one object per tier], \"text_encoder\": ..., \"hosts\": [one per host]}")
    p.set_defaults(func=cmd_plan)
