"""What the `zit` commands share: how they speak, where the service listens by default, the options several take."""

from __future__ import annotations

import argparse

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# The Serve application's name (`zit up`, serve_config.yaml, the chart).
APP_NAME = "zit"


def say(message: str) -> None:
    print(message, flush=True)


def socket_host() -> str:
    import socket

    return socket.gethostname()


def no_card_why() -> str:
    """Why no card joins, in general terms: see the skipped lines printed above it."""
    from cluster.tiers import vram_tiers

    smallest = min(vram_tiers().values())
    return (f"each is failed, below the smallest tier ({smallest:g} GB), too full, or more than its host's RAM "
            "holds; see the skipped lines above")


def add_split_argument(parser: argparse.ArgumentParser) -> None:
    """--split for zit up, node and fleet (runtime/nodes.py apply_splits)."""
    parser.add_argument("--split", action="append", metavar="CARD=TIER",
                        help="serve a big card as several slots of a smaller tier, e.g. 'RTX 4090=vram_12' (two "
                             "vram_12 slots); CARD is an index (digits), a UUID or part of the name; repeatable")


def _tiers_option(text: str) -> str:
    """--tiers GB,GB,...: validated (cluster/tiers.py parse_vram_tiers), given back as the variable's value."""
    from cluster.tiers import parse_vram_tiers

    try:
        return ",".join(f"{gb:g}" for gb in parse_vram_tiers(text, "--tiers").values())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_tiers_argument(parser: argparse.ArgumentParser) -> None:
    """--tiers for zit up, node, fleet and plan: the tier table, set for this process and the Ray processes it
    starts (cli.main.main)."""
    parser.add_argument("--tiers", dest="vram_tiers", type=_tiers_option, metavar="GB,GB,...",
                        help="VRAM tiers by lower bound in whole GB, e.g. 4,8,12,24 (tiers vram_4 ... vram_24; a card "
                             "joins the largest it reaches with 90%% of its memory). Default: $ZIT_VRAM_TIERS_GB, else "
                             "4,6,8,12,16,24. Use the same on every zit up / zit node of one cluster")
