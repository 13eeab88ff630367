"""Host memory of full-size replicas on this machine's CPU, through the real load path, beside the host-memory model.

A folder of the real layout with random weights (transformer float32 as shipped, about 24.6 GB; text encoder bf16,
8 GB; VAE) is written once, module by module from shapes built on the meta device. Each replica is its own process
doing what a Generator does: `load_pipeline(folder, profile=...)` (views of the host's stored copy,
cluster/weights.py) and `apply_profile(pipe, profile, "cpu")`, then it reads every weight once (what its first job
does to the pages) and reports /proc: RssAnon (private), Pss (shared pages split between the processes that map
them), VmHWM. The parent samples each replica's RssAnon every 20 ms while it loads (its private load peak).

Measured, per shipped profile (beside the text-encoder stage, as `zit up` runs them) and for the stage: one replica
alone, first with its stored copy missing (it writes it: once per host) and then with it there; then N replicas
of one profile at once: their total PSS against one replica's. Printed as Markdown; with --write appended to
docs/benchmarks.md. The model's figures are `cluster.host_memory.replica_host(profile, cuda=False)`: on the CPU
every component computes from its views, so a replica's own bytes are its runtime.

  .venv/bin/python -m bench.host_memory [--folder DIR] [--replicas 4] [--profiles vram_6-fp32,vram_8] [--write]
  .venv/bin/python -m bench.host_memory --one-box [--write]   # one-box.yaml's host-side replicas as planned, at once

Needs about 33 GB of disk for the folder and up to 26 GB for the stored copies (ZIT_WEIGHTS_DIR), and a few
minutes per profile on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
SHARD_BYTES = 5 * GIB  # the download's own shard size (diffusers' default max_shard_size)

REPLICA = r"""
import json, os, sys, time
from pathlib import Path
import torch
import ray, ray.serve  # what a Serve replica process has imported besides the pipeline
import deployments.generator
from cluster.pipeline import load_pipeline
from cluster.profiles import Profile, apply_profile, apply_text_encoder_profile
spec = json.loads(sys.argv[1])
profile = Profile.model_validate(spec["profile"])
folder = Path(spec["folder"])
if spec["stage"]:
    from cluster.pipeline import load_text_encoder
    pipe = load_text_encoder(folder, profile=profile)
    apply_text_encoder_profile(pipe, profile, "cpu")
    modules = [pipe.text_encoder]
else:
    pipe = load_pipeline(folder, profile=profile, text_encoder=profile.text_encoder != "stage")
    apply_profile(pipe, profile, "cpu")
    modules = [m for m in (pipe.transformer, pipe.text_encoder, pipe.vae) if m is not None]
print("loaded", flush=True)
def touch():  # what a job does to the pages: every weight read once
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.detach().view(-1)[:: max(1, 4096 // p.element_size())].float().sum()
touch()
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
            out[key] = int(rest.split()[0]) * 1024
    for line in open("/proc/self/smaps_rollup"):
        key, _, rest = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File"):
            out[key] = int(rest.split()[0]) * 1024
    # The weights' pages: the mappings of safetensors files (the stored copy, or the model's own files).
    out["WeightsRss"] = out["WeightsPss"] = 0
    path = None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if not head[0].endswith(":"):
            path = head[5] if len(head) >= 6 else None
        elif path and path.endswith(".safetensors") and head[0] in ("Rss:", "Pss:"):
            out["WeightsRss" if head[0] == "Rss:" else "WeightsPss"] += int(head[1]) * 1024
    return out
print(json.dumps(status()), flush=True)
sys.stdin.readline()
touch()  # with the others up: the pages it reads at every step (the kernel may have dropped some meanwhile)
print(json.dumps(status()), flush=True)
sys.stdin.readline()
"""


def write_folder(folder: Path) -> None:
    """A diffusers-format Z-Image-Turbo folder of the real layout with random weights, written module by module
    (at most one 5 GB shard in memory). The tokenizer and scheduler are the tiny model's (nothing here encodes)."""
    import shutil

    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3Model

    from cluster.pipeline import resolve_model

    if (folder / "model_index.json").is_file():
        return
    tiny = resolve_model("tiny")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with init_empty_weights():
        modules = {
            "transformer": (ZImageTransformer2DModel(), torch.float32, "diffusion_pytorch_model"),
            "text_encoder": (Qwen3Model(Qwen3Config(
                hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                tie_word_embeddings=True, rope_theta=1000000.0)), torch.bfloat16, "model"),
            "vae": (AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159), torch.float32, "diffusion_pytorch_model"),
        }
    generator = torch.Generator().manual_seed(0)
    for name, (module, dtype, stem) in modules.items():
        out = staging / name
        out.mkdir()
        module.save_config(out) if hasattr(module, "save_config") else module.config.save_pretrained(out)
        params = list(module.named_parameters())
        written, shard, held = 0, {}, 0
        for pname, p in params:
            shard[pname] = (torch.randn(p.shape, generator=generator) * 0.02).to(dtype)
            held += shard[pname].numel() * shard[pname].element_size()
            if held >= SHARD_BYTES:  # one shard in memory at a time
                written += 1
                path = out / f"{stem}-{written:05d}.safetensors"
                save_file(shard, str(path))
                print(f"  wrote {path.relative_to(staging)} ({held / GIB:.1f} GiB)", flush=True)
                shard, held = {}, 0
        if shard:
            written += 1
            save_file(shard, str(out / f"{stem}-{written:05d}.safetensors"))
        shard = None
        print(f"  wrote {name} ({sum(p.numel() for _, p in params) / 1e9:.2f} B params in {dtype})", flush=True)
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(tiny / part, staging / part)
    shutil.copy2(tiny / "model_index.json", staging / "model_index.json")
    staging.rename(folder)


class Replica:
    """One replica process: its private load peak sampled while it loads, then its /proc figures."""

    def __init__(self, folder: Path, profile, stage: bool):
        spec = {"folder": str(folder), "profile": profile.model_dump(), "stage": stage}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-c", REPLICA, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.anon_peak = 0
        self.loaded = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self.loaded.is_set() and self.proc.poll() is None:
            try:
                for line in open(f"/proc/{self.proc.pid}/status"):
                    if line.startswith("RssAnon:"):
                        self.anon_peak = max(self.anon_peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.02)

    def wait_loaded(self) -> dict:
        line = self.proc.stdout.readline().strip()
        if line != "loaded":
            raise RuntimeError(f"replica died while loading (exit {self.proc.wait()})")
        self.load_s = time.perf_counter() - self.started
        self.loaded.set()
        return json.loads(self.proc.stdout.readline())

    def read(self) -> dict:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def at_once(folder: Path, specs: list[tuple]) -> list[dict]:
    """Replicas of `specs` ((profile, is the stage)) started and held together: each one's /proc figures with all
    of them loaded (a stored part one of them lacks is written once, the others wait for it)."""
    procs = [Replica(folder, profile, stage) for profile, stage in specs]
    try:
        for proc in procs:
            proc.wait_loaded()
        return [proc.read() for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


def measure(folder: Path, replicas: int, only: list[str] | None) -> dict:
    from cluster.host_memory import encoder_host, replica_host
    from cluster.profiles import default_profile
    from cluster.stages import stage_profile

    cases = []
    for tier in ("vram_4", "vram_6", "vram_8", "vram_12", "vram_24"):
        for bf16 in (True, False):
            p = default_profile(tier, bf16).model_copy(update={"text_encoder": "stage"})
            cases.append((p.name, p, False, replica_host(p, cuda=False)))
    for bf16 in (True, False):
        sp = stage_profile(bf16, "offload")
        cases.append((f"{sp.name} (stage)", sp, True, encoder_host(sp, cuda=False)))
    if only:
        cases = [c for c in cases if c[0].split(" ")[0] in only]
    rows = []
    for name, profile, stage, model in cases:
        figures = {}
        for cold in (True, False):  # cold: its stored copy may be missing (the first replica of the host writes it)
            print(f"{name}: {'first load (writes missing stored parts)' if cold else 'load with the stored copy'}",
                  flush=True)
            replica = Replica(folder, profile, stage)
            try:
                steady = replica.wait_loaded()
                figures["cold" if cold else "warm"] = {"anon_peak": replica.anon_peak, "load_s": replica.load_s,
                                                       **steady}
            finally:
                replica.stop()
        rows.append({"name": name, "technique": profile.technique(), "model": {
            "own": model.runtime + model.private, "shared": sum(model.shared.values()),
            "load_peak_private": model.runtime + model.private + model.load_transient}, **figures})
    sharing = None
    shared_case = next((c for c in cases if not c[2] and replica_host(c[1], cuda=False).shared), None)
    if shared_case and replicas > 1:
        name, profile, _, model = shared_case
        print(f"{replicas} replicas of {name} at once", flush=True)
        together = at_once(folder, [(profile, False)] * replicas)
        one = next(r for r in rows if r["name"] == name)["warm"]
        sharing = {"name": name, "replicas": replicas, "pss": [t["Pss"] for t in together],
                   "anon": [t["RssAnon"] for t in together], "one_pss": one["Pss"],
                   "weights_rss": [t["WeightsRss"] for t in together], "weights_pss": [t["WeightsPss"] for t in together],
                   "one_weights_rss": one["WeightsRss"],
                   "model_host": replicas * model.runtime + sum(model.shared.values())}
    return {"rows": rows, "sharing": sharing}


def measure_one_box(folder: Path) -> dict:
    """The replicas of cluster/fleets/one-box.yaml that hold weights on its host, as `zit up` plans them (the
    offloading tiers' transformer in 8 bits for the host's RAM, runtime.nodes.plan_card_nodes), loaded at once:
    every process maps the one 8-bit transformer and the one encoder, whatever its compute dtype. The resident
    tiers (RTX 3060, RTX 4090) keep nothing on a real host once their weights are on the card, so they are left
    out here (on the CPU they would map their own copies)."""
    from cluster.host_memory import encoder_host, replica_host
    from cluster.nvml import load_fleet
    from cluster.profiles import tier_profile
    from runtime.nodes import host_ram_of, plan_card_nodes

    path = REPO / "cluster" / "fleets" / "one-box.yaml"
    cards = load_fleet(path)
    ram, head = host_ram_of(cards, path)
    plan = plan_card_nodes(cards, path, host_ram=ram, head_host=head)
    profiles = {t.name: tier_profile(t).model_copy(update={"text_encoder": "stage"}) for t in plan.tiers}
    cases = [("text-encoder stage", plan.placement.profile, True, encoder_host(plan.placement.profile))]
    for tier in ("vram_8", "vram_6", "vram_4"):
        cases.append((f"{tier} ({profiles[tier].technique()})", profiles[tier], False, replica_host(profiles[tier])))
    print(f"one-box: {', '.join(c[0] for c in cases)} at once", flush=True)
    together = at_once(folder, [(profile, stage) for _, profile, stage, _ in cases])
    shared: dict[str, int] = {}
    for *_, estimate in cases:
        shared.update(estimate.shared)
    from cluster.memory import load_calibration

    runtime = load_calibration().host_runtime_bytes
    return {"replicas": [c[0] for c in cases], "pss": [t["Pss"] for t in together],
            "weights_pss": [t["WeightsPss"] for t in together], "weights_rss": [t["WeightsRss"] for t in together],
            "anon": [t["RssAnon"] for t in together], "shared": shared,
            "model_cpu": len(cases) * runtime + sum(shared.values()),
            "plan_need": plan.hosts["box"].need, "changed": plan.hosts["box"].changed}


def report_one_box(s: dict) -> str:
    from bench.common import commit, machine

    g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    sets = ", ".join(f"`{k}` {g(v)}" for k, v in s["shared"].items())
    return "\n".join([
        f"Commit {commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}. "
        f"one-box.yaml as planned ({'; '.join(c.split(';')[0] for c in s['changed'])}): "
        f"{', '.join(s['replicas'])}, loaded at once.",
        "",
        "| replica | PSS GiB | weights mapped (RSS) GiB | weights PSS GiB | private GiB |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {name} | {g(p)} | {g(r)} | {g(w)} | {g(a)} |" for name, p, r, w, a in
          zip(s["replicas"], s["pss"], s["weights_rss"], s["weights_pss"], s["anon"])],
        "",
        f"Total PSS {g(sum(s['pss']))} GiB; the weights' PSS summed {g(sum(s['weights_pss']))} GiB against the "
        f"sets they map on a card's host, each once: {sets} ({g(sum(s['shared'].values()))} GiB; on this CPU the "
        f"VAE's own file is mapped too, on a card it is on the card): one copy of each for all four processes, "
        f"float32 and bf16 cards alike. The model on this CPU (a 0.5 GiB runtime per process + each "
        f"shared set once) says {g(s['model_cpu'])} GiB ({sum(s['pss']) / s['model_cpu'] - 1:+.0%}). On the "
        f"cards' host the plan adds the CUDA runtime's host side and the pinned staging (estimated, no GPU here), "
        f"the resident tiers' processes, the Ray nodes and the head: {g(s['plan_need'])} GiB of the box's 32.",
    ])


def report(result: dict, folder: Path) -> str:
    from bench.common import commit, machine

    g = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    lines = [
        f"Commit {commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}. Full-size random "
        f"weights in the real layout ({folder.name}: transformer float32 as shipped, text encoder bf16), on the CPU, "
        "each replica its own process through `load_pipeline(profile=...)` + `apply_profile(..., 'cpu')`, every "
        "weight read once after loading. The model: `replica_host(profile, cuda=False)` (on the CPU a replica's "
        "own bytes are its runtime; everything else is mapped).",
        "",
        "| profile | technique | first load: private peak GiB (writes its stored parts) | load: private peak GiB "
        "| steady private GiB | load peak / steady private | own GiB: RSS less weights (model) | weights mapped "
        "GiB (model) | PSS alone GiB (model) | load s (first, then) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    worst = []
    for r in result["rows"]:
        cold, warm, m = r["cold"], r["warm"], r["model"]
        ratio = warm["anon_peak"] / max(1, warm["RssAnon"])
        own = warm["VmRSS"] - warm["WeightsRss"]
        predicted_pss = m["own"] + m["shared"]
        worst.append((r["name"], own / m["own"], warm["WeightsRss"] / max(1, m["shared"]), warm["Pss"] / predicted_pss))
        lines.append(
            f"| {r['name']} | {r['technique']} | {g(cold['anon_peak'])} | {g(warm['anon_peak'])} | "
            f"{g(warm['RssAnon'])} | {ratio:.2f} | {g(own)} ({g(m['own'])}) | {g(warm['WeightsRss'])} "
            f"({g(m['shared'])}) | {g(warm['Pss'])} ({g(predicted_pss)}) | {cold['load_s']:.0f}, {warm['load_s']:.0f} |")
    s = result["sharing"]
    if s:
        total = sum(s["pss"])
        lines += ["", f"{s['replicas']} replicas of {s['name']} at once: total PSS {g(total)} GiB, one replica alone "
                  f"{g(s['one_pss'])} GiB: {total / s['one_pss']:.2f}x (target at most 1.3x); the model's host "
                  f"figure for them (runtimes + each shared set once) {g(s['model_host'])} GiB "
                  f"({total / s['model_host'] - 1:+.0%}); private per replica "
                  f"{', '.join(g(a) for a in s['anon'])} GiB; weights resident in each replica's mappings "
                  f"{', '.join(g(w) for w in s['weights_rss'])} GiB (alone: {g(s['one_weights_rss'])}), their PSS "
                  f"summed {g(sum(s['weights_pss']))} GiB: one copy in the page cache for all of them."]
    warm = max(r["warm"]["anon_peak"] / r["warm"]["RssAnon"] for r in result["rows"])
    cold = max(result["rows"], key=lambda r: r["cold"]["anon_peak"] / r["cold"]["RssAnon"])
    lines += ["", f"Private memory while loading against steady private: at most {warm:.2f}x once the host has its "
                  f"stored copy (target at most 1.3x); the load that writes it (once per host and stored part) peaks "
                  f"at {g(cold['cold']['anon_peak'])} GiB ({cold['name']}: "
                  f"{cold['cold']['anon_peak'] / cold['cold']['RssAnon']:.1f}x, one 1 GiB shard and the tensor being "
                  "cast)."]
    lines += ["", "Measured against the model (own bytes, weights mapped, PSS alone): " + "; ".join(
        f"{name} {a - 1:+.0%}, {b - 1:+.0%}, {c - 1:+.0%}" for name, a, b, c in worst) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="the random full-size folder (default: in the model cache)")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--profiles", help="comma-separated profile names (default: every shipped one)")
    parser.add_argument("--write", action="store_true", help="append the report to docs/benchmarks.md")
    parser.add_argument("--one-box", action="store_true",
                        help="only one-box.yaml's host-side replicas as planned, at once (8-bit fallback)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from bench.common import publish
    from cluster.pipeline import models_dir

    folder = args.folder or models_dir() / "z-image-turbo-random-full"
    print(f"folder: {folder}", flush=True)
    write_folder(folder)
    if args.one_box:
        result = measure_one_box(folder)
        (Path(os.environ.get("TMPDIR", "/tmp")) / "host_memory_one_box.json").write_text(json.dumps(result, indent=1))
        publish(report_one_box(result), args.write, "Host memory of full-size replicas (`bench/host_memory.py`)",
                "One host's replicas as `zit up` plans cluster/fleets/one-box.yaml, at once, full-size random "
                "weights on this CPU (`--one-box`).")
        return
    result = measure(folder, args.replicas, args.profiles.split(",") if args.profiles else None)
    (Path(os.environ.get("TMPDIR", "/tmp")) / "host_memory.json").write_text(json.dumps(result, indent=1))
    publish(report(result, folder), args.write, "Host memory of full-size replicas (`bench/host_memory.py`)",
            "Host RAM of replicas of the full-size architecture (random weights) on this machine's CPU, through the "
            "real load path, beside the host-memory model (cluster/host_memory.py).")


if __name__ == "__main__":
    main()
