"""What NVML says about the cards: one snapshot type, read from the real driver or from a fleet file.

Everything above this module talks to an *NVML backend*: an object with the nvidia-ml-py function names
(`nvmlInit`, `nvmlDeviceGetMemoryInfo`, ...). The real backend is the `pynvml` module itself; `FakeNvml` serves the
cards of a fleet file through the same names, return shapes and error types, so the probe, the node agent, the
replicas and the metrics run unchanged on a simulated fleet.

A simulated fleet keeps its "driver state" (memory each process holds on each card) in small JSON files, one per
card, so every process on the machine sees the same numbers, as with a real driver.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pynvml
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.paths import cache_dir
from cluster.tiers import GIB, classify

MIB = 1 << 20
# The simulated fleet `zit up` serves on when NVML finds no card (the README's mixed fleet).
DEFAULT_FLEET = Path(__file__).resolve().parent / "fleets" / "mixed.yaml"
# Environment of a simulated card's Ray node: the fleet file it belongs to. (The card itself is named by the node's
# `zit/card` label, as a real card is by CUDA_VISIBLE_DEVICES.)
ZIT_FLEET_FILE_ENV = "ZIT_FLEET_FILE"
# Where simulated cards keep their driver state; default: a folder per fleet file under the cache dir.
ZIT_SIM_STATE_DIR_ENV = "ZIT_SIM_STATE_DIR"
# How old an NVML reading the request path may use. One second keeps VRAM numbers current for routing while NVML is
# read at most once a second per process, off the request path (NVML calls can take milliseconds per card).
ZIT_NVML_PERIOD_S = float(os.environ.get("ZIT_NVML_PERIOD_S", "1.0"))
# bf16 needs compute capability 8.0 (Ampere) or newer.
BF16_MIN_CC = (8, 0)
# The pid a simulated card's foreign graphics process (CardSpec.graphics_memory_mib) is listed with: -1 is nobody's
# pid, and not 0, the simulated foreign compute process, which would make the two one process.
GRAPHICS_PID = -1


class NvmlUnavailable(RuntimeError):
    """No NVIDIA driver (or no NVML library) on this machine; the message says what to use instead."""


# -- the snapshot ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSnapshot:
    """One card at one moment. Memory in bytes; `foreign_memory` is held by processes other than `own_pids`
    (compute and graphics processes, see `foreign_memory_of`).

    A card NVML could not read (it fell off the bus: NVMLError_GpuIsLost) is a snapshot with `error` set, the NVML
    error; its readings are then empty (memory 0, compute capability 0.0, tier None) and it hosts nothing.
    """

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_free: int
    memory_used: int
    compute_capability: tuple[int, int]
    bf16: bool
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None
    foreign_memory: int
    tier: str | None
    simulated: bool = False
    speed: float | None = None
    host: str | None = None
    taken_at: float = field(default_factory=time.time)
    # Replicas of `tier` the card hosts: 1, or k when it is split into k slots of a smaller tier (runtime/nodes.py
    # split_card; `tier` is then the smaller tier).
    slots: int = 1
    error: str | None = None
    # The PCIe link (cluster/link.py): current and maximum generation and width (None where NVML does not say), and
    # the bytes per second NVML's throughput counters saw each way (None where the driver has none).
    pcie_gen: int | None = None
    pcie_width: int | None = None
    pcie_max_gen: int | None = None
    pcie_max_width: int | None = None
    pcie_tx_bytes_s: float | None = None
    pcie_rx_bytes_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        from cluster.link import degraded, link_of

        data = asdict(self)
        data["link"] = None if self.error else link_of(self).as_dict()
        data["link_degraded"] = None if self.error else degraded(self)
        data["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        data["memory_total_gib"] = round(self.memory_total / GIB, 2)
        data["memory_free_gib"] = round(self.memory_free / GIB, 2)
        data["memory_used_gib"] = round(self.memory_used / GIB, 2)
        return data


def _optional(call, *args, errors: type[Exception] = pynvml.NVMLError_NotSupported):
    """NVML readings some cards do not support (power on laptops, temperature on some vGPUs) come back as None; so
    does any reading that raises `errors` (pynvml.NVMLError: whatever a failed card still answers)."""
    try:
        return call(*args)
    except errors:
        return None


def foreign_memory_of(compute: list, graphics: list, used: int, own_pids: frozenset[int]) -> int:
    """Bytes held on a card by processes other than `own_pids`, from NVML's compute and graphics process lists.

    A process with both kinds of context (CUDA and OpenGL/Vulkan) is in both lists; it counts once, with the larger
    of its two readings. NVML gives usedGpuMemory None when it cannot tell (Windows WDDM, a process of another
    container): that is unknown, not zero, so when a foreign process's memory is unknown the foreign memory is
    everything `used` on the card except what `own_pids` are known to hold, an upper bound that keeps routing and
    `zit node`'s room check on the safe side.
    """
    held: dict[int, int | None] = {}
    for process in [*compute, *graphics]:
        reading, earlier = process.usedGpuMemory, held.get(process.pid)
        if process.pid not in held or earlier is None:
            held[process.pid] = reading
        elif reading is not None:
            held[process.pid] = max(earlier, reading)
    foreign = {pid: reading for pid, reading in held.items() if pid not in own_pids}
    known_foreign = sum(reading for reading in foreign.values() if reading is not None)
    if any(reading is None for reading in foreign.values()):
        own = sum(reading or 0 for pid, reading in held.items() if pid in own_pids)
        return max(known_foreign, used - own)
    return known_foreign


def read_card(nvml, index: int, own_pids: frozenset[int] = frozenset()) -> GpuSnapshot:
    """Read one card through an NVML backend (real or fake). Raises the backend's NVMLError when the card fails."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    cc = tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle))
    compute = _optional(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
    graphics = _optional(nvml.nvmlDeviceGetGraphicsRunningProcesses, handle) or []
    foreign = foreign_memory_of(compute, graphics, int(memory.used), own_pids)
    utilization = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
    power_mw = _optional(nvml.nvmlDeviceGetPowerUsage, handle)
    name = nvml.nvmlDeviceGetName(handle)
    extra = nvml.zit_card_extra(handle) if hasattr(nvml, "zit_card_extra") else {}
    # NVML's PCIe throughput counters are KB/s over the last 20 ms.
    tx_kb = _optional(nvml.nvmlDeviceGetPcieThroughput, handle, pynvml.NVML_PCIE_UTIL_TX_BYTES)
    rx_kb = _optional(nvml.nvmlDeviceGetPcieThroughput, handle, pynvml.NVML_PCIE_UTIL_RX_BYTES)
    return GpuSnapshot(
        index=index,
        uuid=nvml.nvmlDeviceGetUUID(handle),
        name=name.decode() if isinstance(name, bytes) else name,
        memory_total=int(memory.total),
        memory_free=int(memory.free),
        memory_used=int(memory.used),
        compute_capability=(int(cc[0]), int(cc[1])),
        bf16=cc >= BF16_MIN_CC,
        utilization_pct=None if utilization is None else float(utilization.gpu),
        temperature_c=_optional(nvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
        power_w=None if power_mw is None else power_mw / 1000.0,
        foreign_memory=int(foreign),
        tier=classify(int(memory.total)),
        simulated=bool(extra.get("simulated", False)),
        speed=extra.get("speed"),
        host=extra.get("host"),
        pcie_gen=_optional(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_width=_optional(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        pcie_max_gen=_optional(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        pcie_max_width=_optional(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
        pcie_tx_bytes_s=None if tx_kb is None else tx_kb * 1024.0,
        pcie_rx_bytes_s=None if rx_kb is None else rx_kb * 1024.0,
    )


def failed_card(nvml, index: int, exc: Exception) -> GpuSnapshot:
    """The snapshot of a card whose reading failed with `exc`: what NVML still says of it (UUID, name; often nothing
    once a card is lost) and the error."""
    handle = _optional(nvml.nvmlDeviceGetHandleByIndex, index, errors=pynvml.NVMLError)
    name = _optional(nvml.nvmlDeviceGetName, handle, errors=pynvml.NVMLError) if handle is not None else None
    uuid = _optional(nvml.nvmlDeviceGetUUID, handle, errors=pynvml.NVMLError) if handle is not None else None
    extra = nvml.zit_card_extra(handle) if handle is not None and hasattr(nvml, "zit_card_extra") else {}
    return GpuSnapshot(
        index=index, uuid=uuid or "",
        name=(name.decode() if isinstance(name, bytes) else name) or "unknown card", memory_total=0, memory_free=0,
        memory_used=0, compute_capability=(0, 0), bf16=False, utilization_pct=None, temperature_c=None, power_w=None,
        foreign_memory=0, tier=None, simulated=bool(extra.get("simulated", False)), speed=extra.get("speed"),
        host=extra.get("host"), error=f"{exc.__class__.__name__}: {exc}",
    )


def probe(nvml=None, own_pids: frozenset[int] = frozenset()) -> list[GpuSnapshot]:
    """Every card the backend sees, in index order. With the real backend and no driver, raises NvmlUnavailable.

    Each card is read on its own: one that fails (NVMLError_GpuIsLost, ...) is listed with `error` set
    (`failed_card`) and the others are read as usual, so a lost card neither hides nor stops the healthy ones.
    """
    nvml = nvml if nvml is not None else pynvml
    try:
        nvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(
            f"NVML is not available ({exc}): no NVIDIA driver on this machine. Serve on a simulated fleet with "
            "`zit up --fleet cluster/fleets/mixed.yaml`, or on the CPU with `zit up --cpu`."
        ) from exc
    try:
        cards = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                cards.append(read_card(nvml, index, own_pids))
            except pynvml.NVMLError as exc:
                cards.append(failed_card(nvml, index, exc))
        return cards
    finally:
        nvml.nvmlShutdown()


@dataclass
class LocalCard:
    """The card a replica runs on, with the NVML backend that reads it (runtime.nodes.local_card finds it)."""

    uuid: str
    index: int
    nvml: object
    simulated: bool

    def read(self) -> GpuSnapshot:
        return read_card(self.nvml, self.index, frozenset({os.getpid()}))


class NvmlMonitor:
    """Keeps the latest snapshot of some cards, refreshed by a background thread every `period_s`.

    `latest()` never calls NVML, so the request path never waits on the driver. A failing read (a card that fell
    off the bus, a driver restart) is kept as `error` and the card is reported missing, not crashed on.
    """

    def __init__(self, nvml=None, period_s: float = ZIT_NVML_PERIOD_S, indices: list[int] | None = None,
                 own_pids: frozenset[int] | None = None):
        self._nvml = nvml if nvml is not None else pynvml
        self._period_s = period_s
        self._indices = indices
        self._own_pids = own_pids if own_pids is not None else frozenset({os.getpid()})
        self._snapshots: list[GpuSnapshot] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._nvml.nvmlInit()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="zit-nvml", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        try:
            indices = self._indices if self._indices is not None else range(self._nvml.nvmlDeviceGetCount())
            self._snapshots = [read_card(self._nvml, i, self._own_pids) for i in indices]
            self.error = None
        except pynvml.NVMLError as exc:
            self._snapshots = []
            self.error = f"{exc.__class__.__name__}: {exc}"

    def latest(self) -> list[GpuSnapshot]:
        return list(self._snapshots)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        try:
            self._nvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


# -- fleet files and the fake backend ----------------------------------------------------------------------------


class PcieSpec(BaseModel):
    """A simulated card's PCIe link, as NVML reports it (cluster/link.py)."""

    model_config = ConfigDict(extra="forbid")

    gen: int = Field(ge=1, le=6, description="Current link generation, e.g. 3 for PCIe 3.0.")
    width: Literal[1, 2, 4, 8, 16] = Field(description="Current link width in lanes, e.g. 1 on an x1 riser.")
    max_gen: int | None = Field(None, ge=1, le=6, description="Most the card and slot allow; default: `gen`.")
    max_width: Literal[1, 2, 4, 8, 16] | None = Field(
        None, description="Most lanes the card and slot allow; default: `width`. Above `width`: the link trained "
        "down (a fault of risers and dirty slots).")

    # As NVML reports them (GpuSnapshot's names), so cluster.link.link_of reads a spec as it reads a card.
    @property
    def pcie_gen(self) -> int:
        return self.gen

    @property
    def pcie_width(self) -> int:
        return self.width

    @property
    def pcie_max_gen(self) -> int:
        return self.max_gen or self.gen

    @property
    def pcie_max_width(self) -> int:
        return self.max_width or self.width

    @model_validator(mode="after")
    def _current_within_max(self) -> "PcieSpec":
        if self.max_gen is not None and self.gen > self.max_gen:
            raise ValueError(f"pcie gen {self.gen} is above max_gen {self.max_gen}")
        if self.max_width is not None and self.width > self.max_width:
            raise ValueError(f"pcie width x{self.width} is above max_width x{self.max_width}")
        return self


class CardSpec(BaseModel):
    """One card of a fleet file."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Marketing name as NVML reports it, e.g. 'NVIDIA GeForce RTX 3060'.")
    vram_gb: float = Field(gt=0, le=256, description="Nominal memory in GB as sold (a '12 GB' card: 12).")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$", description="CUDA compute capability, e.g. '8.6'.")
    bf16: bool | None = Field(None, description="bf16 support; default: compute capability >= 8.0.")
    speed: float = Field(1.0, gt=0, description="Relative speed (RTX 4090 = 1.0) for the simulated step time.")
    host: str = Field("sim-host-0", pattern=r"^[A-Za-z0-9_.-]{1,63}$", description="Host the card sits in.")
    memory_total_mib: int | None = Field(
        None, gt=0, description="Total memory NVML reports, MiB; default vram_gb x 1024 (some drivers show less)."
    )
    foreign_memory_mib: int = Field(0, ge=0, description="Memory held by a process outside the cluster, MiB.")
    graphics_memory_mib: int = Field(
        0, ge=0, description="Memory held by a graphics process outside the cluster (a desktop, a game), MiB; NVML "
        "lists it among the graphics processes, not the compute ones.",
    )
    count: int = Field(1, ge=1, le=10000, description="Identical cards of this kind on this host.")
    fail: bool = Field(False, description="The card is lost: every NVML call on it fails with GPU-is-lost.")
    oom_above_mib: int | None = Field(
        None, gt=0, description="Fault: allocations fail above this much memory although NVML reports more."
    )
    black_images: bool = Field(
        False, description="Fault: the card turns latents into NaN, as plain fp16 does on a card without bf16."
    )
    pcie: PcieSpec | None = Field(
        None, description="The card's PCIe link, e.g. {gen: 3, width: 1} on an x1 riser; none: NVML reports no link "
        "and the time model takes its default rate. A simulated card streams its weights at the rate it implies.")

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _cc_as_text(cls, value):
        return f"{value:.1f}" if isinstance(value, float) else value

    @model_validator(mode="after")
    def _bf16_matches_cc(self) -> "CardSpec":
        cc = tuple(int(x) for x in self.compute_capability.split("."))
        if self.bf16 and cc < BF16_MIN_CC:
            raise ValueError(f"{self.model}: bf16=true needs compute capability >= 8.0, got {self.compute_capability}")
        return self

    @property
    def cc(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)


class FleetFile(BaseModel):
    """A simulated fleet: cards with their memory, compute capability and speed."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,63}$", description="Fleet name (seeds the cards' UUIDs).")
    description: str = Field("", description="What this fleet is for.")
    cards: list[CardSpec] = Field(min_length=1, description="The cards; `count` repeats one.")
    host_ram_gb: dict[str, float] = Field(
        default_factory=dict, description="Each host's RAM in GB (as `free -g` counts it), by the host names the "
        "cards give; a host not listed is not checked. The host-memory model (cluster/host_memory.py) places by it, "
        "and a simulated host refuses a replica that would not fit.")

    @model_validator(mode="after")
    def _hosts_have_cards(self) -> "FleetFile":
        hosts = {card.host for card in self.cards}
        unknown = sorted(set(self.host_ram_gb) - hosts)
        if unknown:
            raise ValueError(f"host_ram_gb names {', '.join(unknown)}, which no card sits in (hosts: "
                             f"{', '.join(sorted(hosts))})")
        small = {h: gb for h, gb in self.host_ram_gb.items() if gb <= 0}
        if small:
            raise ValueError(f"host_ram_gb must be above 0; got {small}")
        return self

    def host_ram_bytes(self) -> dict[str, int]:
        return {host: int(gb * GIB) for host, gb in self.host_ram_gb.items()}


@dataclass
class _SimCard:
    index: int
    uuid: str
    spec: CardSpec


def load_fleet_file(path: str | Path) -> FleetFile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"fleet file {path} cannot be read: {exc}") from exc
    return FleetFile.model_validate(data)


def default_state_dir(fleet_path: Path) -> Path:
    override = os.environ.get(ZIT_SIM_STATE_DIR_ENV)
    if override:
        return Path(override)
    key = uuidlib.uuid5(uuidlib.NAMESPACE_URL, str(fleet_path.resolve())).hex[:12]
    return cache_dir() / "sim" / f"{fleet_path.stem}-{key}"


class FakeNvml:
    """The NVML functions ZIT Cluster uses, answered from a fleet file.

    Memory used on a card = the processes registered on it (see `SimulatedCard`) + the card's foreign process.
    A registered process that has exited no longer counts, as with a real driver.
    """

    NVMLError = pynvml.NVMLError

    def __init__(self, fleet_path: str | Path, state_dir: Path | None = None):
        self.path = Path(fleet_path)
        self.fleet = load_fleet_file(self.path)
        self.state_dir = state_dir or default_state_dir(self.path)
        self.cards: list[_SimCard] = []
        for spec in self.fleet.cards:
            for _ in range(spec.count):
                index = len(self.cards)
                card_id = uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{self.fleet.name}.{index}.zit-sim")
                self.cards.append(_SimCard(index, f"GPU-{card_id}", spec))
        self._initialized = 0

    # Library lifecycle.
    def nvmlInit(self) -> None:
        self._initialized += 1

    def nvmlShutdown(self) -> None:
        self._initialized = max(0, self._initialized - 1)

    def nvmlSystemGetDriverVersion(self) -> str:
        return "simulated"

    def _check(self) -> None:
        if not self._initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    # Devices.
    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _SimCard:
        self._check()
        if not 0 <= index < len(self.cards):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.cards[index]

    def nvmlDeviceGetHandleByUUID(self, card_uuid: str) -> _SimCard:
        self._check()
        for card in self.cards:
            if card.uuid == card_uuid:
                return card
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def _card(self, handle: _SimCard) -> _SimCard:
        self._check()
        if handle.spec.fail or self._read_state(handle).get("lost"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return handle

    def set_lost(self, handle: _SimCard, lost: bool = True) -> None:
        """Fault: from now on every NVML call on this card fails with GPU-is-lost, in every process (or recovers)."""
        state = self._read_state(handle)
        state["lost"] = lost
        self._write_state(handle, state)

    def nvmlDeviceGetName(self, handle) -> str:
        return self._card(handle).spec.model

    def nvmlDeviceGetUUID(self, handle) -> str:
        return self._card(handle).uuid

    def nvmlDeviceGetCudaComputeCapability(self, handle) -> tuple[int, int]:
        return self._card(handle).spec.cc

    def total_memory(self, handle) -> int:
        spec = handle.spec
        return (spec.memory_total_mib or int(spec.vram_gb * 1024)) * MIB

    def nvmlDeviceGetMemoryInfo(self, handle):
        card = self._card(handle)
        total = self.total_memory(card)
        processes = self.nvmlDeviceGetComputeRunningProcesses(card) + self.nvmlDeviceGetGraphicsRunningProcesses(card)
        used = min(total, sum(p.usedGpuMemory for p in processes))
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle) -> list:
        card = self._card(handle)
        processes = [
            SimpleNamespace(pid=pid, usedGpuMemory=held)
            for pid, held in self._read_state(card).get("processes", {}).items()
            if _alive(pid)
        ]
        if card.spec.foreign_memory_mib:
            processes.append(SimpleNamespace(pid=0, usedGpuMemory=card.spec.foreign_memory_mib * MIB))
        return processes

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle) -> list:
        card = self._card(handle)
        if not card.spec.graphics_memory_mib:
            return []
        return [SimpleNamespace(pid=GRAPHICS_PID, usedGpuMemory=card.spec.graphics_memory_mib * MIB)]

    def nvmlDeviceGetUtilizationRates(self, handle):
        state = self._read_state(self._card(handle))
        busy = any(_alive(pid) for pid in state.get("busy", []))
        return SimpleNamespace(gpu=100 if busy else 0, memory=50 if busy else 0)

    def nvmlDeviceGetTemperature(self, handle, sensor) -> int:
        state = self._read_state(self._card(handle))
        return 72 if any(_alive(pid) for pid in state.get("busy", [])) else 38

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        card = self._card(handle)
        busy = any(_alive(pid) for pid in self._read_state(card).get("busy", []))
        # Milliwatts, as NVML reports: a rough board power from the card's size.
        return int((60 + 12 * card.spec.vram_gb) * (1.0 if busy else 0.2) * 1000)

    def _pcie(self, handle) -> PcieSpec:
        spec = self._card(handle).spec.pcie
        if spec is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return spec

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle) -> int:
        return self._pcie(handle).gen

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle) -> int:
        return self._pcie(handle).width

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle) -> int:
        return self._pcie(handle).pcie_max_gen

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle) -> int:
        return self._pcie(handle).pcie_max_width

    def nvmlDeviceGetPcieThroughput(self, handle, counter) -> int:
        """A simulated card moves no bytes over a bus: NVML's answer for a driver without the counters."""
        self._card(handle)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def zit_card_extra(self, handle) -> dict:
        """Fields a real card does not report: that it is simulated, its relative speed, its host."""
        return {"simulated": True, "speed": handle.spec.speed, "host": handle.spec.host}

    # Driver state shared by the processes of one machine.
    def _state_file(self, card: _SimCard) -> Path:
        return self.state_dir / f"{card.uuid}.json"

    def _read_state(self, card: _SimCard) -> dict:
        try:
            raw = json.loads(self._state_file(card).read_text())
        except (OSError, ValueError):
            return {}
        raw["processes"] = {int(pid): int(held) for pid, held in raw.get("processes", {}).items()}
        return raw

    def update_state(self, card: _SimCard, pid: int, held: int | None = None, busy: bool | None = None) -> None:
        """Record what process `pid` holds on `card` (None: leave as is; 0 drops it) and whether it computes."""
        state = self._read_state(card)
        processes = {p: h for p, h in state.get("processes", {}).items() if _alive(p)}
        if held is not None:
            if held > 0:
                processes[pid] = int(held)
            else:
                processes.pop(pid, None)
        busy_pids = {p for p in state.get("busy", []) if _alive(p) and p != pid}
        if busy or (busy is None and pid in state.get("busy", [])):
            busy_pids.add(pid)
        state.update(processes=processes, busy=sorted(busy_pids))
        self._write_state(card, state)

    def _write_state(self, card: _SimCard, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {**state, "processes": {str(p): h for p, h in state.get("processes", {}).items()}}
        tmp = self._state_file(card).with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_file(card))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return pid == 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_fleet(path: str | Path) -> list[GpuSnapshot]:
    """Every card of a fleet file as NVML snapshots (what `zit fleet --fleet FILE` prints)."""
    return probe(FakeNvml(path))
