"""The weights cache (cluster/weights.py): components in the dtypes they run in, loaded as views of one stored copy
per host that every process maps, on the tiny model through the same code as the full-size path."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from cluster.profiles import apply_profile, resolve_profile
from cluster.weights import ZIT_WEIGHTS_DIR_ENV, load_component, stored_parts


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ZIT_WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    return tmp_path / "weights"


def mapped_ranges(path_part: str) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if path_part in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


def test_a_component_already_in_its_dtypes_is_mapped_from_the_model_folder(tiny_model_dir, weights_dir):
    """The tiny model is stored in float32: run in float32 it needs no stored copy; every parameter is a view of the
    model's own file (no private copy)."""
    assert {where for where, _ in stored_parts(tiny_model_dir, "transformer", torch.float32, torch.float32)} == {None}
    module = load_component(tiny_model_dir, "transformer", torch.float32, torch.float32)
    ranges = mapped_ranges(str(tiny_model_dir / "transformer"))
    params = list(module.parameters())
    assert ranges and all(any(a <= p.data_ptr() < b for a, b in ranges) for p in params)
    assert not weights_dir.exists() or not any(weights_dir.rglob("*.safetensors"))


@pytest.mark.parametrize("component, storage, compute", [
    ("transformer", torch.bfloat16, torch.float32),
    ("transformer", torch.float8_e4m3fn, torch.bfloat16),
    ("text_encoder", torch.bfloat16, torch.float32),
])
def test_a_stored_copy_holds_each_tensor_in_the_dtype_it_runs_in(tiny_model_dir, weights_dir, component, storage,
                                                                   compute):
    """Layerwise-cast leaves in the storage dtype, what casting skips (norms, embeddings) in the compute dtype, each
    part written once per host (a second load maps the same files), and loaded as views of them."""
    stored = stored_parts(tiny_model_dir, component, storage, compute)
    # What is not in its dtype in the model's files is written to the cache (the tiny model is float32 throughout:
    # a float32 part is read from the model's own files: entry None).
    folders = [where or tiny_model_dir / component for where, _ in stored]
    assert all(f == tiny_model_dir / component or f.parent.parent == weights_dir and (f / "complete.json").is_file()
               for f in folders)
    assert any(f.name.startswith(f"{component}-leaves-") for f in folders)
    written = {f: f.stat().st_mtime_ns for folder in folders for f in folder.glob("*.safetensors")}
    module = load_component(tiny_model_dir, component, storage, compute)
    assert {f: f.stat().st_mtime_ns for folder in folders for f in folder.glob("*.safetensors")} == written
    dtypes = {p.dtype for p in module.parameters()}
    assert dtypes == {storage, compute}
    embedding = module.embed_tokens.weight if component == "text_encoder" else module.t_embedder.mlp[0].weight
    assert embedding.dtype == compute  # precision-sensitive modules are never stored small
    ranges = [r for folder in folders for r in mapped_ranges(str(folder))]
    assert all(any(a <= p.data_ptr() < b for a, b in ranges) for p in module.parameters())


def test_the_big_part_is_one_copy_for_every_compute_dtype(tiny_model_dir, weights_dir):
    """bf16-stored leaves are the same bytes whether the card computes in bf16 or float32: one stored part for
    both; only the small rest (norms, embeddings) differs. An 8-bit store is cast through bfloat16 whatever the
    compute dtype, so a float32 card maps the very part a bf16 card does (planning relies on it when a host's RAM
    is short), and its values are the bf16-rounded weights in 8 bits."""
    def names(storage, compute):
        return {(w.name.rsplit("-", 1)[0] if w else None)
                for w, _ in stored_parts(tiny_model_dir, "transformer", storage, compute)}

    assert names(torch.bfloat16, torch.bfloat16) == {"transformer-leaves-bfloat16", "transformer-rest-bfloat16"}
    # The rest in float32 is the tiny model's own file.
    assert names(torch.bfloat16, torch.float32) == {"transformer-leaves-bfloat16", None}
    assert "transformer-leaves-float8_e4m3fn-via-bfloat16" in names(torch.float8_e4m3fn, torch.bfloat16)
    leaves = {w for w, _ in stored_parts(tiny_model_dir, "transformer", torch.float8_e4m3fn, torch.bfloat16)
              if w and "-leaves-" in w.name}
    assert leaves == {w for w, _ in stored_parts(tiny_model_dir, "transformer", torch.float8_e4m3fn, torch.float32)
                      if w and "-leaves-" in w.name}
    module = load_component(tiny_model_dir, "transformer", torch.float8_e4m3fn, torch.float32)
    [file] = (tiny_model_dir / "transformer").glob("*.safetensors")
    source = load_file(str(file))
    weight = module.layers[0].feed_forward.w1.weight
    assert weight.dtype == torch.float8_e4m3fn
    expected = source["layers.0.feed_forward.w1.weight"].to(torch.bfloat16).to(torch.float8_e4m3fn)
    assert torch.equal(weight.view(torch.uint8), expected.view(torch.uint8))


def test_a_text_encoder_saved_with_its_lm_wrappers_prefix_loads_and_a_short_folder_says_what_it_lacks(
        tiny_model_dir, weights_dir, tmp_path):
    """Keys as a causal-LM save writes them (`model.layers.0...` for the encoder's `layers.0...`, plus an LM head)
    load into the encoder; a folder missing a tensor is refused with the names, before anything is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    [file] = (folder / "text_encoder").glob("*.safetensors")
    tensors = load_file(str(file))
    prefixed = {f"model.{k}": v.clone() for k, v in tensors.items()}
    prefixed["lm_head.weight"] = prefixed["model.embed_tokens.weight"].clone()
    save_file(prefixed, str(file))
    module = load_component(folder, "text_encoder", torch.bfloat16, torch.float32)
    assert torch.equal(module.embed_tokens.weight, tensors["embed_tokens.weight"])
    del prefixed["model.norm.weight"]
    save_file(prefixed, str(file))
    with pytest.raises(ValueError, match=r"lack 1 of the component's \d+ parameters \(first: norm.weight\)"):
        stored_parts(folder, "text_encoder", torch.bfloat16, torch.float32)


CASES = {
    "fp8 storage, bf16 compute": ("vram_12", True, {}),
    "block offload, bf16 storage, fp32 compute": ("vram_6", False, {}),
    "leaf offload, bf16 storage, fp32 compute": ("vram_4", False, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_pipeline_loaded_in_its_profiles_dtypes_gives_the_cast_pipelines_image(tiny_model_dir, weights_dir, case):
    """load_pipeline(profile=...) + apply_profile (hooks only, no cast) makes the same image as loading in float32
    and casting (the path without the cache), and the stored leaves stay views of the stored copy."""
    from cluster.pipeline import load_pipeline, run_job
    from cluster.requests import GenerationJob

    tier, bf16, overrides = CASES[case]
    profile = resolve_profile(tier, bf16, overrides)
    job = GenerationJob(prompt="a fox", width=64, height=64, steps=2, guidance_scale=0.0, seeds=[3])
    cast = load_pipeline(tiny_model_dir)
    apply_profile(cast, profile, "cpu")
    stored = load_pipeline(tiny_model_dir, profile=profile)
    w1 = stored.transformer.layers[0].feed_forward.w1.weight
    before = w1.data_ptr()
    apply_profile(stored, profile, "cpu")
    assert w1.dtype == getattr(torch, profile.transformer_storage) and w1.data_ptr() == before
    assert run_job(stored, job)[0] == run_job(cast, job)[0]


def test_replicas_of_one_host_share_the_stored_weights(tiny_model_dir, weights_dir):
    """Three processes load the tiny pipeline as a replica does and generate an image: each has the whole
    transformer file mapped and read (Rss), and the kernel splits its pages between them (Pss), so the host holds
    about one copy, not three."""
    script = textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from cluster.pipeline import load_pipeline
        from cluster.pipeline import run_job
        from cluster.requests import GenerationJob
        pipe = load_pipeline(Path({str(tiny_model_dir)!r}))
        run_job(pipe, GenerationJob(prompt="a fox", width=64, height=64, steps=2, guidance_scale=0.0, seeds=[1]))
        print("loaded", flush=True)
        sys.stdin.readline()
        rss = pss = 0
        current = None
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split()
                if not head[0].endswith(":"):  # a mapping's first line: its addresses, ..., and its path if any
                    current = head[5] if len(head) >= 6 else None
                elif current and current.endswith("diffusion_pytorch_model.safetensors") and "/transformer/" in current:
                    if head[0] == "Rss:":
                        rss += int(head[1]) * 1024
                    elif head[0] == "Pss:":
                        pss += int(head[1]) * 1024
        print(json.dumps({{"rss": rss, "pss": pss}}), flush=True)
    """)
    env = {**os.environ, ZIT_WEIGHTS_DIR_ENV: str(weights_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "loaded"
        for proc in procs:  # all three hold their mappings while each reads its own
            proc.stdin.write("\n")
            proc.stdin.flush()
        readings = [json.loads(proc.stdout.readline()) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    size = (tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert all(r["rss"] >= 0.9 * size for r in readings)  # each maps the whole file
    total_pss = sum(r["pss"] for r in readings)
    assert total_pss <= 1.3 * size, (total_pss, size)  # one copy for the host, not three


def test_a_replica_waiting_on_a_stuck_load_gives_up_naming_the_holder(weights_dir, monkeypatch):
    """The host's load lock is held by a live process that never finishes: a second replica waits
    ZIT_LOAD_LOCK_TIMEOUT_S, then fails to start saying which process holds it and doing what."""
    from cluster.weights import ZIT_LOAD_LOCK_TIMEOUT_ENV, host_load_lock

    monkeypatch.setenv(ZIT_LOAD_LOCK_TIMEOUT_ENV, "1")
    with host_load_lock("box", "loading a vram_4 replica"):
        with pytest.raises(TimeoutError, match=rf"pid {os.getpid()}: loading a vram_4 replica, since .*"
                                               rf"raise {ZIT_LOAD_LOCK_TIMEOUT_ENV}"):
            with host_load_lock("box", "loading a vram_6 replica"):
                pass
    with host_load_lock("box", "loading a vram_6 replica"):  # let go: the next one gets it at once
        pass
    monkeypatch.setenv(ZIT_LOAD_LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="ZIT_LOAD_LOCK_TIMEOUT_S='soon' is not a number of seconds"):
        with host_load_lock("box"):
            pass


def test_a_ram_tight_float32_tier_runs_from_the_8_bit_copy_a_bf16_tier_maps(tiny_model_dir, weights_dir):
    """vram_4 on a card without bf16, its transformer stored in 8 bits for host RAM (runtime.nodes
    ram_tight_tiers): loaded as a replica loads it, its leaves are views of the very files vram_8 maps, and it
    makes an image."""
    from cluster.pipeline import load_pipeline, run_job
    from cluster.requests import GenerationJob

    profile = resolve_profile("vram_4", False, {"storage_dtype": "float8_e4m3fn"})
    pipe = load_pipeline(tiny_model_dir, profile=profile)
    apply_profile(pipe, profile, "cpu")
    w1 = pipe.transformer.layers[0].feed_forward.w1.weight
    assert w1.dtype == torch.float8_e4m3fn
    [leaves] = [w for w, _ in stored_parts(tiny_model_dir, "transformer", torch.float8_e4m3fn, torch.bfloat16)
                if w and "-leaves-" in w.name]
    assert any(a <= w1.data_ptr() < b for a, b in mapped_ranges(str(leaves)))
    job = GenerationJob(prompt="a fox", width=64, height=64, steps=2, guidance_scale=0.0, seeds=[3])
    [image], _ = run_job(pipe, job)
    assert image.startswith(b"\x89PNG") and len(image) > 1000
