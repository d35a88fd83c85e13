"""The `mixprec` command line: one file per command, listed in COMMANDS.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
The CLI uses only the public API (``import mixprec as mp``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command name -> module (under mixprec.cli) that implements it
COMMANDS: dict[str, str] = {
    "formats": "formats",
    "policies": "policies",
    "train": "train",
    "compare": "compare",
    "demo": "demo",
}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixprec",
        description="Mixed precision training for PyTorch: formats, policies, training and comparison.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"mixprec.cli.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


#: modules the command line needs beyond the library (the `cli` extra)
CLI_EXTRAS = ("rich", "matplotlib", "sklearn", "tensorboard")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in CLI_EXTRAS:
            raise
        print(f"mixprec: the command line needs {error.name}, which is not installed: "
              f"pip install 'mixprec[cli]'", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (UsageError, ValueError, TypeError) as error:
        # Bad input: one clear line, no traceback (the message says what was wrong and how to fix it).
        print(f"mixprec {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
