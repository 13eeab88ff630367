"""Where the project keeps files on a host: built and downloaded models, simulated driver state."""

from __future__ import annotations

import os
from pathlib import Path

# Where built and downloaded models live. One folder per user so a second `make run` reuses the tiny model.
ZIT_CACHE_DIR_ENV = "ZIT_CACHE_DIR"


def cache_dir() -> Path:
    """ZIT_CACHE_DIR, else ~/.cache/zit."""
    return Path(os.environ.get(ZIT_CACHE_DIR_ENV) or Path.home() / ".cache" / "zit").expanduser()
