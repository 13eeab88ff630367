"""LoRA adapters: the operator's folder, the names a request may use, and what they cost in memory.

1. The operator names one folder (`lora_dir`); its `<name>.safetensors` files are the adapters, by name. A request
   gives only the name: it must look like a plain file name (letters, digits, '.', '_', '-'; no '/', no '..') and its
   file, symlinks resolved, must lie inside the folder, so no request can make a replica read anything else.
2. A replica loads an adapter on first use and keeps up to `lora_slots` of them (Ray Serve model multiplexing, the
   adapter name is the multiplexed model id): requests for an adapter go to replicas that already hold it.
3. The memory model counts the adapters a replica may hold: every card of every tier reserves `lora_slots` x the
   largest adapter's parameters in the compute dtype (`Profile.lora_params`). The reserve is fixed when the app is
   built (the largest adapter then, or `lora_reserve_params`); an adapter added later that is larger is refused
   with a 422 that says so, never loaded past the budget.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

LORA_SUFFIX = ".safetensors"
LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# How many adapter names an error message lists.
LIST_IN_ERRORS = 20


def valid_name(stem: str) -> bool:
    """A plain file name: letters, digits, '.', '_', '-', not starting with a dot, no '..', at most 100 characters."""
    return bool(LORA_NAME_RE.fullmatch(stem)) and ".." not in stem


class LoraError(ValueError):
    """A request's adapter cannot be used; the message says what to change."""


class LoraSettings(BaseModel):
    """What replicas and the ingress need to know about LoRA (ServiceConfig.lora_settings())."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: str
    slots: int = Field(2, ge=1, le=16)
    fuse: bool = False
    reserve_params: int = Field(0, ge=0, description="Parameters reserved per slot (the largest adapter allowed).")

    @property
    def reserved_params(self) -> int:
        """Parameters the memory model counts on every card: slots x the per-slot reserve."""
        return self.slots * self.reserve_params


def lora_folder(path: str) -> Path:
    """The LoRA folder as an absolute path (replicas may run in another working directory), or LoraError."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise LoraError(f"the LoRA folder {path!r} (lora_dir / --lora-dir) is not a folder; create it or unset lora_dir")
    return folder


def adapter_params(path: Path) -> int:
    """Parameters in a safetensors adapter file, from its header (no tensor is read; cached per file version)."""
    stat = Path(path).stat()
    return _params(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _params(path: str, mtime_ns: int, size: int) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            count = 1
            for dim in handle.get_slice(key).get_shape():
                count *= dim
            total += count
    return total


class LoraLibrary:
    """The adapters in one folder, looked up by name with every path kept inside the folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def resolve(self, name: str) -> Path:
        """The adapter file for `name`, or LoraError saying what to change."""
        if not isinstance(name, str) or not valid_name(name.removesuffix(LORA_SUFFIX)):
            raise LoraError(f"lora must be the name of an adapter in the LoRA folder (letters, digits, '.', '_', "
                            f"'-'; no paths); got {name!r}")
        stem = name.removesuffix(LORA_SUFFIX)
        root = self.folder.resolve()
        path = (root / f"{stem}{LORA_SUFFIX}").resolve()
        if not path.is_relative_to(root):  # a symlink pointing out of the folder
            raise LoraError(f"lora {name!r} points outside the LoRA folder; the operator must replace that link")
        if not path.is_file():
            names = self.names()
            available = ", ".join(names[:LIST_IN_ERRORS]) or "none"
            more = f" and {len(names) - LIST_IN_ERRORS} more" if len(names) > LIST_IN_ERRORS else ""
            raise LoraError(f"no LoRA named {stem!r}; available: {available}{more} (GET /v1/loras)")
        return path

    def names(self) -> list[str]:
        """The adapters a request may name: exactly those `resolve` accepts."""
        if not self.folder.is_dir():
            return []
        root = self.folder.resolve()
        return sorted(p.name.removesuffix(LORA_SUFFIX) for p in self.folder.glob(f"*{LORA_SUFFIX}")
                      if valid_name(p.name.removesuffix(LORA_SUFFIX)) and p.resolve().is_relative_to(root)
                      and p.resolve().is_file())

    def describe(self) -> list[dict]:
        """Every adapter: name, parameters, file size (for GET /v1/loras and the web UI)."""
        out = []
        for name in self.names():
            path = self.folder / f"{name}{LORA_SUFFIX}"
            try:
                out.append({"name": name, "params": adapter_params(path), "bytes": path.stat().st_size})
            except Exception as exc:  # a broken file is listed with why (no server paths), not hidden
                out.append({"name": name, "error": f"unreadable adapter file ({exc.__class__.__name__})"})
        return out

    def largest_params(self) -> int:
        return max((a.get("params", 0) for a in self.describe()), default=0)

    def check(self, name: str, settings: LoraSettings) -> Path:
        """resolve(), plus: the adapter fits the memory reserved for one slot."""
        path = self.resolve(name)
        params = adapter_params(path)
        if params > settings.reserve_params:
            raise LoraError(f"LoRA {name!r} has {params} parameters, more than the {settings.reserve_params} "
                            "reserved per adapter when the service started; restart it (or raise lora_reserve_params) "
                            "to use this adapter")
        return path


def adapter_to_dtype(pipe, name: str, dtype) -> None:
    """Put adapter `name`'s weights in `dtype` (the compute dtype). peft gives an adapter its base layer's dtype:
    float8 on fp8-stored tiers, where nothing upcasts it (the layerwise-casting hooks sit on the base layers).
    Adapters are small; the memory model counts them in the compute dtype."""
    for param_name, param in pipe.transformer.named_parameters():
        if f".{name}." in param_name and ("lora_A" in param_name or "lora_B" in param_name) and param.dtype != dtype:
            param.data = param.data.to(dtype)


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's `<lora:name:weight>` tags: the prompt without them, and (name, weight) per tag (weight 1 if absent)."""
    found = []

    def take(match: re.Match) -> str:
        weight = match.group(2)
        try:
            found.append((match.group(1).strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise LoraError(f"LoRA tag {match.group(0)!r} has a weight that is not a number") from None
        return ""

    stripped = re.sub(r" ?<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", take, prompt)
    return (stripped.strip() if found else prompt), found
