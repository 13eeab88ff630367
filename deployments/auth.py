"""Optional API keys and per-key rate limits for the HTTP API.

Keys come from a file (one per line, optionally `name:key`; `#` comments), mounted from a Kubernetes Secret in the
chart. A request must carry `Authorization: Bearer <key>`; each presented key is compared with every configured key
in constant time (hmac.compare_digest, no early exit), so timing does not tell how much of a key was right. Each key
has a token bucket of `rate_per_minute` requests. Keys never appear in logs or metrics: a key is known by its name,
or by the first 8 hex digits of its SHA-256 when it has none.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path

# Paths anyone may GET without a key: health checks (load balancers), metrics (Prometheus), the web page and its
# static files (the page itself asks for a key before calling the API).
OPEN_PATHS = ("/healthz", "/metrics", "/", "/static/")


class KeyFileError(ValueError):
    pass


def load_keys(path: str | Path) -> dict[str, str]:
    """name -> key from a key file; raises KeyFileError naming the line when a key is too short to be safe."""
    keys: dict[str, str] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise KeyFileError(f"API key file {path} cannot be read: {exc}") from exc
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        if not sep:
            name, key = "key-" + hashlib.sha256(line.encode()).hexdigest()[:8], line
        if len(key) < 16:
            raise KeyFileError(f"{path}:{number}: API keys must be at least 16 characters; generate one with "
                               "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        keys[name.strip()] = key.strip()
    if not keys:
        raise KeyFileError(f"API key file {path} has no keys")
    return keys


@dataclass
class Bucket:
    tokens: float
    updated: float


@dataclass
class Authenticator:
    keys: dict[str, str]
    rate_per_minute: int | None = None
    clock: object = time.monotonic
    _buckets: dict[str, Bucket] = field(default_factory=dict)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an Authorization header, or None. Compares against every key, always."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        presented = authorization[7:].strip().encode()
        found = None
        for name, key in self.keys.items():
            if hmac.compare_digest(presented, key.encode()):
                found = name
        return found

    def admit(self, name: str) -> float | None:
        """None when key `name` may make a request now, else the seconds until it may (token bucket)."""
        if not self.rate_per_minute:
            return None
        now = self.clock()
        rate = self.rate_per_minute / 60.0
        bucket = self._buckets.setdefault(name, Bucket(float(self.rate_per_minute), now))
        bucket.tokens = min(float(self.rate_per_minute), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / rate


def is_open(method: str, path: str) -> bool:
    if method not in ("GET", "HEAD"):
        return False
    return any(path == p or (p.endswith("/") and p != "/" and path.startswith(p)) for p in OPEN_PATHS)
