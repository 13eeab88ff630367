"""The tiny model and the loader, without Ray: real ZImagePipeline, real from_pretrained."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from cluster.pipeline import ModelNotFound, load_pipeline, resolve_model, run_job
from cluster.requests import GenerationJob


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


def job(**fields):
    return GenerationJob(**{"prompt": "a red fox", "width": 128, "height": 96, "steps": 3, "guidance_scale": 0.0,
                            "seeds": [1], **fields})


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_tiny_model_is_a_diffusers_folder_of_the_real_classes(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"][1] == "Qwen3Model"
    assert sum(f.stat().st_size for f in tiny_model_dir.rglob("*") if f.is_file()) < 20 << 20


def test_tiny_model_is_built_once_and_reused(tiny_model_dir):
    before = (tiny_model_dir / "model_index.json").stat().st_mtime_ns
    assert resolve_model("tiny") == tiny_model_dir
    assert (tiny_model_dir / "model_index.json").stat().st_mtime_ns == before


def test_generates_images_of_the_asked_size_and_count(pipe):
    images, seconds = run_job(pipe, job(seeds=[1, 2]))
    assert len(images) == 2 and seconds > 0
    assert Image.open(io.BytesIO(images[0])).size == (128, 96)
    assert decode(images[0]).std() > 1  # not a blank image


def test_same_seed_same_image_other_seed_differs(pipe):
    first = run_job(pipe, job(seeds=[5]))[0][0]
    again = run_job(pipe, job(seeds=[5]))[0][0]
    other = run_job(pipe, job(seeds=[6]))[0][0]
    assert first == again
    assert np.abs(decode(first) - decode(other)).mean() > 5


def test_image_in_a_batch_matches_the_image_alone(pipe):
    """Each image has its own generator, so batching changes at most float rounding (one 8-bit level)."""
    batch = run_job(pipe, job(seeds=[3, 4, 5]))[0]
    alone = [run_job(pipe, job(seeds=[seed]))[0][0] for seed in (3, 4, 5)]
    for together, single in zip(batch, alone):
        assert np.abs(decode(together) - decode(single)).max() <= 1


@pytest.mark.parametrize("fmt, pil_name", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(pipe, fmt, pil_name):
    data = run_job(pipe, job(output_format=fmt))[0][0]
    assert Image.open(io.BytesIO(data)).format == pil_name


def test_any_local_diffusers_folder_loads(tiny_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, copy)
    assert resolve_model(str(copy)) == copy


def test_missing_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotFound, match="zit download --model Tongyi-MAI/Z-Image-Turbo"):
        resolve_model("Tongyi-MAI/Z-Image-Turbo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no model_index.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("env, endpoint, proxy", [
    ({}, "https://hub.example", None),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "https://hub.example", "http://proxy:3128"),
    ({"https_proxy": "http://proxy:3128"}, "https://hub.example", "http://proxy:3128"),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "http://hub.example", None),  # a proxy for the other scheme
    ({"HTTP_PROXY": "http://proxy:3128"}, "http://hub.example", "http://proxy:3128"),
    ({"ALL_PROXY": "socks5://proxy:1080"}, "https://hub.example", "socks5://proxy:1080"),
    ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "hub.example"}, "https://hub.example", None),
])
def test_the_hub_proxy_is_the_one_the_hub_client_would_take(monkeypatch, env, endpoint, proxy):
    """`zit download` tries a direct connection to the hub first only when the hub client would connect directly."""
    from cluster.pipeline import _hub_proxy

    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _hub_proxy(endpoint) == proxy
