"""A simulated card as the replica on it sees it: memory it holds, and work it refuses when it would not fit.

The tiny model computes the pixels on the CPU; the card accounts memory as if the real Z-Image-Turbo ran under the
replica's profile (the numbers come from the memory model). Work whose predicted peak does not fit in what the card
has left raises `torch.OutOfMemoryError` with the message PyTorch gives on CUDA, so a routing mistake fails exactly
as it would on a real card instead of passing silently.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from cluster.link import link_of
from cluster.nvml import FakeNvml, LocalCard
from cluster.tiers import GIB

# Simulated cards take the time model's seconds times this. 0.02 makes a 1024x1024 image on the simulated RTX 4090
# take about 0.1 s and on the GTX 1650 about 1.5 s: the fleet's speed differences show without making tests wait.
ZIT_SIM_TIME_SCALE = float(os.environ.get("ZIT_SIM_TIME_SCALE", "0.02"))


class SimulatedCard:
    def __init__(self, card: LocalCard, limit_bytes: int | None = None):
        """`limit_bytes`: the most this process may hold, as torch.cuda.set_per_process_memory_fraction caps it on
        a real card (a replica on a split card is capped at its tier's budget)."""
        if not card.simulated or not isinstance(card.nvml, FakeNvml):
            raise ValueError(f"card {card.uuid} is not simulated")
        self.card = card
        self.limit_bytes = limit_bytes
        self.nvml: FakeNvml = card.nvml
        self.handle = self.nvml.nvmlDeviceGetHandleByUUID(card.uuid)
        self.spec = self.handle.spec
        self.held = 0
        # The host-to-device rate the card's link implies (cluster/link.py): what its streamed weights take.
        self.link = link_of(card.read())

    def _available(self) -> tuple[int, int, int]:
        """(total, held by others, what this process can hold in all). A card with the oom_above fault gives less
        than it reports."""
        snapshot = self.card.read()
        others = snapshot.memory_used - self.held
        usable = snapshot.memory_total
        if self.spec.oom_above_mib is not None:
            usable = min(usable, self.spec.oom_above_mib << 20)
        available = usable - others
        if self.limit_bytes is not None:
            available = min(available, self.limit_bytes)
        return snapshot.memory_total, others, available

    def _refuse(self, need: int, what: str) -> None:
        total, others, available = self._available()
        if need > available:
            import torch

            free = max(0, total - others - self.held)
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {(need - self.held) / GIB:.2f} GiB. GPU {self.card.index} has "
                f"a total capacity of {total / GIB:.2f} GiB of which {free / GIB:.2f} GiB is free. "
                f"{others / GIB:.2f} GiB is held by other processes. "
                f"(simulated {self.nvml.nvmlDeviceGetName(self.handle)}: {what} needs {need / GIB:.2f} GiB)"
            )

    def hold(self, nbytes: int, what: str = "the resident weights") -> None:
        """Keep `nbytes` on the card from now on (weights after loading); raises OutOfMemoryError if they do not fit."""
        self._refuse(nbytes, what)
        self.held = nbytes
        self.nvml.update_state(self.handle, _pid(), held=nbytes)

    @contextmanager
    def running(self, peak: int, what: str):
        """Run work whose process peak is `peak` bytes; memory goes back to what is held when it ends."""
        self._refuse(peak, what)
        self.nvml.update_state(self.handle, _pid(), held=max(peak, self.held), busy=True)
        try:
            yield
        finally:
            self.nvml.update_state(self.handle, _pid(), held=self.held, busy=False)

    def pace(self, started: float, predicted_s: float, cancel=None) -> None:
        """Wait until `predicted_s` x ZIT_SIM_TIME_SCALE has passed since `started` (the card's simulated speed), or
        until `cancel` (a threading.Event) is set."""
        remaining = predicted_s * ZIT_SIM_TIME_SCALE - (time.perf_counter() - started)
        if remaining > 0:
            if cancel is None:
                time.sleep(remaining)
            else:
                cancel.wait(remaining)

    def latents_hook(self):
        """What this card does to latents: NaN on a card with the black_images fault, else nothing."""
        if not self.spec.black_images:
            return None
        return lambda latents: latents * float("nan")

    def release(self) -> None:
        self.held = 0
        self.nvml.update_state(self.handle, _pid(), held=0, busy=False)


def _pid() -> int:
    import os

    return os.getpid()


OTHER_USE = 0  # the state's key for RAM held outside the cluster (SimulatedHost.set_other_use); never a pid


class SimulatedHost:
    """A simulated card's host as the replicas on it see it: the RAM each holds by the host-memory model
    (cluster/host_memory.py), its shared weight sets counted once, and a replica refused when the host would not
    hold it, as the kernel refuses a real one (MemoryError, "Cannot allocate memory"). A host the fleet file gives
    no RAM (`host_ram_gb`) is not checked. The state is a file per host beside the cards' (several replicas write
    it: a lock keeps their updates whole); a process that has exited no longer counts."""

    def __init__(self, nvml: FakeNvml, host: str):
        self.nvml = nvml
        self.host = host
        self.ram_bytes = nvml.fleet.host_ram_bytes().get(host)
        self.path = nvml.state_dir / f"host-{host}.json"

    def _read(self) -> dict[int, dict]:
        import json

        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        from cluster.nvml import _alive

        return {int(pid): entry for pid, entry in raw.items() if int(pid) == OTHER_USE or _alive(int(pid))}

    def set_other_use(self, nbytes: int) -> None:
        """Programs outside the cluster hold `nbytes` of the host's RAM from now on (a fault that tests and
        benchmarks inject, as `FakeNvml.set_lost` is for a card; 0 ends it). Replicas that hold already keep it."""
        def update(entries: dict[int, dict]) -> dict[int, dict]:
            kept = {p: e for p, e in entries.items() if p != OTHER_USE}
            return {**kept, OTHER_USE: {"private": int(nbytes), "shared": {}}} if nbytes else kept

        self._update(update)

    def used(self, without: int | None = None) -> int:
        """Bytes the host's live replicas hold (each shared set once), leaving out process `without`."""
        private, shared = 0, {}
        for pid, entry in self._read().items():
            if pid != without:
                private += entry["private"]
                shared.update(entry["shared"])
        return private + sum(shared.values())

    def hold(self, private: int, shared: dict[str, int], what: str) -> None:
        """This process holds `private` bytes and maps the `shared` sets from now on; raises MemoryError when the
        host's other replicas leave too little."""
        def update(entries: dict[int, dict]) -> dict[int, dict]:
            others = {p: e for p, e in entries.items() if p != _pid()}
            have = {}
            for entry in others.values():
                have.update(entry["shared"])
            used = sum(e["private"] for e in others.values()) + sum(have.values())
            more = private + sum(size for name, size in shared.items() if name not in have)
            if self.ram_bytes is not None and used + more > self.ram_bytes:
                raise MemoryError(
                    f"Cannot allocate memory: simulated host {self.host} has {self.ram_bytes / GIB:.1f} GiB of RAM, "
                    f"its other replicas hold {used / GIB:.1f} GiB and {what} needs {more / GIB:.1f} GiB more")
            return {**others, _pid(): {"private": int(private), "shared": {k: int(v) for k, v in shared.items()}}}

        self._update(update)

    def release(self) -> None:
        """This process holds nothing from now on (never refused, whatever the others hold)."""
        self._update(lambda entries: {p: e for p, e in entries.items() if p != _pid()})

    def _update(self, update) -> None:
        """Replace the host's state by `update(live entries)` under the host's lock (several replicas write it)."""
        import fcntl
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = update(self._read())
            tmp = self.path.with_suffix(f".{_pid()}.tmp")
            tmp.write_text(json.dumps({str(p): e for p, e in entries.items()}))
            os.replace(tmp, self.path)
