"""`zit up` and `zit down`: the local Ray cluster, a node per card, and the service deployed on it."""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

from cli.common import APP_NAME, no_card_why, say


def discover_cards(args: argparse.Namespace):
    """(cards, fleet file or None, a sentence saying what the service runs on).

    --cpu: no cards. --fleet FILE: the simulated cards of FILE. Otherwise the real cards NVML finds; with no NVIDIA
    driver or no card, the simulated mixed fleet, said plainly.
    """
    from cluster.nvml import DEFAULT_FLEET, NvmlUnavailable, load_fleet, probe

    if getattr(args, "cpu", False):
        return [], None, "the CPU (one replica, no card)"
    if args.fleet:
        return load_fleet(args.fleet), args.fleet, f"the SIMULATED fleet {args.fleet}"
    try:
        cards = probe()
    except NvmlUnavailable as exc:
        reason = str(exc).split(":")[0]
    else:
        if cards:
            return cards, None, f"{len(cards)} NVIDIA card(s) found by NVML"
        reason = "NVML found no NVIDIA card"
    return (
        load_fleet(DEFAULT_FLEET),
        DEFAULT_FLEET,
        f"the SIMULATED fleet {DEFAULT_FLEET.name} ({reason}). Images come from the tiny model on the CPU; each "
        "simulated card enforces the VRAM budget the real model would need. Use --cpu for one CPU replica, "
        "--fleet FILE for another simulated fleet, or install the NVIDIA driver to serve real cards",
    )


# Ingress replicas where the config does not say: two where the head has room (a core for each beside Ray's own
# processes), one on a smaller machine, where a second would compete with the replicas for its cores.
INGRESS_ROOM_CORES = 4


def ingress_replicas(config, asked: int | None) -> tuple[int, str]:
    """(ingress replicas for `zit up`, why): `asked` (--ingress-replicas), the config's own, or by the cores here."""
    if asked:
        return asked, "--ingress-replicas"
    if "ingress_replicas" in config.model_fields_set:
        return config.ingress_replicas, "from the config"
    cores = os.cpu_count() or 1
    if cores >= INGRESS_ROOM_CORES:
        return 2, f"{cores} cores here"
    return 1, f"{cores} cores here: room for one; --ingress-replicas 2 for more"


def cmd_up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deployments.config import AutoscalingSettings, load_service_config
    from runtime import local
    from runtime.nodes import apply_splits, cards_to_join, host_ram_of, plan_card_nodes

    try:
        config = load_service_config(args.config, {"model": args.model, "lora_dir": args.lora_dir})
        if args.autoscale and config.autoscaling is None:
            config = config.model_copy(update={"autoscaling": AutoscalingSettings()})
        cards, fleet_file, what = discover_cards(args)
    except (ValidationError, OSError) as exc:
        say(f"error: bad configuration: {exc}")
        return 2
    ingress, why = ingress_replicas(config, args.ingress_replicas)
    if config.ingress_max_replicas is not None and config.ingress_max_replicas < ingress:
        say(f"error: {ingress} ingress replicas is above ingress_max_replicas ({config.ingress_max_replicas}); "
            "raise it, or ask for fewer")
        return 2
    config = config.model_copy(update={"ingress_replicas": ingress})
    try:
        cards = apply_splits(cards, args.split)
    except ValueError as exc:
        say(f"error: {exc}")
        return 2
    from cluster.pipeline import ModelNotFound, resolve_model
    from deployments.auth import KeyFileError, load_keys
    from deployments.lora import LoraError

    try:  # fail here, with the fix, rather than in a replica's log
        model_path = resolve_model(config.model)
        if config.model == "tiny" and not config.lora_dir:  # the embedded default comes with adapters to try
            from cluster.pipeline import models_dir
            from cluster.tiny_model import ensure_tiny_loras

            config = config.model_copy(update={"lora_dir": str(ensure_tiny_loras(models_dir(), model_path))})
        if config.lora_dir:
            from deployments.lora import LoraLibrary, lora_folder

            config = config.model_copy(update={"lora_dir": str(lora_folder(config.lora_dir))})
            names = LoraLibrary(config.lora_dir).names()
            say(f"LoRA: {len(names)} adapter(s) in {config.lora_dir}: {', '.join(names) or 'none yet'}")
        if config.api_keys_file:
            say(f"API keys: {len(load_keys(config.api_keys_file))} from {config.api_keys_file}")
    except (ModelNotFound, KeyFileError, LoraError) as exc:
        say(f"error: {exc}")
        return 2

    # 1. Tiers: one per VRAM class present, one replica per card (or the configured CPU tier).
    say(f"Serving on {what}.")
    nodes = []
    stage = config.text_encoder
    if cards:
        configured = config.tiers if "tiers" in config.model_fields_set else None
        lora = config.lora_settings()
        try:
            host_ram, head_host = host_ram_of(cards, fleet_file, running=local.is_running())
            nodes, skipped, tiers, placement, hosts = plan_card_nodes(
                cards, fleet_file, configured, stage.placement, stage.replicas, lora.reserved_params if lora else 0,
                host_ram, head_host)
        except ValueError as exc:  # the stage was asked on a card and none has room for it
            say(f"error: {exc}")
            return 2
        for line in skipped:
            say(f"  skipped: {line}")
        if not nodes:
            say(f"error: no card can serve ({no_card_why()}); use --cpu")
            return 2
        config = config.model_copy(update={"tiers": tiers, "text_encoder": stage.resolve(placement)})
        for node in nodes:
            slots = f" x {node.card.slots} slots" if node.card.slots > 1 else ""
            stage_note = "  + text-encoder stage" if node.card.uuid in placement.cards else ""
            say(f"  {node.card.name:<32} {node.card.memory_total / 2**30:5.1f} GiB  -> {node.card.tier}{slots}"
                f"{stage_note}")
        say(f"  text encoder: {placement.reason}")
        for need in hosts.values():
            had = f"{need.ram_bytes / 2**30:.1f} GiB" if need.ram_bytes is not None else "not checked"
            say(f"  host {need.host}: its replicas need {need.need / 2**30:.1f} GiB of RAM ({had})")
            for line in need.changed:
                say(f"    {line}")
    elif stage.placement == "cpu":  # no card: the stage only runs where it was asked to, on the head's CPU
        from cluster.stages import place_text_encoder

        config = config.model_copy(update={"text_encoder": stage.resolve(place_text_encoder([], [], {}, "cpu"))})

    # 2. Ray: the head here, then one node per card that is not in the cluster yet.
    mode = local.ensure_auth_mode()
    say(f"Starting Ray (auth mode: {mode}, dashboard: {'127.0.0.1:8265' if args.dashboard else 'off'}) ...")
    started = time.perf_counter()
    fresh = local.start_head(dashboard=args.dashboard)
    if not fresh and args.vram_tiers:
        say("A Ray cluster is already running here, and its processes keep the tier table they started with: run "
             "`zit down` first to serve with --tiers.")
        return 2
    if not fresh:
        say("A Ray cluster is already running here; deploying onto it (its processes keep the tier table and the "
             "environment they started with: `zit down` first to change them).")

    import ray
    from ray import serve

    from deployments.app import PROXY_LOCATION, deploy
    from deployments.registry import card_nodes

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    present = {n["labels"].get("zit/card"): n["labels"] for n in card_nodes() if n["alive"]}
    missing, _, warnings = cards_to_join(nodes, present)
    for line in warnings:  # a card already joined keeps the resources it joined with
        say(line)
    if missing:
        say(f"Starting {len(missing)} card node(s) ...")
        from runtime.nodes import start_card_nodes

        for line in start_card_nodes(local.head_address(), missing, node_ip="127.0.0.1",
                                     proxy_port_from=args.proxy_port_from):
            say(f"  {line}")

    say(f"Deploying {config.model_name} from {model_path} on tiers {[t.name for t in config.tiers]} ...")
    scaled = (f", up to {config.ingress_max_replicas} by load" if config.autoscaling is not None
              and (config.ingress_max_replicas or 0) > ingress else "")
    say(f"  ingress: {ingress} replica(s){scaled} ({why}); an HTTP proxy on the head and on every card node "
        "with a replica")
    serve.start(http_options={"host": args.host, "port": args.port}, proxy_location=PROXY_LOCATION)
    try:  # as serve_config.yaml and KubeRay deploy it: Serve builds the app and sizes autoscaled tiers together
        deploy(config, APP_NAME, args.host, args.port, progress=lambda line: say(f"  {line}"))
    except Exception as exc:  # Serve's own errors come back as Ray task errors with its message
        say(f"error: the deployment failed: {str(exc).strip().splitlines()[-1][:2000]}")
        say("  (an application started another way, e.g. by an older `zit up`: run `zit down` first)")
        return 1
    url = f"http://{args.host}:{args.port}"
    say(f"ZIT Cluster is serving at {url} (ready in {time.perf_counter() - started:.1f} s)")
    say(
        f"  try: curl -s {url}/v1/images/generations -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"a red fox\", \"size\": \"256x256\"}'"
    )
    if args.detach:
        say("Running in the background; stop it with `zit down`.")
        ray.shutdown()
        return 0

    say("Press Ctrl-C to stop.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    say("Stopping ...")
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        local.stop()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from runtime import local

    if not local.is_running():
        say("No Ray cluster is running here.")
        local.stop()  # clears leftovers of a crashed cluster
        return 0
    import ray
    from ray import serve

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    serve.shutdown()
    ray.shutdown()
    local.stop()
    say("Stopped.")
    return 0
