"""The text-encoder stage's replica (deployments/encoder.py) on the head's CPU with the tiny model, without Ray: it
encodes once per prompt, answers a repeat from its cache, describes itself for the fleet view; and a generator whose
encoder is the stage refuses a job that comes without embeddings."""

import asyncio

import pytest

from cluster.stages import place_text_encoder
from cluster.tiers import cpu_tier
from deployments.config import TextEncoderSettings


@pytest.fixture(scope="module")
def stage():
    from deployments.encoder import TextEncoder

    settings = TextEncoderSettings(cache_mb=1).resolve(place_text_encoder([], [], {}, "cpu"))
    encoder = TextEncoder(settings, "tiny")
    yield encoder
    encoder.__del__()


def test_a_repeated_prompt_is_answered_from_the_cache_with_the_same_embeddings(stage):
    first = asyncio.run(stage.encode("a lighthouse at dusk", None, False))
    again = asyncio.run(stage.encode("a lighthouse at dusk", None, False))
    guided = asyncio.run(stage.encode("a lighthouse at dusk", "fog", True))
    assert (first.cached, again.cached, guided.cached) == (False, True, False)
    assert again.embeddings is first.embeddings
    assert guided.embeddings.negative is not None and first.embeddings.negative is None
    stats = stage.describe()["cache"]
    assert stats["entries"] == 2 and stats["hits"] >= 1 and stats["bytes"] == (
        first.embeddings.nbytes + guided.embeddings.nbytes)


def test_the_stage_describes_where_it_runs_and_what_it_holds(stage):
    report = stage.describe()
    assert report["kind"] == "text_encoder" and report["where"] == "cpu" and report["stage_card"] is None
    assert report["device"] == "cpu" and report["dtype"] == "bfloat16"  # the head's CPU: bf16, half the memory
    assert report["encodes"] >= 1 and "TE cpu" in report["technique"]


def test_concurrent_misses_for_one_prompt_encode_it_once(stage):
    async def both():
        return await asyncio.gather(stage.encode("two at once", None, False), stage.encode("two at once", None, False))

    before = stage._encodes
    results = asyncio.run(both())
    assert stage._encodes == before + 1 and sorted(r.cached for r in results) == [False, True]


def test_a_generator_without_an_encoder_refuses_a_job_without_embeddings():
    from cluster.requests import GenerationJob
    from deployments.generator import Generator

    generator = Generator(cpu_tier().model_copy(update={"profile": {"text_encoder": "stage"}}), "tiny")
    assert generator.pipe.text_encoder is None and not generator.own_encoder
    job = GenerationJob(prompt="a fox", width=64, height=64, steps=1, guidance_scale=0.0, seeds=[1])
    with pytest.raises(ValueError, match="has no text encoder"):
        asyncio.run(generator.generate(job))
