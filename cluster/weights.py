"""One copy of each stored weight set per host: the weights cache, and loading components as views of it.

A replica runs each component with its tensors in fixed dtypes: the leaves layerwise casting stores small in the
profile's storage dtype (bf16 or fp8), the modules it skips (norms, embeddings) in the compute dtype, all of it in
the compute dtype without casting. The weights cache holds each component in exactly those dtypes, one folder per
(model, component, dtypes) on the host's disk (`weights_dir()`: ZIT_WEIGHTS_DIR, else the cache dir), written once
per host, tensor by tensor from the model folder, so at most one shard is in memory however big the model.

Replicas load a component as views of its memory-mapped safetensors files (built on the meta device, then
`load_state_dict(assign=True)`): no private copy, and the kernel's page cache holds ONE copy of each file for every
process on the host that maps it, whether they are `zit up`'s replicas on one machine, `zit node`'s on another, or
pods on one Kubernetes node sharing the cache through a hostPath volume. When a component's files already hold
every tensor in the dtype it runs in (Z-Image-Turbo's bf16 text encoder under a bf16 profile), they are mapped
directly and nothing is written.

Writing takes a file lock per entry, so the replicas of a host that start together write it once; an entry is
complete when its `complete.json` exists (a crash mid-write leaves no such file, and the next writer starts over).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.host_memory import trim_host_memory
from cluster.paths import cache_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ZIT_WEIGHTS_DIR_ENV = "ZIT_WEIGHTS_DIR"
ZIT_LOAD_LOCK_TIMEOUT_ENV = "ZIT_LOAD_LOCK_TIMEOUT_S"
# Tensors per written file: small enough that writing holds little memory, few enough files for a 12 GB component.
# cluster/host_memory.py CACHE_WRITE_BYTES counts it, with the tensor being cast.
SHARD_BYTES = 1 << 30
COMPLETE = "complete.json"


def weights_dir() -> Path:
    """Where this host keeps its weights cache."""
    override = os.environ.get(ZIT_WEIGHTS_DIR_ENV)
    return Path(override).expanduser() if override else cache_dir() / "weights"


def _component_class(folder: Path, component: str):
    """The class model_index.json names for `component` ('transformer', 'text_encoder', 'vae')."""
    import importlib

    library, name = json.loads((folder / "model_index.json").read_text())[component]
    return getattr(importlib.import_module(library), name)


def _empty(folder: Path, component: str, compute: "torch.dtype"):
    """The component built from its config with parameters on the meta device (buffers real, as its __init__
    computes them), in `compute`."""
    import torch
    from accelerate import init_empty_weights

    cls = _component_class(folder, component)
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "load_config"):  # diffusers
            module = cls.from_config(cls.load_config(folder / component))
        else:  # transformers
            from transformers import AutoConfig

            module = cls._from_config(AutoConfig.from_pretrained(folder / component))
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(compute)
    return torch.nn.Module.to(module, compute).eval()  # Module.to: diffusers' own warns about float32 modules


def layerwise_cast(component: str, module, storage: "torch.dtype", compute: "torch.dtype") -> None:
    """Store `module`'s leaves in `storage`, each upcast to `compute` for its own forward (diffusers' hooks), skipping
    what is precision sensitive: the transformer's own skip list, and for the text encoder the norms and the token
    embedding (an upcast copy of the 151936 x 2560 embedding would be its largest transient, and a bf16 lookup
    would round layer 0's norm on float32 cards)."""
    import torch

    if component == "transformer":
        module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    else:
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(module, storage_dtype=storage, compute_dtype=compute, skip_modules_pattern="auto",
                                skip_modules_classes=(torch.nn.Embedding,))


def _dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).removeprefix("torch.")


def parts(folder: Path, component: str, storage: "torch.dtype", compute: "torch.dtype") -> dict[str, tuple]:
    """`component`'s parameters in two parts, each with the dtype it runs in and the dtype it is cast through:
    'leaves' (what layerwise casting stores small: `storage`; 8 bits are reached through bfloat16) and 'rest'
    (what casting skips, or everything without casting: `compute`). {part: (names, dtype, via)}.
    Which parameters are leaves is the module's structure, the same whatever the dtypes (read from the component
    built on the meta device and cast as the replica casts it, `layerwise_cast`), so the leaves of a bf16 store are
    one part for bf16 and float32 compute alike."""
    import torch

    module = _empty(folder, component, compute)
    probe = torch.float8_e5m2 if compute != torch.float8_e5m2 else torch.float8_e4m3fn
    layerwise_cast(component, module, probe, compute)  # only to see which parameters casting stores small
    leaves = {name for name, p in module.named_parameters() if p.dtype == probe}
    rest = {name for name, _ in module.named_parameters()} - leaves
    # bf16 from float32 is one rounding whatever the compute dtype. An 8-bit store goes through bfloat16 whatever
    # the compute dtype (as a bf16 card's cast pipeline does), so a float32 card's 8-bit leaves are the very bytes
    # a bf16 card's are: one copy on a host (cluster/host_memory.py counts it once, and planning falls back to it
    # when a host's RAM is short).
    via = torch.bfloat16 if storage.itemsize < 2 else storage
    return {"leaves": (leaves, storage, via), "rest": (rest, compute, compute)}


def part_name(component: str, part: str, dtype: "torch.dtype", via: "torch.dtype") -> str:
    """A stored part's name (its cache entry's folder, and the shared set the host-memory model counts)."""
    suffix = f"-via-{_dtype_name(via)}" if via != dtype else ""
    return f"{component}-{part}-{_dtype_name(dtype)}{suffix}"


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _model_key(folder: Path, component: str) -> str:
    """The model folder's part of an entry's path: its name, and a digest of its path and each file's size and
    mtime (a new download gets new entries)."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for file in _files(folder / component):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{folder.name}-{digest.hexdigest()[:12]}"


def _index(folder: Path, component: str, names: set[str]) -> dict[str, tuple[Path, str, "torch.dtype"]]:
    """Where each parameter of `component` is in the model's own files: {parameter name: (file, key, dtype)}. A key
    may carry the model class's prefix (a text encoder saved from its causal-LM wrapper: `model.layers.0...` for a
    `Qwen3Model`'s `layers.0...`) or lack it; keys of no parameter (an LM head, buffers) are left out. Raises
    ValueError naming what is missing when the files do not hold every parameter."""
    from safetensors import safe_open

    prefix = getattr(_component_class(folder, component), "base_model_prefix", "") or ""
    out = {}
    for file in _files(folder / component):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                name = key
                if name not in names and prefix:
                    name = key.removeprefix(f"{prefix}.") if key.startswith(f"{prefix}.") else f"{prefix}.{key}"
                if name in names:
                    out[name] = (file, key, _torch_dtype(handle.get_slice(key).get_dtype()))
    missing = sorted(names - set(out))
    if missing:
        raise ValueError(f"{folder / component}: its safetensors files lack {len(missing)} of the component's "
                         f"{len(names)} parameters (first: {', '.join(missing[:3])}); is it a Z-Image-Turbo folder in "
                         "diffusers format, downloaded whole?")
    return out


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def stored_parts(folder: Path, component: str, storage: "torch.dtype", compute: "torch.dtype"
                 ) -> list[tuple[Path | None, set[str]]]:
    """Where each part of `component` is stored in the dtype it runs in: [(cache entry, parameter names)], the entry
    None for a part the model's own files already hold in that dtype (it is read from them). A missing entry is
    written now, tensor by tensor (at most SHARD_BYTES held; each shard logged as it is written).
    Raises OSError when it cannot be written (a full disk: the message says how much it needs and where),
    ValueError when the model's files lack parameters."""
    split = parts(folder, component, storage, compute)
    index = _index(folder, component, set().union(*(names for names, _, _ in split.values())))
    out = []
    for part, (names, dtype, via) in split.items():
        if not names:
            continue
        if all(index[name][2] == dtype for name in names):
            out.append((None, names))
            continue
        # The entry's name: the part, and a digest of its parameter names (another diffusers version may skip
        # other modules when casting: its entry is a new one, never a stale one).
        digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:8]
        entry = weights_dir() / _model_key(folder, component) / f"{part_name(component, part, dtype, via)}-{digest}"
        if not (entry / COMPLETE).is_file():
            entry.parent.mkdir(parents=True, exist_ok=True)
            with _locked(entry.with_suffix(".lock"), f"writing {entry.name} into the weights cache"):
                if not (entry / COMPLETE).is_file():  # another replica of this host may have written it meanwhile
                    _write({name: index[name] for name in names}, entry, dtype, via)
        out.append((entry, names))
    return out


def lock_timeout_s() -> float:
    """How long a replica waits for a lock of the weights cache (`ZIT_LOAD_LOCK_TIMEOUT_S`, default an hour: the
    host's first load writes its stored copy, minutes on a slow disk, while the others wait)."""
    raw = os.environ.get(ZIT_LOAD_LOCK_TIMEOUT_ENV, "3600")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ZIT_LOAD_LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{ZIT_LOAD_LOCK_TIMEOUT_ENV}={raw!r} must be above 0 seconds")
    return value


@contextlib.contextmanager
def _locked(path: Path, what: str = "a load"):
    """`path` locked for this process (flock: the kernel lets go when the holder dies, however it dies). The
    holder writes who it is into the file; a waiter logs who it waits for every 30 s and gives up after
    `lock_timeout_s`, saying who held it (a holder that is alive and stuck)."""
    timeout = lock_timeout_s()
    with open(path, "a+") as handle:
        started = last_said = time.monotonic()
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - started >= timeout:
                    raise TimeoutError(
                        f"waited {now - started:.0f} s for {path} ({_holder(handle)}); that process is alive and "
                        f"has not finished; see its log, or raise {ZIT_LOAD_LOCK_TIMEOUT_ENV}") from None
                if now - last_said >= 30:
                    logger.info("waiting %.0f s for %s (%s) to finish", now - started, path, _holder(handle))
                    last_said = now
                time.sleep(0.5)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}: {what}, since {time.strftime('%H:%M:%S')}\n")
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # no stale holder for the next waiter to name
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "held by another process"


def _write(tensors: dict[str, tuple[Path, str, "torch.dtype"]], entry: Path, dtype: "torch.dtype",
           via: "torch.dtype") -> None:
    """Write `tensors` ({parameter name: (file, key, dtype)}) into `entry` under their parameter names, in `dtype`,
    each cast through `via` first (as casting a bf16 card's loaded pipeline does: the model's float32 weights to
    bfloat16, then leaf by leaf to the storage dtype), so a stored copy gives the same images as the cast one.
    Written into a sibling folder and renamed when complete."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.rmtree(entry, ignore_errors=True)
    partial = entry.with_name(entry.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key, _) in sorted(tensors.items()):
        by_file.setdefault(file, []).append((name, key))
    sizes = {}
    for file, pairs in by_file.items():
        with safe_open(str(file), "pt") as handle:
            for name, key in pairs:
                count = 1
                for side in handle.get_slice(key).get_shape():
                    count *= side
                sizes[name] = count * dtype.itemsize
    total = sum(sizes.values())
    free = shutil.disk_usage(partial).free
    if free < total:
        raise OSError(f"the weights cache needs {total / 2**30:.1f} GiB at {partial.parent} and the disk has "
                      f"{free / 2**30:.1f} GiB free; free some, or point {ZIT_WEIGHTS_DIR_ENV} at a larger disk")
    logger.info("writing %s (%.1f GiB) into the weights cache", entry.name, total / 2**30)
    done, shard, held, index = 0, {}, 0, 0

    def flush() -> None:
        nonlocal shard, held, index
        if shard:
            save_file(shard, str(partial / f"weights-{index:05d}.safetensors"))
            index += 1
            shard, held = {}, 0
            trim_host_memory()  # the shard goes back to the host, not to this process's heap
            # A replica's log shows how far the host's one-time write is.
            logger.info("weights cache: %s %.1f of %.1f GiB", entry.name, done / 2**30, total / 2**30)

    for file, pairs in by_file.items():
        with safe_open(str(file), "pt") as handle:
            for name, key in pairs:
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(via)
                shard[name] = tensor.to(dtype).contiguous()
                if tensor.dtype != dtype:  # the cast's temporary goes back now, not at the next shard
                    del tensor
                    trim_host_memory()
                held += sizes[name]
                done += sizes[name]
                if held >= SHARD_BYTES:
                    flush()
    flush()
    if done != total or len(sizes) != len(tensors):
        raise RuntimeError(f"writing {entry.name}: {len(sizes)} of {len(tensors)} tensors")
    for config in next(iter(by_file)).parent.glob("*.json"):
        shutil.copy2(config, partial / config.name)
    (partial / COMPLETE).write_text(json.dumps({"bytes": total, "tensors": len(sizes)}))
    partial.rename(entry)


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, _SAFETENSORS_DTYPES.get(name, name.lower()))


def load_component(folder: Path, component: str, storage: "torch.dtype", compute: "torch.dtype"):
    """`component` of the model `folder` with each parameter in the dtype it runs in under (storage, compute), as
    views of the host's stored parts (`stored_parts`; the model's own files for a part already in its dtype): built
    on the meta device and assigned the memory-mapped tensors. Layerwise casting's hooks are not attached here
    (`cluster.profiles.apply_profile` does, and finds the leaves already in the storage dtype)."""
    from safetensors.torch import load_file

    module = _empty(folder, component, compute)
    state = {}
    from_model: set[str] = set()
    for entry, names in stored_parts(folder, component, storage, compute):
        if entry is None:
            from_model |= names
            continue
        for file in _files(entry):
            state.update((k, v) for k, v in load_file(str(file)).items() if k in names)  # views of the pages
    if from_model:
        index = _index(folder, component, from_model)
        for file in {file for file, _, _ in index.values()}:
            tensors = load_file(str(file))  # views of the model's own file
            state.update((name, tensors[key]) for name, (f, key, _) in index.items() if f == file)
    buffers = {name for name, _ in module.named_buffers()}
    for file in _files(folder / component):  # persistent buffers saved with the model (small), in the compute dtype
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            for name in set(handle.keys()) & buffers:
                tensor = handle.get_tensor(name)
                state[name] = tensor.to(compute) if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=True, assign=True)
    module._zit_stored = (_dtype_name(storage), _dtype_name(compute))
    return module


@contextlib.contextmanager
def host_load_lock(name: str = "load", what: str = "a replica's load"):
    """Held while a replica loads, so the replicas of one host load one at a time and their load peaks never add up
    (cluster/host_memory.py counts one). One lock file per host's weights dir; a simulated fleet, whose hosts share
    this machine's dir, passes one `name` per simulated host. `what` is said to the replicas that wait. A replica
    that waits past `lock_timeout_s` fails to start with TimeoutError naming the holder (Serve starts it again)."""
    folder = weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / f"{name}.lock", what):
        yield
