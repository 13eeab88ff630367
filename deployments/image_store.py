"""Images returned as URLs: kept in one store for the whole service (a Ray actor on the head, so a URL works through
any proxy and any ingress replica), bounded in bytes and age."""

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


IMAGES_NAME = "zit-images"


class SharedImageStore(ImageStore):
    """The service's one ImageStore, as a Ray actor (deployments.registry.cluster_actor: detached, on the head,
    restarted if it dies, empty then). Every ingress replica puts the images it answers with as URLs here and reads
    them back from here. Each put carries the service's bounds (`image_store_mb`, `image_ttl_s`), so a restarted
    store has them from its first image."""

    def __init__(self):
        super().__init__(0, 0.0)  # set by the first put

    def put(self, data: bytes, fmt: str, max_bytes: int | None = None, ttl_s: float | None = None) -> str:
        if max_bytes is not None and ttl_s is not None:
            self.max_bytes, self.ttl_s = max_bytes, ttl_s
        return super().put(data, fmt)


def get_image_store():
    from deployments.registry import REGISTRY_NAMESPACE, cluster_actor

    return cluster_actor(SharedImageStore, IMAGES_NAME, REGISTRY_NAMESPACE)
