"""The `synapse-relay` command."""

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from synapse_relay import demo

DISTRIBUTION = "synapse-relay"


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="synapse-relay",
        description="Matrix relay servers for Synapse. The module itself runs"
        " inside Synapse (see README.rst); this command has tools around it.",
    )
    main_parser.add_argument(
        "--version", action="version", version=f"%(prog)s {package_version()}"
    )
    commands = main_parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND"
    )
    demo_parser = commands.add_parser(
        "demo",
        help="show a message crossing a relay between three homeservers",
        description=demo.DESCRIPTION,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=lambda args: demo.run_command(demo_parser, args))
    return main_parser


def main(argv: list[str] | None = None) -> int:
    main_parser = parser()
    args = main_parser.parse_args(argv)
    if args.command is None:
        main_parser.print_usage(sys.stderr)
        print(
            "synapse-relay: error: a command is needed, e.g. `synapse-relay demo`"
            " (see `synapse-relay --help`)",
            file=sys.stderr,
        )
        return 2
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
