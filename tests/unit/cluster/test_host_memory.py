"""The host-memory model (cluster/host_memory.py) against hand-computed cases, and placement by host RAM."""

import pytest

from cluster.host_memory import CACHE_WRITE_BYTES, HostNeed, encoder_host, plan_hosts, ray_node_bytes, replica_host
from cluster.memory import GIB, load_calibration
from cluster.nvml import load_fleet, load_fleet_file
from cluster.profiles import default_profile
from cluster.stages import stage_profile

CAL = load_calibration()
RUNTIME = CAL.host_runtime_bytes + CAL.host_cuda_bytes  # 0.5 + 1.0 GiB


def staged(tier, bf16):
    return default_profile(tier, bf16).model_copy(update={"text_encoder": "stage"})


def test_a_resident_replica_keeps_only_its_runtime_on_the_host():
    estimate = replica_host(staged("vram_24", True), CAL)
    assert estimate.runtime == RUNTIME == 1.5 * GIB
    assert estimate.private == 0 and estimate.shared == {}
    assert estimate.load_transient == CACHE_WRITE_BYTES == 1.5 * GIB  # writing a missing stored copy: a shard and a cast


def test_block_offload_maps_the_stored_copy_and_pins_only_the_groups_in_flight():
    """vram_8: fp8 storage, bf16 compute, block-level group offload with streams. Shared: the fp8 leaves
    (6,154,908,736 - 10,900,992 skipped params, 1 byte each, cast through bf16) and the skipped params in bf16.
    Private: two blocks of 180,910,336 params x 1 byte and the skipped group x 2 bytes in pinned staging, x1.508."""
    estimate = replica_host(staged("vram_8", True), CAL)
    assert estimate.shared == {"transformer-leaves-float8_e4m3fn-via-bfloat16": 6_154_908_736 - 10_900_992,
                               "transformer-rest-bfloat16": 10_900_992 * 2}
    assert estimate.private == int((2 * 180_910_336 * 1 + 10_900_992 * 2) * 1.508)
    assert estimate.steady == RUNTIME + estimate.private + 6_154_908_736 + 10_900_992


def test_a_card_without_bf16_maps_bf16_weights_and_makes_no_float32_copy():
    """vram_6-fp32 computes in float32 from bf16 storage: the shared set is the bf16 transformer (12.3 GB), never
    the 24.6 GB float32 one, and the load adds only the cache writer's shard."""
    estimate = replica_host(staged("vram_6", False), CAL)
    assert estimate.shared == {"transformer-leaves-bfloat16": (6_154_908_736 - 10_900_992) * 2,
                               "transformer-rest-float32": 10_900_992 * 4}
    assert estimate.load_transient == CACHE_WRITE_BYTES
    assert estimate.load_peak < 20 * GIB  # the old load path: about 40 GB (float32 copies of the encoder too)


def test_an_encoder_in_the_generator_is_a_shared_set_with_its_embedding_in_the_compute_dtype():
    """vram_12 without the stage: the encoder is group-offloaded from the host: its layers in bf16 (one set for
    both cards) and what casting skips (the token embedding and norms, 389,152,256 params) in the compute dtype,
    float32 on a card without bf16."""
    p, e = 4_022_468_096, 389_152_256
    bf16 = replica_host(default_profile("vram_12", True), CAL)
    fp32 = replica_host(default_profile("vram_12", False), CAL)
    assert bf16.shared["text_encoder-leaves-bfloat16"] == fp32.shared["text_encoder-leaves-bfloat16"] == (p - e) * 2
    assert (bf16.shared["text_encoder-rest-bfloat16"], fp32.shared["text_encoder-rest-float32"]) == (e * 2, e * 4)
    staging = (2 * 100_930_816 * 2 + e * 2) * 1.41  # two layers and the embedding group, pinned as they are sent
    assert bf16.private == int(staging)


def test_the_stage_keeps_the_encoder_and_no_transformer():
    estimate = encoder_host(stage_profile(True, "offload"), CAL)
    assert set(estimate.shared) == {"text_encoder-leaves-bfloat16", "text_encoder-rest-bfloat16"}
    assert encoder_host(stage_profile(True, "gpu"), CAL).shared == {}


def test_a_host_counts_each_shared_set_once_and_one_load_transient():
    """Four GTX 1650s (vram_4-fp32, leaf offload from bf16 storage) on one host: one bf16 transformer for all four,
    not four."""
    one = replica_host(staged("vram_4", False), CAL)
    need = HostNeed("lab-01", 32 * GIB, calibration=CAL)
    for i in range(4):
        need = need.with_replica(f"vram_4 #{i}", one)
    shared = (6_154_908_736 - 10_900_992) * 2 + 10_900_992 * 4
    assert need.shared == {"transformer-leaves-bfloat16": (6_154_908_736 - 10_900_992) * 2,
                           "transformer-rest-float32": 10_900_992 * 4}
    assert need.steady == 4 * (one.runtime + one.private) + shared + 4 * ray_node_bytes(CAL)
    assert need.need == need.steady + CACHE_WRITE_BYTES
    assert need.need < 4 * one.steady / 2


def test_one_box_host_holds_what_its_ram_allows_and_says_why_the_rest_is_left_out(repo_root):
    """one-box.yaml: five cards in one 32 GiB host. The fastest cards are kept; each left out one says how much the
    host would need with it."""
    path = repo_root / "cluster/fleets/one-box.yaml"
    cards = load_fleet(path)
    profiles = {c.tier: staged(c.tier, c.bf16) for c in cards}
    stage_card = next(c.uuid for c in cards if c.tier == "vram_24")
    needs, refused = plan_hosts(cards, profiles, (stage_card,), stage_profile(True, "offload"),
                                load_fleet_file(path).host_ram_bytes(), "box", CAL)
    box = needs["box"]
    assert box.ram_bytes == 32 * GIB and box.need <= box.ram_bytes and box.head
    kept = {what.split(" on ")[-1] for what, _ in box.replicas}
    assert "NVIDIA GeForce RTX 4090" in kept and "NVIDIA GeForce RTX 3070" in kept
    assert refused and all("host box has 32.0 GiB of RAM" in why and "would need" in why for why in refused.values())
    left = {c.name for c in cards if c.uuid in refused}
    assert all(c.speed <= min(k.speed for k in cards if k.name in kept) for c in cards if c.name in left)


def test_without_ram_given_nothing_is_refused(repo_root):
    cards = load_fleet(repo_root / "cluster/fleets/one-box.yaml")
    needs, refused = plan_hosts(cards, {c.tier: staged(c.tier, c.bf16) for c in cards}, calibration=CAL)
    assert refused == {} and needs["box"].ram_bytes is None and needs["box"].to_dict()["fits"]


def test_a_fleet_file_cannot_give_ram_to_a_host_without_cards(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("name: f\nhost_ram_gb: {nowhere: 16}\ncards:\n"
                    "  - {model: NVIDIA GeForce RTX 3060, vram_gb: 12, compute_capability: '8.6', host: a}\n")
    with pytest.raises(ValueError, match="host_ram_gb names nowhere, which no card sits in"):
        load_fleet_file(path)


def test_a_bf16_card_and_a_float32_card_offloading_from_one_host_share_the_leaves():
    """vram_6 (bf16) and vram_6-fp32 beside each other: one bf16 leaves set, two small rest sets."""
    need = HostNeed("h", None, calibration=CAL)
    need = need.with_replica("a", replica_host(staged("vram_6", True), CAL))
    need = need.with_replica("b", replica_host(staged("vram_6", False), CAL))
    assert set(need.shared) == {"transformer-leaves-bfloat16", "transformer-rest-bfloat16", "transformer-rest-float32"}


def test_a_stage_on_the_heads_cpu_counts_on_the_head_host(repo_root):
    """`text_encoder: cpu` runs the stage on the head's CPU: its runtime and the encoder it maps count on the head's
    host (mixed.yaml: host-a, its first card's), with no Ray node of its own."""
    from runtime.nodes import host_ram_of, plan_card_nodes

    path = repo_root / "cluster/fleets/mixed.yaml"
    cards = load_fleet(path)
    ram, head = host_ram_of(cards, path)
    plan = plan_card_nodes(cards, path, stage="cpu", host_ram=ram, head_host=head)
    host_a = plan.hosts["host-a"]
    stage = [e for what, e in host_a.replicas if what.startswith("text-encoder stage on the CPU")]
    assert head == "host-a" and len(stage) == 1 and host_a.ray_nodes == 2
    assert set(stage[0].shared) == {"text_encoder-leaves-bfloat16", "text_encoder-rest-bfloat16"}


def test_an_encoder_computing_on_the_cpu_from_smaller_storage_holds_private_copies():
    """Layerwise casting on the CPU swaps each leaf for an upcast copy and back: the encoder is private, not
    mapped (a float32 card whose encoder runs on the CPU)."""
    profile = default_profile("vram_24", False).model_copy(update={"text_encoder": "cpu"})
    estimate = replica_host(profile, CAL)
    assert not any(name.startswith("text_encoder") for name in estimate.shared)
    assert estimate.private >= (4_022_468_096 - 389_152_256) * 2


def test_one_box_serves_all_five_cards_with_one_8_bit_transformer_on_the_host(repo_root):
    """Planned as `zit up` plans: with 16-bit copies the GTX 1650 and RTX 2060 would not fit the 32 GiB box, so
    their tiers store the transformer in 8 bits, the very copy the RTX 3070 maps; all five join, the host holds one
    transformer, and the plan says what it changed and why."""
    from runtime.nodes import host_ram_of, plan_card_nodes

    path = repo_root / "cluster/fleets/one-box.yaml"
    cards = load_fleet(path)
    ram, head = host_ram_of(cards, path)
    plan = plan_card_nodes(cards, path, host_ram=ram, head_host=head)
    box = plan.hosts["box"]
    assert len(plan.nodes) == 5 and not plan.skipped and not box.left_out
    assert box.need <= 32 * GIB
    assert [n for n in box.shared if n.startswith("transformer-leaves")] == [
        "transformer-leaves-float8_e4m3fn-via-bfloat16"]
    storage = {t.name: (t.profile or {}).get("storage_dtype") for t in plan.tiers}
    assert storage["vram_4"] == storage["vram_6"] == "float8_e4m3fn" and storage["vram_24"] is None
    assert sorted(line.split(":")[0] for line in box.changed) == ["vram_4", "vram_6"]
    assert all("would need" in line for line in box.changed)
    assert box.to_dict()["changed"] == box.changed


def test_a_configured_storage_is_kept_and_the_card_is_left_out_instead(repo_root):
    """A service config that sets a tier's storage_dtype is obeyed: no 8-bit fallback for it, its card is left out
    with the reason."""
    from cluster.tiers import TierConfig
    from runtime.nodes import host_ram_of, plan_card_nodes

    path = repo_root / "cluster/fleets/one-box.yaml"
    cards = load_fleet(path)
    ram, head = host_ram_of(cards, path)
    configured = [TierConfig(name="vram_4", device="cuda", num_gpus=1, resources={"vram_4": 1},
                             profile={"storage_dtype": "bfloat16"})]
    plan = plan_card_nodes(cards, path, configured, host_ram=ram, head_host=head)
    box = plan.hosts["box"]
    assert [line.split(":")[0] for line in box.changed] == ["vram_6"]
    assert len(plan.nodes) == 4 and any("GTX 1650" in card for card, _ in box.left_out)


def test_a_host_with_room_keeps_16_bit_storage(repo_root):
    """mixed.yaml's hosts hold their cards in 16 bits: nothing is changed."""
    from runtime.nodes import host_ram_of, plan_card_nodes

    path = repo_root / "cluster/fleets/mixed.yaml"
    cards = load_fleet(path)
    ram, head = host_ram_of(cards, path)
    plan = plan_card_nodes(cards, path, host_ram=ram, head_host=head)
    assert not any(need.changed for need in plan.hosts.values())
    assert all("storage_dtype" not in (t.profile or {}) for t in plan.tiers)


def test_a_switch_to_8_bits_that_lets_no_card_join_is_not_kept(tmp_path):
    """Host b (18 GiB) holds its RTX 4090 and the stage but not its RTX 2060, in 16 bits or in 8: the 2060 is left
    out, and vram_6 keeps its 16-bit storage for the 2060 on roomy host a (a tier is one deployment: a switch that
    lets no card join would only cost a's images their precision)."""
    from runtime.nodes import host_ram_of, plan_card_nodes

    path = tmp_path / "two.yaml"
    path.write_text("name: two\nhost_ram_gb: {a: 64, b: 18}\ncards:\n"
                    "  - {model: NVIDIA GeForce RTX 2060, vram_gb: 6, compute_capability: '7.5', host: a}\n"
                    "  - {model: NVIDIA GeForce RTX 4090, vram_gb: 24, memory_total_mib: 24564, "
                    "compute_capability: '8.9', speed: 1.0, host: b}\n"
                    "  - {model: NVIDIA GeForce RTX 2060, vram_gb: 6, compute_capability: '7.5', host: b}\n")
    cards = load_fleet(path)
    ram, head = host_ram_of(cards, path)
    plan = plan_card_nodes(cards, path, host_ram=ram, head_host=head)
    assert len(plan.nodes) == 2 and len(plan.skipped) == 1 and "host b has 18.0 GiB" in plan.skipped[0]
    assert not plan.hosts["a"].changed and not plan.hosts["b"].changed
    assert all("storage_dtype" not in (t.profile or {}) for t in plan.tiers)
