from deployments.image_store import ImageStore


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_images_expire_after_their_ttl():
    clock = Clock()
    store = ImageStore(max_bytes=1000, ttl_s=10, clock=clock)
    image_id = store.put(b"x" * 10, "png")
    clock.now = 9.9
    assert store.get(image_id).data == b"x" * 10
    clock.now = 10.1
    assert store.get(image_id) is None


def test_oldest_images_go_first_when_full():
    store = ImageStore(max_bytes=25, ttl_s=100, clock=Clock())
    first, second, third = (store.put(bytes([i]) * 10, "png") for i in range(3))
    assert store.get(first) is None
    assert store.get(second) is not None and store.get(third) is not None


def test_ids_are_unguessable_and_distinct():
    store = ImageStore(max_bytes=1 << 20, ttl_s=100)
    ids = {store.put(b"x", "png") for _ in range(100)}
    assert len(ids) == 100 and all(len(i) >= 20 for i in ids)


def test_the_shared_store_takes_the_services_bounds_from_each_put():
    """A restarted store (empty, no bounds) has the service's bounds from its first image on."""
    from deployments.image_store import SharedImageStore

    store = SharedImageStore()
    first = store.put(b"x" * 8, "png", max_bytes=10, ttl_s=60)
    second = store.put(b"y" * 8, "png", max_bytes=10, ttl_s=60)
    assert store.get(first) is None and store.get(second).data == b"y" * 8  # 16 bytes > 10: the oldest went
