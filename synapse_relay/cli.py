"""The `synapse-relay` command."""

import argparse
import sys

from synapse_relay import demo


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="synapse-relay",
        description="Matrix relay servers for Synapse. Subcommands: demo.",
    )
    parser.add_argument("command", choices=["demo"], help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parsed = parser.parse_args(args[:1])
    if parsed.command == "demo":
        return demo.main(args[1:])
    return 2  # unreachable: argparse refused anything else


if __name__ == "__main__":
    sys.exit(main())
