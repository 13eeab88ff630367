"""`zit fleet` (the cards NVML or a fleet file has, and their tiers) and `zit node` (join this host's cards to a
cluster, one Ray node per card)."""

from __future__ import annotations

import argparse

from cli.common import no_card_why, say, socket_host


def _fleet_cards(args: argparse.Namespace, no_driver) -> tuple[list, int]:
    """(the cards of --fleet FILE, else the real ones, with the --split specs applied; 0), or ([], exit code) after
    saying what is wrong: `no_driver(exc)` says it when there is no NVIDIA driver (1); a bad fleet file or split is
    2."""
    from pydantic import ValidationError

    from cluster.nvml import NvmlUnavailable, load_fleet, probe
    from runtime.nodes import apply_splits

    try:
        return apply_splits(load_fleet(args.fleet) if args.fleet else probe(), args.split), 0
    except NvmlUnavailable as exc:
        say(no_driver(exc))
        return [], 1
    except (OSError, ValidationError) as exc:
        say(f"error: bad fleet file: {exc}")
        return [], 2
    except ValueError as exc:
        say(f"error: {exc}")
        return [], 2


def cmd_fleet(args: argparse.Namespace) -> int:
    import json

    from cluster.nvml import DEFAULT_FLEET

    cards, code = _fleet_cards(args, lambda exc: f"error: {str(exc).split(':')[0]}: no NVIDIA driver here. To see a "
                                                 f"simulated fleet: zit fleet --fleet {DEFAULT_FLEET}")
    if code:
        return code
    ram = _host_ram(cards, args.fleet)
    steps, changed = _step_times(cards)
    if args.json:
        print(json.dumps([{**c.to_dict(), "host_ram_gib": ram.get(c.host or "localhost"), **steps.get(c.uuid, {})}
                          for c in cards], indent=2))
        return 0
    header = (f"{'#':>3}  {'card':<34} {'tier':<10} {'total':>7} {'free':>7}  {'cc':<4} {'bf16':<4} {'util':>5}  "
              f"{'link':<18} {'step':>6}  host")
    say(header)
    for c in cards:
        if c.error:  # a lost card: what NVML said instead of its readings
            say(f"{c.index:>3}  {c.name[:34]:<34} {'FAILED':<10} {c.error}  {c.host or socket_host()}"
                 + ("  (simulated)" if c.simulated else ""))
            continue
        util = "-" if c.utilization_pct is None else f"{c.utilization_pct:.0f}%"
        tier = f"{c.tier} x{c.slots}" if c.slots > 1 else (c.tier or "too small")
        link = _link_cell(c)
        step = f"{steps[c.uuid]['predicted_step_s']:5.2f}s" if c.uuid in steps else "-"
        say(f"{c.index:>3}  {c.name[:34]:<34} {tier:<10} {c.memory_total / 2**30:6.1f}G "
             f"{c.memory_free / 2**30:6.1f}G  {c.compute_capability[0]}.{c.compute_capability[1]:<2} "
             f"{'yes' if c.bf16 else 'no':<4} {util:>5}  {link:<18} {step:>6}  {c.host or socket_host()}"
             + ("  (simulated)" if c.simulated else ""))
    from cluster.link import degraded
    from cluster.tiers import tier_gib

    say("link: NVML's PCIe link and the copy rate it gives ('?': not reported, the default rate); step: one 1024x1024 "
        "denoising step of the card's tier profile at its speed and link (cluster/speed.py)")
    for line in changed:
        say(f"changed: {line}")
    for c in cards:
        if not c.error and degraded(c):
            say(f"warning: {c.name} [{c.index}] on {c.host or socket_host()}: PCIe {degraded(c)}; reseat it or "
                "check its riser")
    tiers: dict[str, int] = {}
    for c in cards:
        kind = "failed" if c.error else c.tier or "too small"
        tiers[kind] = tiers.get(kind, 0) + c.slots
    # Smallest tier first; cards that serve no tier last.
    order = sorted(tiers, key=lambda t: (0, tier_gib(t)) if t.startswith("vram_") else (1, t))
    if args.fleet:
        given = ", ".join(f"{host} {gib:g} GiB" for host, gib in ram.items() if gib is not None)
        say(f"host RAM (fleet file): {given or 'not given (host_ram_gb)'}")
    else:
        from runtime.nodes import cgroup_memory_limit, local_host_ram

        here = local_host_ram()
        limit = " (the cgroup's limit)" if cgroup_memory_limit() == here["total"] else ""
        say(f"host RAM ({socket_host()}): {here['total'] / 2**30:.1f} GiB{limit}, {here['available'] / 2**30:.1f} "
             "GiB available")
    say(f"{len(cards)} card(s): " + ", ".join(f"{tiers[t]} x {t}" for t in order)
         + (" (split cards count once per slot)" if any(c.slots > 1 for c in cards) else ""))
    return 0


def _link_cell(card) -> str:
    """'gen3 x1 0.79G/s' (NVML's link, the copy rate it gives), '12.0G/s?' when NVML reports no link."""
    from cluster.link import link_of

    link = link_of(card)
    if link.source == "default":
        return f"? {link.bytes_s / 1e9:.1f}G/s"
    return f"{link.detail} {link.bytes_s / 1e9:.2f}G/s"


def _step_times(cards: list) -> tuple[dict[str, dict], list[str]]:
    """({card uuid: its tier's profile, the link it streams at and the time model's 1024x1024 step there}, a line
    for each tier whose profile its links changed), as `zit up` would plan the tiers (runtime.nodes
    for_links)."""
    from cluster.link import link_of
    from cluster.profiles import tier_profile
    from cluster.speed import reference_step_s
    from cluster.tiers import tiers_for_cards
    from runtime.nodes import for_links

    usable = [c for c in cards if not c.error and c.tier is not None]
    tiers, switched = for_links(tiers_for_cards(usable))
    profiles = {t.name: tier_profile(t) for t in tiers}
    steps = {}
    for c in usable:
        profile = profiles[c.tier]
        steps[c.uuid] = {"profile": profile.technique(), "link": link_of(c).as_dict(),
                         "predicted_step_s": round(reference_step_s(profile, c.speed, link_of(c)), 3),
                         "changed": switched.get(c.tier)}
    return steps, list(switched.values())


def _host_ram(cards: list, fleet_file) -> dict[str, float | None]:
    """Each host's RAM in GiB: a fleet file's `host_ram_gb` (None for a host it does not give), else this host's
    total (the cgroup's limit inside a container)."""
    if fleet_file:
        from cluster.nvml import load_fleet_file

        given = load_fleet_file(fleet_file).host_ram_gb
        return {c.host: given.get(c.host) for c in cards if c.host}
    from runtime.nodes import local_host_ram

    return {"localhost": round(local_host_ram()["total"] / 2**30, 2)}


def cmd_node(args: argparse.Namespace) -> int:
    """Join this host's cards (or one simulated host's cards) to a running cluster, one Ray node per card."""
    from runtime.nodes import cards_to_join, joined_cards, nodes_for_cards, start_card_nodes, with_default_port

    cards, code = _fleet_cards(args, lambda exc: f"error: {exc}")
    if code:
        return code
    if args.host:
        cards = [c for c in cards if c.host == args.host]
        if not cards:
            say(f"error: no card of {args.fleet} is on host {args.host!r}")
            return 2
    nodes, skipped = nodes_for_cards(cards, args.fleet)
    configured = None
    if getattr(args, "config", None):
        from deployments.config import load_service_config

        import yaml

        try:
            config = load_service_config(args.config, {})
        except (OSError, ValueError, yaml.YAMLError) as exc:
            say(f"error: {exc}")
            return 2
        configured = config.tiers if "tiers" in config.model_fields_set else None
    nodes, refused = _within_host_ram(nodes, args.fleet, configured)
    for line in skipped + refused:
        say(f"skipped: {line}")
    if not nodes:
        say(f"error: no card here can serve ({no_card_why()})")
        return 2
    address = with_default_port(args.address)
    try:  # a card already in the cluster (`zit node` run twice) is not joined again
        missing, already, warnings = cards_to_join(nodes, joined_cards(address))
    except Exception as exc:  # Ray's GCS client raises its own errors; `ray start` below says what is wrong
        say(f"warning: could not list the cards already in {address} ({str(exc).splitlines()[0][:300]}); "
             "joining every card")
        missing, already, warnings = nodes, [], []
    for line in already + warnings:
        say(line)
    if not missing:
        return 0
    try:
        for line in start_card_nodes(address, missing, node_ip=args.node_ip):
            say(line)
    except RuntimeError as exc:
        say(f"error: {exc}")
        return 1
    return 0


def _within_host_ram(nodes: list, fleet_file, configured: list | None = None) -> tuple[list, list[str]]:
    """The card nodes whose replicas this host's RAM holds (cluster/host_memory.py plan_hosts), each tier with its
    profile from `configured` (the head's service config, `--config`), and a line for each card left out. Which
    cards the cluster's text-encoder stage uses is the head's choice (`zit up`), so each generator is counted with
    its own encoder here: the need is never under-counted."""
    from cluster.host_memory import plan_hosts
    from cluster.profiles import tier_profile
    from cluster.tiers import tiers_for_cards
    from runtime.nodes import EIGHT_BIT, host_ram_of, ram_tight_tiers, stored_in_8_bits

    cards = [node.card for node in nodes]
    host_ram, _ = host_ram_of(cards, fleet_file, running=False)
    tiers = tiers_for_cards(cards, configured)
    profiles = {t.name: tier_profile(t) for t in tiers}
    hosts, refused = plan_hosts(cards, profiles, host_ram=host_ram)
    for need in hosts.values():
        had = f"{need.ram_bytes / 2**30:.1f} GiB" if need.ram_bytes is not None else "not checked"
        say(f"host {need.host}: its replicas need {need.need / 2**30:.1f} GiB of RAM ({had})")
    # The tiers' storage is the head's (`zit up` and its service config): say what 8-bit storage would hold here.
    eight_bit = ram_tight_tiers(cards, refused, profiles, configured) if refused else []
    if eight_bit:
        lighter = {t.name: tier_profile(stored_in_8_bits(t) if t.name in eight_bit else t) for t in tiers}
        _, still = plan_hosts(cards, lighter, host_ram=host_ram)
        if len(still) < len(refused):
            say(f"note: with {', '.join(eight_bit)} stored in 8 bits this host would hold {len(refused) - len(still)} "
                f"more card(s): give those tiers `profile: {{storage_dtype: {EIGHT_BIT}}}` in the service config, "
                "start the head with it (`zit down`, `zit up --config FILE`) and join with the same `--config FILE`")
    lines = [f"{n.card.name} [{n.card.uuid}] {refused[n.card.uuid]}: not joined" for n in nodes if n.card.uuid in refused]
    return [n for n in nodes if n.card.uuid not in refused], lines
