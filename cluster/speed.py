"""The time model: predicted seconds of a request on a card, before any step has been measured there.

It is the prior the router starts from (the ingress replaces it with measured step times as chunks finish) and the
clock of simulated cards. An ESTIMATE, not a measurement:

- denoising, per step: the transformer's arithmetic, 2 x parameters x tokens for the linear layers plus
  4 x layers x tokens^2 x width for attention, at EFFECTIVE_FLOPS of an RTX 4090 (speed 1.0) times the card's
  relative `speed`; tokens = image tokens + the 512 prompt tokens, per image;
- weights streamed over PCIe while denoising (group offload, sequential offload): the transformer's stored bytes
  every step at the card's host-to-device rate (`link`, cluster/link.py: measured on the card, else from its PCIe
  generation and width, else PCIE_BYTES_S), overlapped with compute when a prefetch stream is used (max), added
  otherwise. On an x1 riser (0.79 GB/s) that is about 15.6 s per step for a 16-bit transformer;
- prompt encoding (`encode_seconds`): the text encoder's arithmetic over 512 tokens, plus its stored bytes streamed
  when offloaded; nothing in a generator whose encoder is the stage (the stage pays it once per request);
- decode: VAE_SECONDS_PER_MEGAPIXEL per megapixel per image on an RTX 4090, divided by speed.
Classifier-free guidance (`cfg`) runs the transformer on 2n latents each step, doubling the step's arithmetic (the
streamed weights still cross once per step), and the text encoder twice (prompt, then negative prompt), streaming
its weights each time when group-offloaded; decode is unchanged.
float32 compute on cards without bf16 is already in their `speed` (fleet files give the speed the card reaches
with the profile it runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.encoding import MAX_SEQUENCE_LENGTH
from cluster.link import DEFAULT_LINK, Link
from cluster.memory import Calibration, image_tokens, load_calibration, transformer_batch
from cluster.profiles import DTYPE_BYTES, Profile, default_profile
from cluster.requests import work_units
from cluster.tiers import NO_BF16_TIERS

# Dense tensor throughput an RTX 4090 sustains on this transformer (its fp16-accumulate peak is 165 TFLOP/s).
# Gives about 0.45 s per step at 1024x1024, about 5 s per image: the few seconds users report for 8 steps.
EFFECTIVE_FLOPS = 150e12
# Dense bf16 throughput of a desktop CPU on the text encoder (AVX-512 or AMX cores do more, older ones less): a
# real prompt takes the 4B-parameter encoder about 14 s there.
CPU_FLOPS = 3e11
# Flux-VAE decode of one megapixel on an RTX 4090 in bf16, tiled: about a quarter second.
VAE_SECONDS_PER_MEGAPIXEL = 0.25
# Transformer shape (Z-Image-Turbo): layers and width for the attention term.
LAYERS, WIDTH = 30, 3840
# Reference request for the throughput prior: the API's default size and steps.
PRIOR_SIZE, PRIOR_STEPS = 1024, 9
# Relative speed (RTX 4090 = 1) of a slow common card per tier, for the prior when no speed is known
# (cluster/fleets/large.yaml's slowest card of each class). A low guess asks the autoscaler for more replicas, not fewer.
TYPICAL_SPEED = {"vram_4": 0.08, "vram_6": 0.15, "vram_8": 0.3, "vram_12": 0.35, "vram_16": 0.4, "vram_24": 0.7}


@dataclass(frozen=True)
class Timing:
    encode_s: float
    denoise_s: float
    decode_s: float
    copy_s: float = 0.0  # of each step, the weights streamed over the link (0: resident); overlapped or added
    link: Link = DEFAULT_LINK  # the copy rate it took

    @property
    def total_s(self) -> float:
        return self.encode_s + self.denoise_s + self.decode_s

    def per_step_s(self, steps: int) -> float:
        return self.denoise_s / max(1, steps)


def predict_seconds(
    width: int, height: int, n: int, steps: int, profile: Profile, speed: float = 1.0,
    calibration: Calibration | None = None, cfg: bool = False, link: Link | None = None,
) -> Timing:
    """Seconds to generate n images of width x height in `steps` steps under `profile` on a card of `speed` whose
    host-to-device copy rate is `link` (DEFAULT_LINK when None), with classifier-free guidance when `cfg`."""
    link = link or DEFAULT_LINK
    cal = calibration or load_calibration()
    tokens = image_tokens(width, height) + cal.prompt_tokens
    batch = transformer_batch(n, cfg)
    flops_per_step = batch * (2 * cal.transformer_params * tokens + 4 * LAYERS * tokens * tokens * WIDTH)
    compute_s = flops_per_step / (EFFECTIVE_FLOPS * speed)
    streamed = profile.weights in ("group_offload_block", "group_offload_leaf", "sequential_cpu_offload")
    copy_s = cal.transformer_params * DTYPE_BYTES[profile.transformer_storage] / link.bytes_s if streamed else 0.0
    step_s = max(compute_s, copy_s) if profile.offload_stream else compute_s + copy_s
    decode_s = n * VAE_SECONDS_PER_MEGAPIXEL * width * height / 1e6 / speed
    return Timing(encode_seconds(profile, speed, cal, cfg, link), steps * step_s, decode_s, copy_s, link)


def encode_seconds(profile: Profile, speed: float = 1.0, calibration: Calibration | None = None,
                   cfg: bool = False, link: Link | None = None) -> float:
    """Seconds the text encoder takes for one request where `profile` runs it: its arithmetic over the padded prompt
    (twice with guidance: the prompt, then the negative prompt) on a card of `speed`, or at CPU_FLOPS on the CPU,
    plus, when group-offloaded, its stored bytes streamed for each call (model CPU offload moves it on once). 0 for a
    profile whose encoder is the stage (text_encoder='stage'): the stage pays it, once per request, or not at all
    when its cache has the prompt."""
    if profile.text_encoder == "stage":
        return 0.0
    cal = calibration or load_calibration()
    passes = 2 if cfg else 1  # text-encoder calls: the prompt, and with guidance the negative prompt
    flops = passes * 2 * cal.text_encoder_params * MAX_SEQUENCE_LENGTH  # the encoder runs on the padded prompt
    if profile.text_encoder == "cpu":
        return flops / CPU_FLOPS
    seconds = flops / (EFFECTIVE_FLOPS * speed)
    if profile.text_encoder == "offload":
        streams = 1 if profile.weights == "model_cpu_offload" else passes
        seconds += (streams * cal.text_encoder_params * DTYPE_BYTES[profile.text_encoder_storage]
                    / (link or DEFAULT_LINK).bytes_s)
    return seconds


def prior_units_per_s(tier: str, speed: float | None = None, bf16: bool | None = None, link: Link | None = None,
                      profile: Profile | None = None) -> float:
    """Work units (cluster.requests.work_units) per second one replica of `tier` computes, from the time model at
    PRIOR_SIZE x PRIOR_SIZE, PRIOR_STEPS steps, under `profile` (the tier's default one when None) on a card of
    `speed` (its TYPICAL_SPEED when None) with or without bf16 (as its typical card when None) on `link`: the
    throughput the autoscaler assumes until replicas have measured it."""
    bf16 = (tier not in NO_BF16_TIERS) if bf16 is None else bf16
    speed = speed or TYPICAL_SPEED.get(tier, 0.1)
    seconds = predict_seconds(PRIOR_SIZE, PRIOR_SIZE, 1, PRIOR_STEPS, profile or default_profile(tier, bf16), speed,
                              link=link).total_s
    return work_units(PRIOR_SIZE, PRIOR_SIZE, 1, PRIOR_STEPS) / seconds


def reference_step_s(profile: Profile, speed: float | None = None, link: Link | None = None) -> float:
    """Seconds of one denoising step at PRIOR_SIZE x PRIOR_SIZE, n=1, under `profile` on a card of `speed` and
    `link`: the one figure `zit fleet` shows per card and replicas are ranked by before they have measured."""
    return predict_seconds(PRIOR_SIZE, PRIOR_SIZE, 1, 1, profile, speed or 1.0, link=link).denoise_s
