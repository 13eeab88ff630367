"""Per-step progress: the server-sent event stream, the progress lookup by id, and `zit generate`'s bar."""

import base64
import io

import pytest
from PIL import Image

from deployments.progress import read_events

pytestmark = pytest.mark.integration

STREAM = "/v1/images/generations/stream"


def stream_events(client, body: dict) -> list[tuple[str, object]]:
    with client.stream("POST", STREAM, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(read_events(response.iter_lines()))


def test_stream_reports_increasing_steps_then_the_result_then_done(client):
    # Big enough for the tiny model to take a few seconds, so several throttled reports arrive.
    events = stream_events(client, {"prompt": "a red fox", "size": "512x512", "n": 3, "steps": 40, "seed": 5})
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-2:] == ["result", "done"]
    assert set(names[1:-2]) == {"progress"}
    start = events[0][1]
    assert start["steps"] == 120 and start["n"] == 3 and start["request_id"]
    steps = [data["step"] for name, data in events if name == "progress"]
    assert len(steps) >= 3, f"expected several progress events, got {steps}"
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # strictly increasing
    assert steps[-1] == 120
    etas = [data["eta_s"] for name, data in events if name == "progress" and data["eta_s"] is not None]
    assert etas and all(eta >= 0 for eta in etas)
    result = events[-2][1]
    assert [item["seed"] for item in result["data"]] == [5, 6, 7]
    image = Image.open(io.BytesIO(base64.b64decode(result["data"][0]["b64_json"])))
    assert image.size == (512, 512)


def test_progress_by_request_id_after_the_stream_ends(client):
    events = stream_events(client, {"prompt": "a red fox", "size": "64x64", "steps": 2})
    request_id = events[0][1]["request_id"]
    progress = client.get(f"/v1/progress/{request_id}").json()
    assert progress["finished"] is True and progress["fraction"] == 1.0 and progress["eta_s"] == 0.0
    assert client.get("/v1/progress/no-such-request").status_code == 404


def test_invalid_request_is_a_plain_422_before_the_stream_opens(client):
    response = client.post(STREAM, json={"prompt": "a red fox", "size": "100x100"})
    assert response.status_code == 422
    assert "multiple of 16" in response.json()["error"]["message"]


def test_error_after_admission_arrives_as_an_error_event(client):
    events = stream_events(client, {"prompt": "a red fox", "size": "64x64", "model": "dall-e-2"})
    assert [name for name, _ in events] == ["start", "error", "done"]
    assert events[1][1]["status"] == 422 and "z-image-turbo" in events[1][1]["error"]["message"]


def test_zit_generate_shows_a_progress_bar_and_writes_the_images(base_url, tmp_path, capsys):
    from cli.generate import cmd_generate
    from cli.main import build_parser

    args = build_parser().parse_args(["generate", "a red fox", "--size", "128x128", "--n", "2", "--steps", "6",
                                      "--seed", "3", "-o", str(tmp_path), "--url", base_url, "--timeout", "120"])
    assert cmd_generate(args) == 0
    out, err = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zit-3.png", "zit-4.png"]
    assert "denoising" in err and "12/12" in err and "100%" in err
    assert "wrote" in out
