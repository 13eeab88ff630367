"""The `zit` command without a cluster: configuration, download, and error paths."""

import contextlib
import http.server
import socket
import subprocess
import sys
import threading
import time

from cli.main import main
from cluster.pipeline import DOWNLOAD_CONNECT_TIMEOUT_S
from deployments.config import load_service_config


def test_serve_config_yaml_is_a_valid_service_config(repo_root):
    config = load_service_config(repo_root / "serve_config.yaml", {})
    assert config.model == "tiny"
    assert [t.name for t in config.tiers] == ["cpu"]


def test_cli_flags_override_the_file(repo_root):
    assert load_service_config(repo_root / "serve_config.yaml", {"model": "/models/zit"}).model == "/models/zit"


def test_bad_config_is_refused_with_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nmax_n: 99\n")
    assert main(["up", "--config", str(bad)]) == 2
    assert "max_n" in capsys.readouterr().out


def test_up_with_a_missing_model_says_how_to_get_it(tmp_path, capsys):
    assert main(["up", "--model", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().out


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_offline_fails_fast_with_the_manual_command(tmp_path):
    """The real modelscope client is called up to the network: the hub endpoint points at a closed loopback port."""
    env = {"MODELSCOPE_ENDPOINT": f"http://127.0.0.1:{refused_port()}", "PATH": "/usr/bin:/bin"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "download", "--dir", str(tmp_path / "zit")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert "looks offline" in proc.stdout
    assert f"modelscope download --model Tongyi-MAI/Z-Image-Turbo --local_dir {tmp_path / 'zit'}" in proc.stdout
    assert elapsed < DOWNLOAD_CONNECT_TIMEOUT_S + 30  # the hub client's own retries take longer than this


@contextlib.contextmanager
def answering_500(hits: list[str]):
    """A loopback HTTP server that answers every request with 500 and records the target it was asked for; yields
    its URL."""

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(500)
            self.end_headers()

        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def zit_download(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "download", "--dir", str(tmp_path / "zit")],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env}, timeout=300,
    )


def test_download_reaches_the_hub_client_when_the_network_answers(tmp_path):
    """A loopback server that answers every request with 500 stands in for a broken hub: the error is ModelScope's,
    wrapped with the manual command, which proves the request went through modelscope.snapshot_download."""
    hits = []
    with answering_500(hits) as hub:
        proc = zit_download(tmp_path, MODELSCOPE_ENDPOINT=hub)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "download of Tongyi-MAI/Z-Image-Turbo failed" in proc.stdout
    assert any("Tongyi-MAI" in path for path in hits), hits


def test_download_behind_a_proxy_skips_the_direct_check_and_goes_through_the_proxy(tmp_path):
    """The hub is a closed port, unreachable directly, as from a machine whose only way out is its proxy: the direct
    pre-check would call it offline; instead the hub client's requests reach the proxy (here a loopback server that
    answers 500), asking for the hub's URL. Which variables count: test_pipeline.py."""
    hub = f"http://127.0.0.1:{refused_port()}"
    hits = []
    with answering_500(hits) as proxy:
        proc = zit_download(tmp_path, MODELSCOPE_ENDPOINT=hub, HTTP_PROXY=proxy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "looks offline" not in proc.stdout
    assert "download of Tongyi-MAI/Z-Image-Turbo failed" in proc.stdout
    assert f"modelscope download --model Tongyi-MAI/Z-Image-Turbo --local_dir {tmp_path / 'zit'}" in proc.stdout
    assert any(path.startswith(hub) and "Tongyi-MAI" in path for path in hits), hits


def test_up_on_a_host_too_small_for_any_replica_refuses_with_the_reason(tmp_path, capsys):
    """A host of 4 GiB cannot hold a replica of the real model (its process alone, plus the weights it maps): `zit
    up --fleet` says so for each card and starts nothing (Ray is never started)."""
    fleet = tmp_path / "small.yaml"
    fleet.write_text("name: small\nhost_ram_gb: {tiny-box: 4}\ncards:\n"
                     "  - {model: NVIDIA GeForce RTX 3060, vram_gb: 12, compute_capability: '8.6', host: tiny-box}\n"
                     "  - {model: NVIDIA GeForce RTX 2060, vram_gb: 6, compute_capability: '7.5', host: tiny-box}\n")
    assert main(["up", "--fleet", str(fleet)]) == 2
    out = capsys.readouterr().out
    assert out.count("host tiny-box has 4.0 GiB of RAM; with ") == 2 and "GiB of its own" in out
    assert "not joined" in out and "error: no card can serve" in out and "Starting Ray" not in out


def test_node_on_a_host_too_small_for_16_bit_copies_says_which_tiers_in_8_bits_would_fit(tmp_path, capsys):
    """`zit node` cannot change the tiers the head runs: it leaves out what its host cannot hold, and says that
    with those tiers stored in 8 bits (the service config's storage_dtype) the host would hold more cards."""
    fleet = tmp_path / "lab.yaml"
    fleet.write_text("name: lab\nhost_ram_gb: {lab: 24}\ncards:\n"
                     "  - {model: NVIDIA GeForce RTX 2060, vram_gb: 6, compute_capability: '7.5', host: lab}\n"
                     "  - {model: NVIDIA GeForce GTX 1650, vram_gb: 4, memory_total_mib: 3911, "
                     "compute_capability: '7.5', host: lab}\n")
    assert main(["node", "--address", "127.0.0.1:1", "--fleet", str(fleet)]) == 2
    out = capsys.readouterr().out
    assert out.count("host lab has 24.0 GiB of RAM; with ") == 2
    assert "note: with vram_4, vram_6 stored in 8 bits this host would hold 1 more card(s)" in out
    assert "storage_dtype: float8_e4m3fn" in out
    # Followed: with the head's config giving those tiers 8-bit storage, the host holds one card more.
    config = tmp_path / "service.yaml"
    config.write_text("tiers:\n"
                      "  - {name: vram_4, device: cuda, num_gpus: 1, resources: {vram_4: 1}, "
                      "profile: {storage_dtype: float8_e4m3fn}}\n"
                      "  - {name: vram_6, device: cuda, num_gpus: 1, resources: {vram_6: 1}, "
                      "profile: {storage_dtype: float8_e4m3fn}}\n")
    from cli.fleet import _within_host_ram
    from cluster.nvml import load_fleet
    from deployments.config import load_service_config
    from runtime.nodes import nodes_for_cards

    nodes, _ = nodes_for_cards(load_fleet(fleet), fleet)
    kept, refused = _within_host_ram(nodes, fleet, load_service_config(config, {}).tiers)
    assert len(kept) == 1 and len(refused) == 1 and "note: " not in capsys.readouterr().out
