"""The `zit` command: run the service, fetch weights, generate from the shell.

  zit up [--model tiny|PATH|Tongyi-MAI/Z-Image-Turbo] [--config serve_config.yaml] [--detach]
  zit down
  zit download [--model Tongyi-MAI/Z-Image-Turbo] [--dir DIR]
  zit generate "a red fox" --size 256x256 --n 2 -o out/
"""

from __future__ import annotations

import argparse
import base64
import signal
import sys
import threading
import time
from pathlib import Path

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


def cmd_up(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster import local

    try:
        config = load_service_config(args.config, {"model": args.model})
    except (ValidationError, OSError) as exc:
        _say(f"error: bad configuration: {exc}")
        return 2
    from deployments.pipeline import ModelNotFound, resolve_model

    try:  # fail here, with the fix, rather than in a replica's log
        model_path = resolve_model(config.model)
    except ModelNotFound as exc:
        _say(f"error: {exc}")
        return 2

    mode = local.ensure_auth_mode()
    _say(f"Starting Ray (auth mode: {mode}, dashboard: {'127.0.0.1:8265' if args.dashboard else 'off'}) ...")
    started = time.perf_counter()
    fresh = local.start_head(dashboard=args.dashboard)
    if not fresh:
        _say("A Ray cluster is already running here; deploying onto it.")

    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    _say(f"Deploying {config.model_name} from {model_path} on tiers {[t.name for t in config.tiers]} ...")
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
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
    _say(f"Generating {args.n} image(s) of {args.size} at {args.url} ...")
    try:
        response = httpx.post(f"{args.url.rstrip('/')}/v1/images/generations", json=body, timeout=args.timeout)
    except httpx.HTTPError as exc:
        _say(f"error: cannot reach {args.url} ({exc}); is the service up (`zit up`)?")
        return 1
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except Exception:
            message = response.text[:500]
        _say(f"error: HTTP {response.status_code}: {message}")
        return 1
    payload = response.json()
    args.output.mkdir(parents=True, exist_ok=True)
    for item in payload["data"]:
        path = args.output / f"zit-{item['seed']}.{args.format}"
        path.write_bytes(base64.b64decode(item["b64_json"]))
        _say(f"wrote {path}")
    _say(f"took {payload.get('metadata', {}).get('seconds', 0):.2f} s")
    return 0


# -- entry point -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from deployments.config import REAL_MODEL_ID

    parser = argparse.ArgumentParser(prog="zit", description="Serve Z-Image-Turbo from a mixed GPU fleet.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Ray locally and serve over HTTP")
    up.add_argument("--model", help="'tiny' (default), a diffusers-format folder, or " + REAL_MODEL_ID)
    up.add_argument("--config", type=Path, help="serve_config.yaml or a YAML of service settings")
    up.add_argument("--host", default=DEFAULT_HOST, help="HTTP bind address (default %(default)s)")
    up.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    up.add_argument("--detach", action="store_true", help="return once serving; stop later with `zit down`")
    up.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on 127.0.0.1:8265")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the service and the local Ray cluster")
    down.set_defaults(func=cmd_down)

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
    gen.add_argument("--format", choices=["png", "jpeg", "webp"], default="png")
    gen.add_argument("-o", "--output", type=Path, default=Path("out"))
    gen.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default %(default)s)")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
