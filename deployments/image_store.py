"""Images returned as URLs: kept in the ingress replica's memory, bounded in bytes and age."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass
class StoredImage:
    data: bytes
    fmt: str
    expires: float


class ImageStore:
    """An LRU of encoded images. Adding past `max_bytes` drops the oldest; entries older than `ttl_s` expire."""

    def __init__(self, max_bytes: int, ttl_s: float, clock=time.monotonic):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0

    def put(self, data: bytes, fmt: str) -> str:
        """Store and return an unguessable id."""
        image_id = secrets.token_urlsafe(16)
        self._items[image_id] = StoredImage(data, fmt, self._clock() + self.ttl_s)
        self._bytes += len(data)
        self._evict()
        return image_id

    def get(self, image_id: str) -> StoredImage | None:
        self._evict()
        return self._items.get(image_id)

    def _evict(self) -> None:
        now = self._clock()
        while self._items:
            oldest_id, oldest = next(iter(self._items.items()))
            if self._bytes <= self.max_bytes and oldest.expires > now:
                break
            del self._items[oldest_id]
            self._bytes -= len(oldest.data)
