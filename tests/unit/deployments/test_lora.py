"""LoRA adapters (deployments/lora.py): names confined to the folder, sizes from the file header, the A1111 prompt
tags; and a Generator's adapter handling on the tiny model (set, fuse, switch, evict), without Ray."""

import os
import threading

import numpy as np
import pytest

from cluster.pipeline import models_dir, resolve_model
from cluster.tiny_model import TINY_LORAS, ensure_tiny_loras
from deployments.lora import LoraError, LoraLibrary, LoraSettings, adapter_params, parse_prompt_loras


@pytest.fixture(scope="module")
def tiny_loras():
    return ensure_tiny_loras(models_dir(), resolve_model("tiny"))


@pytest.fixture()
def library(tmp_path, tiny_loras):
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in TINY_LORAS:
        (folder / f"{name}.safetensors").write_bytes((tiny_loras / f"{name}.safetensors").read_bytes())
    (tmp_path / "outside.safetensors").write_bytes(b"not an adapter")
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    (folder / "notes.txt").write_text("not an adapter")
    return LoraLibrary(folder)


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/b", "..", ".hidden", "a\\b", "x" * 101, "",
                                  "tiny-ink\x00", "tiny ink", "tiny-ink\n", "a..b"])
def test_names_that_are_not_plain_file_names_are_refused(library, name):
    with pytest.raises(LoraError, match="no paths"):
        library.resolve(name)


def test_a_link_out_of_the_folder_is_refused_and_not_listed(library):
    with pytest.raises(LoraError, match="outside the LoRA folder"):
        library.resolve("link")
    assert library.names() == ["tiny-glow", "tiny-ink"]


def test_listed_names_are_exactly_the_names_that_resolve(library):
    (library.folder / "sub").mkdir()
    (library.folder / "sub" / "deep.safetensors").write_bytes((library.folder / "tiny-ink.safetensors").read_bytes())
    os.symlink(library.folder / "sub" / "deep.safetensors", library.folder / "deeplink.safetensors")
    (library.folder / ("s" * 95 + ".safetensors")).write_bytes(b"x")
    (library.folder / "a..b.safetensors").write_bytes(b"x")
    assert library.names() == ["deeplink", "s" * 95, "tiny-glow", "tiny-ink"]
    for name in library.names():
        library.resolve(name)


def test_names_resolve_with_or_without_the_suffix_and_unknown_ones_list_what_exists(library):
    assert library.resolve("tiny-ink") == library.resolve("tiny-ink.safetensors")
    assert library.resolve("tiny-ink").parent == library.folder.resolve()
    with pytest.raises(LoraError, match="available: tiny-glow, tiny-ink"):
        library.resolve("tiny-pink")


def test_parameters_come_from_the_header_and_an_adapter_above_the_reserve_is_refused(library):
    ink, glow = adapter_params(library.resolve("tiny-ink")), adapter_params(library.resolve("tiny-glow"))
    assert glow == 2 * ink > 0 and library.largest_params() == glow
    settings = LoraSettings(folder=str(library.folder), slots=2, reserve_params=ink)
    assert settings.reserved_params == 2 * ink
    library.check("tiny-ink", settings)
    with pytest.raises(LoraError, match="restart"):
        library.check("tiny-glow", settings)


def test_a1111_prompt_tags_come_out_of_the_prompt_with_their_weights():
    assert parse_prompt_loras("a fox <lora:ink:0.7> in snow") == ("a fox in snow", [("ink", 0.7)])
    assert parse_prompt_loras("<lora:ink>a fox") == ("a fox", [("ink", 1.0)])
    assert parse_prompt_loras("a  fox\n\nin snow ") == ("a  fox\n\nin snow ", [])  # no tag: the prompt as sent
    assert parse_prompt_loras("x <lora:a:1:te=2> <lora:b:.5>")[1] == [("a", 1.0), ("b", 0.5)]
    with pytest.raises(LoraError, match="not a number"):
        parse_prompt_loras("x <lora:ink:strong>")


@pytest.fixture(scope="module")
def generator(tiny_loras):
    from cluster.tiers import cpu_tier
    from deployments.generator import Generator

    settings = LoraSettings(folder=str(tiny_loras), slots=2, fuse=True, reserve_params=10**6)
    return Generator(cpu_tier(), "tiny", settings)


held = []


def run(generator, **job_fields):
    from cluster.requests import GenerationJob

    job = GenerationJob(prompt="a fox", width=64, height=64, steps=2, guidance_scale=0.0, seeds=[3], **job_fields)
    import io

    from PIL import Image

    images, _ = generator._run(job, generator.profile, threading.Event())
    return np.asarray(Image.open(io.BytesIO(images[0]))).astype(int)


def test_fused_adapters_give_the_unfused_image_and_switching_unfuses(generator):
    base = run(generator)
    # Serve's multiplexing cache holds what _load_adapter returns; dropping it unloads the adapter (its __del__).
    held.extend([generator._load_adapter("tiny-ink"), generator._load_adapter("tiny-glow")])
    generator.lora = generator.lora.model_copy(update={"fuse": False})
    unfused = run(generator, lora="tiny-ink", lora_scale=0.5)
    assert generator._fused is None and np.abs(unfused - base).mean() > 1.0
    generator.lora = generator.lora.model_copy(update={"fuse": True})
    fused = run(generator, lora="tiny-ink", lora_scale=0.5)
    assert generator._fused == ("tiny-ink", 0.5)
    assert np.abs(fused - unfused).max() <= 1
    glow = run(generator, lora="tiny-glow")
    assert generator._fused == ("tiny-glow", 1.0) and np.abs(glow - fused).mean() > 1.0
    assert np.abs(run(generator) - base).max() <= 1 and generator._fused is None
    assert np.abs(run(generator, lora="tiny-ink", lora_scale=0.5) - unfused).max() <= 1


def test_evicting_an_adapter_unfuses_it_and_takes_it_out_of_the_pipeline(tiny_loras):
    from cluster.tiers import cpu_tier
    from deployments.generator import Generator

    generator = Generator(cpu_tier(), "tiny", LoraSettings(folder=str(tiny_loras), slots=2, fuse=True,
                                                             reserve_params=10**6))
    base = run(generator)
    ink, glow = generator._load_adapter("tiny-ink"), generator._load_adapter("tiny-glow")
    run(generator, lora="tiny-ink")
    assert generator._fused == ("tiny-ink", 1.0)
    ink.__del__()  # what Serve calls when it evicts the least recently used adapter
    assert "tiny-ink" not in generator._adapters and generator._fused is None
    assert generator.pipe.get_list_adapters()["transformer"] == ["tiny-glow"]
    assert np.abs(run(generator) - base).max() <= 1  # unfused: the base weights are back
    del glow  # dropped by the cache (the garbage collector's __del__): unloaded too
    assert generator.pipe.get_list_adapters().get("transformer", []) == [] and generator._adapters == {}


def test_adapters_run_in_the_compute_dtype_on_fp8_stored_weights(tiny_loras):
    """fp8 tiers store the transformer in float8 and upcast layer by layer; peft would give the adapter float8 too,
    which nothing upcasts."""
    import torch

    from cluster.tiers import cpu_tier
    from deployments.generator import Generator

    generator = Generator(cpu_tier(), "tiny", LoraSettings(folder=str(tiny_loras), slots=1, reserve_params=10**6))
    generator.pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                       compute_dtype=torch.float32)
    base = run(generator)
    adapter = generator._load_adapter("tiny-ink")
    lora_dtypes = {p.dtype for n, p in generator.pipe.transformer.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}
    assert np.abs(run(generator, lora="tiny-ink") - base).mean() > 1.0
    del adapter
