"""Failures a Generator reports about a chunk, so the ingress can retry it where it will succeed.

Ray re-raises a replica's exception in the caller as a class that derives from both RayTaskError and the original,
so the ingress catches these types directly.
"""


class ChunkFailed(RuntimeError):
    """A chunk could not be generated on this replica; `reason` is a short machine-readable word."""

    reason = "failed"


class ChunkOutOfMemory(ChunkFailed):
    """The card ran out of memory, also after the degraded retry on the same card: try a larger tier."""

    reason = "out_of_memory"


class ChunkBadImage(ChunkFailed):
    """The card produced NaN or all-black images (fp16 on a card without bf16): try a card with bf16."""

    reason = "bad_image"
