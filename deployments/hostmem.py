"""Host memory hygiene for long-running replicas.

glibc keeps freed blocks in its arenas, and after a large block is freed it raises its mmap threshold, so later
large blocks (encoded images, decoded latents) come from the arenas too. A replica's resident memory then wanders by
tens of MB with the sizes it last handled, which hides a real leak and holds host RAM that offloaded weights on the
same host need. `trim_host_memory` hands the free memory back (glibc's malloc_trim; a no-op elsewhere).
"""

from __future__ import annotations

import ctypes

_malloc_trim = None


def trim_host_memory() -> None:
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
