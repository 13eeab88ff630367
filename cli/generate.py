"""`zit generate`: images through the HTTP API, with a progress bar, written to a folder."""

from __future__ import annotations

import argparse
import base64
import sys

from cli.common import say


def cmd_generate(args: argparse.Namespace) -> int:
    import httpx

    body = {"prompt": args.prompt, "size": args.size, "n": args.n, "steps": args.steps,
            "output_format": args.format, "response_format": "b64_json"}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.lora:
        body["lora"], body["lora_scale"] = args.lora, args.lora_scale
    say(f"Generating {args.n} image(s) of {args.size} at {args.url} ...")
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        status, payload = _generate_with_progress(args.url.rstrip("/"), body, headers, args.timeout)
    except httpx.HTTPError as exc:
        say(f"error: cannot reach {args.url} ({exc}); is the service up (`zit up`)?")
        return 1
    if status != 200:
        try:
            message = payload["error"]["message"]
        except Exception:
            message = str(payload)[:500]
        say(f"error: HTTP {status}: {message}")
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    for item in payload["data"]:
        path = args.output / f"zit-{item['seed']}.{args.format}"
        path.write_bytes(base64.b64decode(item["b64_json"]))
        say(f"wrote {path}")
    say(f"took {payload.get('metadata', {}).get('seconds', 0):.2f} s")
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
