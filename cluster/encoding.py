"""Prompt embeddings: what the text encoder makes of a request, the cache the stage keeps them in, and the one call
that makes them (diffusers' own `ZImagePipeline.encode_prompt`, so they are exactly what the pipeline would make).

The encoder runs on the prompt padded to MAX_SEQUENCE_LENGTH tokens (longer prompts are truncated there, as the
pipeline truncates them), takes the second-to-last hidden state and keeps only the prompt's real tokens: one tensor of
(tokens, 2560) per prompt for the real model, a few hundred KiB in bf16. With classifier-free guidance
(guidance_scale > 0) the negative prompt (empty when none is given) is encoded too.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import ZImagePipeline

# What the pipeline pads and truncates every prompt to (ZImagePipeline's max_sequence_length default).
MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class EncodedPrompt:
    """A request's embeddings, on the CPU: `prompt` (tokens x hidden), and `negative` when the request is guided."""

    prompt: Any  # torch.Tensor
    negative: Any | None = None  # torch.Tensor, with classifier-free guidance only

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prompt, self.negative) if t is not None)

    @property
    def tokens(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def transformer_tokens(self) -> int:
        """Real tokens of the longest prompt the transformer takes for this request (the prompt, and with guidance
        the negative prompt: the batch pads to the longest); cluster.memory.for_prompt predicts with it."""
        return max(int(t.shape[0]) for t in (self.prompt, self.negative) if t is not None)

    def for_pipeline(self, dtype, device) -> tuple[list, list | None]:
        """(prompt_embeds, negative_prompt_embeds) as ZImagePipeline takes them for one prompt, in `dtype` on
        `device`; the pipeline repeats them for each image of the call."""
        prompt = [self.prompt.to(device=device, dtype=dtype)]
        negative = None if self.negative is None else [self.negative.to(device=device, dtype=dtype)]
        return prompt, negative


def cache_key(prompt: str, negative_prompt: str | None, cfg: bool, model: str,
              max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> str:
    """Everything that changes the embeddings: the prompt, the negative prompt when guided (unguided requests do not
    encode it), the encoder's identity (the model folder and its dtype) and the length it pads to. A digest, so a
    key holds no prompt text."""
    parts = [model, str(max_sequence_length), "cfg" if cfg else "-", prompt, (negative_prompt or "") if cfg else ""]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


class EmbeddingCache:
    """Least recently used embeddings, bounded in bytes (`max_bytes`; 0 turns the cache off). Thread-safe. An entry
    larger than the whole budget is not kept. Counts hits, misses and evictions for the metrics."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, EncodedPrompt] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> EncodedPrompt | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, value: EncodedPrompt) -> None:
        size = value.nbytes
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def encode_prompt(pipe: "ZImagePipeline", prompt: str, negative_prompt: str | None, cfg: bool,
                  max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> EncodedPrompt:
    """The embeddings of one request through the pipeline's own `encode_prompt` (tokenizer, chat template, padding,
    truncation, hidden state, masking: all diffusers'), moved to the CPU for the trip to the generators."""
    import torch

    with torch.inference_mode():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompt, device=pipe._execution_device, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt, max_sequence_length=max_sequence_length)
    negative = negative_embeds[0].to("cpu") if cfg else None
    return EncodedPrompt(prompt_embeds[0].to("cpu"), negative)
