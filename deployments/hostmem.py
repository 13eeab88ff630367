"""A replica's host memory: handing freed memory back (`trim_host_memory`, cluster/host_memory.py), the host it runs
on as host memory goes (`ReplicaHost`, `host_of`), and each host's RAM as its replicas report it (`hosts_view`).
"""

from __future__ import annotations

from cluster.host_memory import trim_host_memory

__all__ = ["ReplicaHost", "host_of", "hosts_view", "trim_host_memory"]


class ReplicaHost:
    """The host a replica runs on, as host memory goes: its name, the lock its replicas load under (one at a time:
    cluster.weights.host_load_lock), what the replica needs by the host-memory model, and on a simulated card the
    simulated host that holds the real model's RAM (cluster.simcard.SimulatedHost)."""

    def __init__(self, name: str, lock_name: str, sim=None):
        self.name = name
        self.lock_name = lock_name
        self.sim = sim
        self.estimate = None

    def hold_loading(self, estimate, what: str) -> None:
        """From now on the replica holds its load peak (raises MemoryError on a simulated host that cannot)."""
        self.estimate = estimate
        self.what = what
        if self.sim is not None:
            self.sim.hold(estimate.runtime + estimate.private + estimate.load_transient, estimate.shared,
                          f"{what} while loading")

    def hold_loaded(self) -> None:
        """Loaded: the replica keeps its steady bytes."""
        if self.sim is not None and self.estimate is not None:
            self.sim.hold(self.estimate.runtime + self.estimate.private, self.estimate.shared, self.what)

    def release(self) -> None:
        if self.sim is not None:
            self.sim.release()

    def describe(self) -> dict:
        """For the replica's report: the host, its RAM and what is used of it (the simulated host's accounting, or
        the kernel's reading), and what this replica holds by the model (its shared sets by name)."""
        if self.sim is not None:
            total, used = self.sim.ram_bytes, self.sim.used()
        else:
            from runtime.nodes import local_host_ram

            ram = local_host_ram()
            total, used = ram["total"], ram["total"] - ram["available"]
        e = self.estimate
        return {"host": self.name, "simulated": self.sim is not None, "ram_bytes": total, "used_bytes": used,
                "private_bytes": e.runtime + e.private if e else None, "shared": dict(e.shared) if e else {}}


def host_of(card, snapshot) -> ReplicaHost:
    """The ReplicaHost of a replica on `card` (runtime.nodes.local_card; None on the CPU tier) read as `snapshot`: a
    simulated card's host from its fleet file, else this machine."""
    import socket

    if card is not None and card.simulated:
        from cluster.simcard import SimulatedHost

        name = snapshot.host or "sim-host-0"
        return ReplicaHost(name, f"load-{name}", SimulatedHost(card.nvml, name))
    return ReplicaHost(socket.gethostname(), "load")


def hosts_view(reports: list[dict]) -> list[dict]:
    """Each host's RAM as its replicas report it (generators' and the text-encoder stage's `host_memory`): what it
    has, what is used of it, and what its replicas need by the host-memory model (their own bytes, each shared
    weight set once), sorted by host."""
    hosts: dict[str, dict] = {}
    for report in reports:
        memory = report.get("host_memory")
        if not memory:
            continue
        host = hosts.setdefault(memory["host"], {"host": memory["host"], "simulated": memory.get("simulated"),
                                                 "ram_bytes": None, "used_bytes": None, "own": 0, "shared": {},
                                                 "replicas": []})
        host["ram_bytes"] = memory.get("ram_bytes") or host["ram_bytes"]
        host["used_bytes"] = memory.get("used_bytes") if memory.get("used_bytes") is not None else host["used_bytes"]
        host["own"] += memory.get("private_bytes") or 0
        host["shared"].update(memory.get("shared") or {})
        host["replicas"].append(report.get("replica"))
    gib = lambda n: None if n is None else round(n / 2**30, 3)  # noqa: E731
    return [{"host": h["host"], "simulated": h["simulated"], "ram_bytes": h["ram_bytes"], "used_bytes": h["used_bytes"],
             "need_bytes": h["own"] + sum(h["shared"].values()), "ram_gib": gib(h["ram_bytes"]),
             "used_gib": gib(h["used_bytes"]), "need_gib": gib(h["own"] + sum(h["shared"].values())),
             "shared_gib": {name: gib(size) for name, size in h["shared"].items()}, "replicas": sorted(h["replicas"])}
            for h in sorted(hosts.values(), key=lambda h: h["host"])]
