"""Optional API keys and per-key rate limits for the HTTP API.

Keys come from a file (one per line, optionally `name:key`; `#` comments), mounted from a Kubernetes Secret in the
chart. A request must carry `Authorization: Bearer <key>`; each presented key is compared with every configured key in
constant time (hmac.compare_digest, no early exit), so timing does not tell how much of a key was right. Each key has
a token bucket of `rate_per_minute` requests (per ingress replica). The file is reread when it changes (checked every
KEYS_RELOAD_S), so keys are added and revoked without a restart. Keys never appear in logs or metrics: a key is known
by its name, or by the first 8 hex digits of its SHA-256 when it has none.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

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


# How often the key file is checked for changes (its modification time and inode: Kubernetes replaces a mounted
# Secret's files by swapping a link), so keys can be added or revoked without a restart.
KEYS_RELOAD_S = 10.0


@dataclass
class Authenticator:
    keys: dict[str, str]
    rate_per_minute: float | None = None  # this process's share of each key's rate
    clock: object = time.monotonic
    path: str | Path | None = None  # the key file, reread when it changes
    _buckets: dict[str, Bucket] = field(default_factory=dict)
    _checked: float = 0.0
    _version: tuple | None = None

    @classmethod
    def from_file(cls, path: str | Path, rate_per_minute: float | None = None, clock=time.monotonic) -> Authenticator:
        auth = cls(load_keys(path), rate_per_minute, clock, path)
        auth._version, auth._checked = _file_version(path), clock()
        return auth

    def reload_if_changed(self) -> None:
        """Reread the key file when it changed (checked at most every KEYS_RELOAD_S). A file that cannot be read or
        has no valid key keeps the keys in force, with a warning: a bad edit must not open or close the API."""
        now = self.clock()
        if self.path is None or now - self._checked < KEYS_RELOAD_S:
            return
        self._checked = now
        version = _file_version(self.path)
        if version == self._version:
            return
        try:
            keys = load_keys(self.path)
        except KeyFileError as exc:
            logger.warning("API key file unusable, the %d keys already loaded stay in force: %s", len(self.keys), exc)
            return
        self._version = version
        if keys != self.keys:
            logger.info("API keys reloaded from %s: %d keys (%s)", self.path, len(keys), ", ".join(sorted(keys)))
            self.keys = keys
            self._buckets = {name: bucket for name, bucket in self._buckets.items() if name in keys}

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an Authorization header, or None. Compares against every key, always."""
        self.reload_if_changed()
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
        burst = max(1.0, float(self.rate_per_minute))  # a replica's share of a small rate still admits one
        bucket = self._buckets.setdefault(name, Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / rate


def _file_version(path: str | Path) -> tuple | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def is_open(method: str, path: str) -> bool:
    if method not in ("GET", "HEAD"):
        return False
    return any(path == p or (p.endswith("/") and p != "/" and path.startswith(p)) for p in OPEN_PATHS)
