"""The `mixprec` command line: one file per command, listed in COMMANDS.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
The CLI uses only the public API (``import mixprec as mp``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

#: command name -> module (under mixprec.cli) that implements it
COMMANDS: dict[str, str] = {
    "formats": "formats",
    "policies": "policies",
    "train": "train",
    "compare": "compare",
    "demo": "demo",
    "paper": "paper",
    "doctor": "doctor",
    "bench": "bench",
}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2, no traceback."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2), not usage + error:
    the line names the bad argument and what is valid; ``--help`` shows the rest."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Once(argparse.Action):
    """An option that defines the run and may be given once: argparse would keep the last of two silently
    (``--policy f16-master ... --policy f32`` trains in f32), so a second one is a usage error naming both."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        given: dict[str, object] = namespace.__dict__.setdefault("_given_once", {})
        if self.dest in given:
            parser.error(f"argument {option_string}: given twice ({str(given[self.dest])!r} and {str(values)!r}); "
                         "give it once")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


# ----- argument types: checked while parsing, so a bad value costs nothing and writes nothing ----------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--steps``, ``--threads``, ``--stop-at``)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (``--checkpoint-every``: 0 means only at the end)."""
    return _int_at_least(text, 0)


def seed_int(text: str) -> int:
    """argparse type: a seed in 0..2**32-1 (the range NumPy's seed takes; torch and Python take it too)."""
    value = _int_at_least(text, 0)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{2**32 - 1}, got {text!r}")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def device_name(text: str) -> str:
    """argparse type: a device this torch build can train on here: ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Example: ``--device cuda`` on a CPU-only torch build is refused with the devices there are.
    """
    import torch

    here = ["cpu"]
    if torch.cuda.is_available():
        here += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        here.append("mps")
    valid = f"valid here: {', '.join(here)}"
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; {valid}") from None
    if parsed.type == "cpu" or (parsed.type == "mps" and "mps" in here):
        return str(parsed)
    if parsed.type != "cuda":
        raise argparse.ArgumentTypeError(f"device {text!r} is not available to mixprec here; {valid}")
    if not torch.backends.cuda.is_built():
        raise argparse.ArgumentTypeError(
            f"{text!r}: CUDA is not available in this torch build (torch {torch.__version__}); {valid}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this torch build has CUDA but sees no CUDA device (check the driver and "
            f"CUDA_VISIBLE_DEVICES); {valid}")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"there is no CUDA device {text!r}; {valid}")
    return str(parsed)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
        print(f"mixprec: error: no command given; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
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
