"""The ``visionzoo`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

LISTABLE = ("models", "mixers", "recipes", "ops")


def _list(args: argparse.Namespace) -> int:
    import visionzoo
    from visionzoo.kernels import list_ops

    listings = {
        "models": visionzoo.list_models,
        "mixers": visionzoo.list_mixers,
        "recipes": visionzoo.list_recipes,
        "ops": list_ops,
    }
    for name in listings[args.what]():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionzoo", description="visionzoo: vision backbones for timm.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list registered models, mixers, kernel ops or packaged recipes")
    listing.add_argument("what", choices=LISTABLE)
    listing.set_defaults(run=_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
