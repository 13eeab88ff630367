"""The `zit` command: run the service, see the fleet, fetch weights, generate from the shell.

  zit up [--fleet FILE | --cpu] [--model tiny|PATH|Tongyi-MAI/Z-Image-Turbo] [--config serve_config.yaml] [--detach]
         [--split CARD=TIER] [--tiers GB,GB,...]
  zit down
  zit fleet [--fleet FILE] [--json] [--tiers GB,GB,...]
  zit node --address HEAD[:PORT] [--fleet FILE] [--host NAME] [--split CARD=TIER] [--tiers GB,GB,...]
           [--config serve_config.yaml]
  zit download [--model Tongyi-MAI/Z-Image-Turbo] [--dir DIR]
  zit generate "a red fox" --size 256x256 --n 2 -o out/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cli.common import DEFAULT_HOST, DEFAULT_PORT, add_split_argument, add_tiers_argument, say
from cli.fleet import cmd_fleet, cmd_node
from cli.generate import cmd_generate
from cli.serve import cmd_down, cmd_up

# -- zit download ------------------------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    from cluster.pipeline import DownloadFailed, default_download_dir, download_model

    target = args.dir or default_download_dir(args.model)
    say(f"Downloading {args.model} (about 33 GB) into {target} ...")
    try:
        folder = download_model(args.model, target)
    except DownloadFailed as exc:
        say(f"error: {exc}")
        return 1
    say(f"Done. Serve it with: zit up --model {folder}")
    return 0


# -- entry point -------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from cluster.pipeline import REAL_MODEL_ID

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
    add_split_argument(up)
    add_tiers_argument(up)
    up.add_argument("--host", default=DEFAULT_HOST, help="HTTP bind address (default %(default)s)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    up.add_argument("--ingress-replicas", type=_positive, metavar="N",
                    help="ingress replicas (default: `ingress_replicas` in --config, else 2 on a head with 4 cores "
                    "or more, 1 below)")
    up.add_argument("--proxy-port-from", type=_positive, metavar="PORT",
                    help="card nodes started here run their HTTP proxy on PORT, PORT+1, ... (default: on --port, "
                    "shared by every proxy on this machine; the kernel spreads connections over them)")
    up.add_argument("--detach", action="store_true", help="return once serving; stop later with `zit down`")
    up.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1:8265")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the service and the local Ray cluster")
    down.set_defaults(func=cmd_down)

    fleet = sub.add_parser("fleet", help="list the cards (NVML, or a fleet file) and their tiers")
    fleet.add_argument("--fleet", type=Path, help="a simulated fleet file instead of the real cards")
    fleet.add_argument("--json", action="store_true", help="machine-readable output")
    add_split_argument(fleet)
    add_tiers_argument(fleet)
    fleet.set_defaults(func=cmd_fleet)

    node = sub.add_parser("node", help="join this host's cards to a cluster, one Ray node per card")
    node.add_argument("--address", required=True, help="the Ray head, HOST[:PORT] (port 6379 when none is given)")
    node.add_argument("--fleet", type=Path, help="join simulated cards of this fleet file instead of real ones")
    node.add_argument("--host", help="with --fleet: only the cards of this host of the fleet file")
    add_split_argument(node)
    add_tiers_argument(node)
    node.add_argument("--node-ip", help="this host's address as the head sees it (default: Ray's guess)")
    node.add_argument("--config", type=Path, help="the service config the head runs (`zit up --config`): its tiers' "
                      "profiles are what this host's RAM must hold (default: each tier's own)")
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

    from cli.calibrate import add_calibrate_parser
    from cli.plan import add_plan_parser
    from cli.simulate import add_simulate_parser

    add_plan_parser(sub)
    add_tiers_argument(sub.choices["plan"])
    add_calibrate_parser(sub)
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
            say(f"error: {exc}")
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
