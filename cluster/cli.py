"""The `zit` command: run the service, see the fleet, fetch weights, generate from the shell.

  zit up [--fleet FILE | --cpu] [--model tiny|PATH|Tongyi-MAI/Z-Image-Turbo] [--config serve_config.yaml] [--detach]
         [--split CARD=TIER] [--tiers GB,GB,...]
  zit down
  zit fleet [--fleet FILE] [--json] [--tiers GB,GB,...]
  zit node --address HEAD[:PORT] [--fleet FILE] [--host NAME] [--split CARD=TIER] [--tiers GB,GB,...]
  zit download [--model Tongyi-MAI/Z-Image-Turbo] [--dir DIR]
  zit generate "a red fox" --size 256x256 --n 2 -o out/
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_FLEET = Path(__file__).resolve().parent / "fleets" / "mixed.yaml"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
APP_NAME = "zit"


def _say(message: str) -> None:
    print(message, flush=True)


def load_service_config(path: Path | None, overrides: dict):
    """ServiceConfig from a serve_config.yaml (its first application's args) or a plain YAML of the same fields."""
    import yaml

    from deployments.config import ServiceConfig

    data: dict = {}
    if path is not None:
        raw = yaml.safe_load(path.read_text()) or {}
        if "applications" in raw:
            data = dict(raw["applications"][0].get("args") or {})
        else:
            data = raw
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ServiceConfig.model_validate(data)


# -- zit up / down ---------------------------------------------------------------------------------------------


def discover_cards(args: argparse.Namespace):
    """(cards, fleet file or None, a sentence saying what the service runs on).

    --cpu: no cards. --fleet FILE: the simulated cards of FILE. Otherwise the real cards NVML finds; with no NVIDIA
    driver or no card, the simulated mixed fleet, said plainly.
    """
    from cluster.nvml import NvmlUnavailable, load_fleet, probe

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


def cmd_up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster import local
    from cluster.node import apply_splits, cards_to_join, nodes_for_cards
    from cluster.tiers import tiers_for_cards

    try:
        config = load_service_config(args.config, {"model": args.model, "lora_dir": args.lora_dir})
        if args.autoscale and config.autoscaling is None:
            from autoscaling.serve_policy import AutoscalingSettings

            config = config.model_copy(update={"autoscaling": AutoscalingSettings()})
        cards, fleet_file, what = discover_cards(args)
    except (ValidationError, OSError) as exc:
        _say(f"error: bad configuration: {exc}")
        return 2
    try:
        cards = apply_splits(cards, args.split)
    except ValueError as exc:
        _say(f"error: {exc}")
        return 2
    from deployments.auth import KeyFileError, load_keys
    from deployments.lora import LoraError
    from deployments.pipeline import ModelNotFound, resolve_model

    try:  # fail here, with the fix, rather than in a replica's log
        model_path = resolve_model(config.model)
        if config.model == "tiny" and not config.lora_dir:  # the embedded default comes with adapters to try
            from deployments.pipeline import models_dir
            from deployments.tiny_model import ensure_tiny_loras

            config = config.model_copy(update={"lora_dir": str(ensure_tiny_loras(models_dir(), model_path))})
        if config.lora_dir:
            from deployments.lora import LoraLibrary, lora_folder

            config = config.model_copy(update={"lora_dir": str(lora_folder(config.lora_dir))})
            names = LoraLibrary(config.lora_dir).names()
            _say(f"LoRA: {len(names)} adapter(s) in {config.lora_dir}: {', '.join(names) or 'none yet'}")
        if config.api_keys_file:
            _say(f"API keys: {len(load_keys(config.api_keys_file))} from {config.api_keys_file}")
    except (ModelNotFound, KeyFileError, LoraError) as exc:
        _say(f"error: {exc}")
        return 2

    # 1. Tiers: one per VRAM class present, one replica per card (or the configured CPU tier).
    _say(f"Serving on {what}.")
    nodes = []
    if cards:
        nodes, skipped = nodes_for_cards(cards, fleet_file)
        for line in skipped:
            _say(f"  skipped: {line}")
        if not nodes:
            _say(f"error: no card can serve ({_no_card_why()}); use --cpu")
            return 2
        configured = config.tiers if "tiers" in config.model_fields_set else None
        config = config.model_copy(update={"tiers": tiers_for_cards([n.card for n in nodes], configured)})
        for node in nodes:
            slots = f" x {node.card.slots} slots" if node.card.slots > 1 else ""
            _say(f"  {node.card.name:<32} {node.card.memory_total / 2**30:5.1f} GiB  -> {node.card.tier}{slots}")

    # 2. Ray: the head here, then one node per card that is not in the cluster yet.
    mode = local.ensure_auth_mode()
    _say(f"Starting Ray (auth mode: {mode}, dashboard: {'127.0.0.1:8265' if args.dashboard else 'off'}) ...")
    started = time.perf_counter()
    fresh = local.start_head(dashboard=args.dashboard)
    if not fresh and args.vram_tiers:
        _say("A Ray cluster is already running here, and its processes keep the tier table they started with: run "
             "`zit down` first to serve with --tiers.")
        return 2
    if not fresh:
        _say("A Ray cluster is already running here; deploying onto it (its processes keep the tier table and the "
             "environment they started with: `zit down` first to change them).")

    import ray
    from ray import serve

    from deployments.app import deploy
    from deployments.registry import card_nodes

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    present = {n["labels"].get("zit/card"): n["labels"] for n in card_nodes() if n["alive"]}
    missing, _, warnings = cards_to_join(nodes, present)
    for line in warnings:  # a card already joined keeps the resources it joined with
        _say(line)
    if missing:
        _say(f"Starting {len(missing)} card node(s) ...")
        from cluster.node import start_card_nodes

        for line in start_card_nodes(local.head_address(), missing, node_ip="127.0.0.1"):
            _say(f"  {line}")

    _say(f"Deploying {config.model_name} from {model_path} on tiers {[t.name for t in config.tiers]} ...")
    serve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly")
    try:  # as serve_config.yaml and KubeRay deploy it: Serve builds the app and sizes autoscaled tiers together
        deploy(config, APP_NAME, args.host, args.port, progress=lambda line: _say(f"  {line}"))
    except Exception as exc:  # Serve's own errors come back as Ray task errors with its message
        _say(f"error: the deployment failed: {str(exc).strip().splitlines()[-1][:2000]}")
        _say("  (an application started another way, e.g. by an older `zit up`: run `zit down` first)")
        return 1
    url = f"http://{args.host}:{args.port}"
    _say(f"ZIT Cluster is serving at {url} (ready in {time.perf_counter() - started:.1f} s)")
    _say(
        f"  try: curl -s {url}/v1/images/generations -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"a red fox\", \"size\": \"256x256\"}'"
    )
    if args.detach:
        _say("Running in the background; stop it with `zit down`.")
        ray.shutdown()
        return 0

    _say("Press Ctrl-C to stop.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    _say("Stopping ...")
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        local.stop()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cluster import local

    if not local.is_running():
        _say("No Ray cluster is running here.")
        local.stop()  # clears leftovers of a crashed cluster
        return 0
    import ray
    from ray import serve

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    serve.shutdown()
    ray.shutdown()
    local.stop()
    _say("Stopped.")
    return 0


# -- zit fleet / node --------------------------------------------------------------------------------------------


def _fleet_cards(args: argparse.Namespace):
    """The cards of --fleet FILE, else the real ones (NvmlUnavailable when there is no driver), with the --split
    specs applied (ValueError saying why when one cannot be)."""
    from cluster.node import apply_splits
    from cluster.nvml import load_fleet, probe

    return apply_splits(load_fleet(args.fleet) if args.fleet else probe(), args.split)


def cmd_fleet(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from cluster.nvml import NvmlUnavailable

    try:
        cards = _fleet_cards(args)
    except NvmlUnavailable as exc:
        _say(f"error: {str(exc).split(':')[0]}: no NVIDIA driver here. To see a simulated fleet: "
             f"zit fleet --fleet {DEFAULT_FLEET}")
        return 1
    except (OSError, ValidationError) as exc:
        _say(f"error: bad fleet file: {exc}")
        return 2
    except ValueError as exc:
        _say(f"error: {exc}")
        return 2
    if args.json:
        print(json.dumps([c.to_dict() for c in cards], indent=2))
        return 0
    header = f"{'#':>3}  {'card':<34} {'tier':<10} {'total':>7} {'free':>7}  {'cc':<4} {'bf16':<4} {'util':>5}  host"
    _say(header)
    for c in cards:
        if c.error:  # a lost card: what NVML said instead of its readings
            _say(f"{c.index:>3}  {c.name[:34]:<34} {'FAILED':<10} {c.error}  {c.host or socket_host()}"
                 + ("  (simulated)" if c.simulated else ""))
            continue
        util = "-" if c.utilization_pct is None else f"{c.utilization_pct:.0f}%"
        tier = f"{c.tier} x{c.slots}" if c.slots > 1 else (c.tier or "too small")
        _say(f"{c.index:>3}  {c.name[:34]:<34} {tier:<10} {c.memory_total / 2**30:6.1f}G "
             f"{c.memory_free / 2**30:6.1f}G  {c.compute_capability[0]}.{c.compute_capability[1]:<2} "
             f"{'yes' if c.bf16 else 'no':<4} {util:>5}  {c.host or socket_host()}"
             + ("  (simulated)" if c.simulated else ""))
    from cluster.tiers import tier_gib

    tiers: dict[str, int] = {}
    for c in cards:
        kind = "failed" if c.error else c.tier or "too small"
        tiers[kind] = tiers.get(kind, 0) + c.slots
    # Smallest tier first; cards that serve no tier last.
    order = sorted(tiers, key=lambda t: (0, tier_gib(t)) if t.startswith("vram_") else (1, t))
    _say(f"{len(cards)} card(s): " + ", ".join(f"{tiers[t]} x {t}" for t in order)
         + (" (split cards count once per slot)" if any(c.slots > 1 for c in cards) else ""))
    return 0


def _no_card_why() -> str:
    """Why no card joins, in general terms: see the skipped lines printed above it."""
    from cluster.tiers import vram_tiers

    smallest = min(vram_tiers().values())
    return f"each is failed, below the smallest tier ({smallest:g} GB), or too full; see the skipped lines above"


def socket_host() -> str:
    import socket

    return socket.gethostname()


def cmd_node(args: argparse.Namespace) -> int:
    """Join this host's cards (or one simulated host's cards) to a running cluster, one Ray node per card."""
    from pydantic import ValidationError

    from cluster.node import cards_to_join, joined_cards, nodes_for_cards, start_card_nodes, with_default_port
    from cluster.nvml import NvmlUnavailable

    try:
        cards = _fleet_cards(args)
    except NvmlUnavailable as exc:
        _say(f"error: {exc}")
        return 1
    except (OSError, ValidationError) as exc:
        _say(f"error: bad fleet file: {exc}")
        return 2
    except ValueError as exc:
        _say(f"error: {exc}")
        return 2
    if args.host:
        cards = [c for c in cards if c.host == args.host]
        if not cards:
            _say(f"error: no card of {args.fleet} is on host {args.host!r}")
            return 2
    nodes, skipped = nodes_for_cards(cards, args.fleet)
    for line in skipped:
        _say(f"skipped: {line}")
    if not nodes:
        _say(f"error: no card here can serve ({_no_card_why()})")
        return 2
    address = with_default_port(args.address)
    try:  # a card already in the cluster (`zit node` run twice) is not joined again
        missing, already, warnings = cards_to_join(nodes, joined_cards(address))
    except Exception as exc:  # Ray's GCS client raises its own errors; `ray start` below says what is wrong
        _say(f"warning: could not list the cards already in {address} ({str(exc).splitlines()[0][:300]}); "
             "joining every card")
        missing, already, warnings = nodes, [], []
    for line in already + warnings:
        _say(line)
    if not missing:
        return 0
    try:
        for line in start_card_nodes(address, missing, node_ip=args.node_ip):
            _say(line)
    except RuntimeError as exc:
        _say(f"error: {exc}")
        return 1
    return 0


# -- zit download ------------------------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    from deployments.pipeline import DownloadFailed, default_download_dir, download_model

    target = args.dir or default_download_dir(args.model)
    _say(f"Downloading {args.model} (about 33 GB) into {target} ...")
    try:
        folder = download_model(args.model, target)
    except DownloadFailed as exc:
        _say(f"error: {exc}")
        return 1
    _say(f"Done. Serve it with: zit up --model {folder}")
    return 0


# -- zit generate ------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    import httpx

    body = {"prompt": args.prompt, "size": args.size, "n": args.n, "steps": args.steps,
            "output_format": args.format, "response_format": "b64_json"}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.lora:
        body["lora"], body["lora_scale"] = args.lora, args.lora_scale
    _say(f"Generating {args.n} image(s) of {args.size} at {args.url} ...")
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        status, payload = _generate_with_progress(args.url.rstrip("/"), body, headers, args.timeout)
    except httpx.HTTPError as exc:
        _say(f"error: cannot reach {args.url} ({exc}); is the service up (`zit up`)?")
        return 1
    if status != 200:
        try:
            message = payload["error"]["message"]
        except Exception:
            message = str(payload)[:500]
        _say(f"error: HTTP {status}: {message}")
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    for item in payload["data"]:
        path = args.output / f"zit-{item['seed']}.{args.format}"
        path.write_bytes(base64.b64decode(item["b64_json"]))
        _say(f"wrote {path}")
    _say(f"took {payload.get('metadata', {}).get('seconds', 0):.2f} s")
    return 0


def _generate_with_progress(url: str, body: dict, headers: dict, timeout: float) -> tuple[int, object]:
    """POST the streaming variant and follow its progress events with a tqdm bar (on stderr) of image-steps.
    Returns (HTTP status, the response body or the error body)."""
    import json

    import httpx
    from tqdm import tqdm

    from deployments.progress import read_events

    with httpx.stream("POST", f"{url}/v1/images/generations/stream", json=body, headers=headers,
                      timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            try:
                return response.status_code, response.json()
            except json.JSONDecodeError:
                return response.status_code, response.text
        payload: object = {"error": {"message": "the stream ended without a result"}}
        status = 502
        with tqdm(total=body["n"] * body["steps"], unit="step", desc="denoising", file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for event, data in read_events(response.iter_lines()):
                if event == "start":
                    bar.reset(total=data["steps"])
                elif event == "progress":
                    bar.update(data["step"] - bar.n)
                    bar.set_postfix(images=f"{data['images_done']}/{data['n']}", refresh=False)
                elif event == "result":
                    status, payload = 200, data
                elif event == "error":
                    status, payload = data.get("status", 500), data
    return status, payload


# -- entry point -------------------------------------------------------------------------------------------------


def _add_split_argument(parser: argparse.ArgumentParser) -> None:
    """--split for zit up, node and fleet (cluster/node.py apply_splits)."""
    parser.add_argument("--split", action="append", metavar="CARD=TIER",
                        help="serve a big card as several slots of a smaller tier, e.g. 'RTX 4090=vram_12' (two "
                             "vram_12 slots); CARD is an index (digits), a UUID or part of the name; repeatable")


def _tiers_option(text: str) -> str:
    """--tiers GB,GB,...: validated (cluster/tiers.py parse_vram_tiers), given back as the variable's value."""
    from cluster.tiers import parse_vram_tiers

    try:
        return ",".join(f"{gb:g}" for gb in parse_vram_tiers(text, "--tiers").values())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_tiers_argument(parser: argparse.ArgumentParser) -> None:
    """--tiers for zit up, node, fleet and plan: the tier table, set for this process and the Ray processes it
    starts (main)."""
    parser.add_argument("--tiers", dest="vram_tiers", type=_tiers_option, metavar="GB,GB,...",
                        help="VRAM tiers by lower bound in whole GB, e.g. 4,8,12,24 (tiers vram_4 ... vram_24; a card "
                             "joins the largest it reaches with 90%% of its memory). Default: $ZIT_VRAM_TIERS_GB, else "
                             "4,6,8,12,16,24. Use the same on every zit up / zit node of one cluster")


def build_parser() -> argparse.ArgumentParser:
    from deployments.config import REAL_MODEL_ID

    parser = argparse.ArgumentParser(prog="zit", description="Serve Z-Image-Turbo from a mixed GPU fleet.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Ray locally and serve over HTTP")
    up.add_argument("--model", help="'tiny' (default), a diffusers-format folder, or " + REAL_MODEL_ID)
    where = up.add_mutually_exclusive_group()
    where.add_argument("--fleet", type=Path, help="serve on the simulated cards of this fleet file")
    where.add_argument("--cpu", action="store_true", help="serve from one CPU replica, no card")
    up.add_argument("--config", type=Path, help="serve_config.yaml or a YAML of service settings")
    up.add_argument("--autoscale", action="store_true",
                    help="replicas per tier follow demand, down to zero when idle (default settings; `autoscaling:` "
                    "in --config sets them)")
    up.add_argument("--lora-dir", help="folder of LoRA adapters (<name>.safetensors) requests may name in 'lora' "
                    "(default with the tiny model: its own two adapters)")
    _add_split_argument(up)
    _add_tiers_argument(up)
    up.add_argument("--host", default=DEFAULT_HOST, help="HTTP bind address (default %(default)s)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    up.add_argument("--detach", action="store_true", help="return once serving; stop later with `zit down`")
    up.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1:8265")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the service and the local Ray cluster")
    down.set_defaults(func=cmd_down)

    fleet = sub.add_parser("fleet", help="list the cards (NVML, or a fleet file) and their tiers")
    fleet.add_argument("--fleet", type=Path, help="a simulated fleet file instead of the real cards")
    fleet.add_argument("--json", action="store_true", help="machine-readable output")
    _add_split_argument(fleet)
    _add_tiers_argument(fleet)
    fleet.set_defaults(func=cmd_fleet)

    node = sub.add_parser("node", help="join this host's cards to a cluster, one Ray node per card")
    node.add_argument("--address", required=True, help="the Ray head, HOST[:PORT] (port 6379 when none is given)")
    node.add_argument("--fleet", type=Path, help="join simulated cards of this fleet file instead of real ones")
    node.add_argument("--host", help="with --fleet: only the cards of this host of the fleet file")
    _add_split_argument(node)
    _add_tiers_argument(node)
    node.add_argument("--node-ip", help="this host's address as the head sees it (default: Ray's guess)")
    node.set_defaults(func=cmd_node)

    dl = sub.add_parser("download", help="fetch the real weights from ModelScope")
    dl.add_argument("--model", default=REAL_MODEL_ID, help="ModelScope id (default %(default)s)")
    dl.add_argument("--dir", type=Path, help="target folder (default: ~/.cache/zit/models/<id>)")
    dl.set_defaults(func=cmd_download)

    gen = sub.add_parser("generate", help="generate images through the HTTP API and write them to a folder")
    gen.add_argument("prompt")
    gen.add_argument("--size", default="1024x1024")
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--steps", type=int, default=9)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--lora", help="a LoRA adapter the service lists at /v1/loras")
    gen.add_argument("--lora-scale", type=float, default=1.0, help="adapter strength (default %(default)s)")
    gen.add_argument("--format", choices=["png", "jpeg", "webp"], default="png")
    gen.add_argument("-o", "--output", type=Path, default=Path("out"))
    gen.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default %(default)s)")
    gen.add_argument("--api-key", default=os.environ.get("ZIT_API_KEY"), help="API key (default: $ZIT_API_KEY)")
    gen.set_defaults(func=cmd_generate)

    from cluster.planning import add_calibrate_parser, add_plan_parser

    add_plan_parser(sub)
    _add_tiers_argument(sub.choices["plan"])
    add_calibrate_parser(sub)
    from autoscaling.cli import add_simulate_parser
    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "vram_tiers"):  # a command that classifies cards
        from cluster.tiers import ZIT_VRAM_TIERS_GB_ENV, vram_tiers

        if args.vram_tiers:  # before any card is classified; the Ray processes started later inherit it
            os.environ[ZIT_VRAM_TIERS_GB_ENV] = args.vram_tiers
        try:
            vram_tiers()
        except ValueError as exc:
            _say(f"error: {exc}")
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
