"""Prompt embeddings (cluster/encoding.py): the cache key, the LRU cache bounded in bytes, and the encode call the
stage makes, which gives the pipeline exactly what it makes itself."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.encoding import EmbeddingCache, EncodedPrompt, cache_key, encode_prompt
from cluster.requests import GenerationJob


def embeddings(tokens=10, dim=16, value=0.0):
    return EncodedPrompt(torch.full((tokens, dim), value))


def test_the_key_covers_what_changes_the_embeddings_and_holds_no_prompt_text():
    base = cache_key("a red fox", None, False, "model-a:bfloat16")
    assert base != cache_key("a red fox.", None, False, "model-a:bfloat16")
    assert base != cache_key("a red fox", None, True, "model-a:bfloat16")  # guided: the negative is encoded too
    assert base != cache_key("a red fox", None, False, "model-a:float32")
    assert base != cache_key("a red fox", None, False, "model-a:bfloat16", max_sequence_length=256)
    assert cache_key("a red fox", "blurry", True, "m") != cache_key("a red fox", "grainy", True, "m")
    assert cache_key("a red fox", "blurry", False, "m") == cache_key("a red fox", "grainy", False, "m")  # unused
    assert "fox" not in base


def test_the_cache_evicts_the_least_recently_used_by_bytes_and_counts():
    one = embeddings().nbytes
    cache = EmbeddingCache(max_bytes=2 * one)
    cache.put("a", embeddings(value=1.0))
    cache.put("b", embeddings(value=2.0))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", embeddings(value=3.0))  # over budget: b goes
    assert cache.get("b") is None and cache.get("c") is not None
    stats = cache.stats()
    assert (stats["entries"], stats["bytes"], stats["evictions"]) == (2, 2 * one, 1)
    assert (stats["hits"], stats["misses"]) == (2, 1)


def test_an_entry_larger_than_the_cache_is_not_kept_and_zero_turns_it_off():
    cache = EmbeddingCache(max_bytes=embeddings().nbytes - 1)
    cache.put("a", embeddings())
    assert len(cache) == 0 and cache.get("a") is None
    off = EmbeddingCache(0)
    off.put("a", embeddings())
    assert off.stats()["bytes"] == 0


@pytest.mark.parametrize("guidance", [0.0, 3.5])
def test_the_stage_gives_the_same_image_as_the_pipeline_encoding_itself(tiny_model_dir, guidance):
    """Same seed, same dtype, same device (the CPU): the pipeline with its own encoder and the pipeline without one
    fed the stage's embeddings make the same pixels."""
    from cluster.pipeline import load_pipeline, load_text_encoder, run_job

    whole = load_pipeline(tiny_model_dir)
    bare = load_pipeline(tiny_model_dir, text_encoder=False)
    assert bare.text_encoder is None and bare.tokenizer is None
    stage = load_text_encoder(tiny_model_dir)
    assert stage.transformer is None and stage.vae is None
    job = GenerationJob(prompt="a red fox in the snow", negative_prompt="blurry" if guidance else None, width=128,
                        height=96, steps=2, guidance_scale=guidance, seeds=[7, 8])
    encoded = encode_prompt(stage, job.prompt, job.negative_prompt, cfg=guidance > 0)
    assert (encoded.negative is not None) == (guidance > 0)
    mine, _ = run_job(whole, job)
    staged, _ = run_job(bare, job.model_copy(update={"encoded": encoded}))
    pixels = [np.asarray(Image.open(io.BytesIO(image))) for image in (*mine, *staged)]
    assert all(np.array_equal(a, b) for a, b in zip(pixels[:2], pixels[2:]))
