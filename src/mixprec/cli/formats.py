"""`mixprec formats`: the table of number formats."""

from __future__ import annotations

import argparse
import json
import math

import mixprec as mp

HELP = "Print the table of number formats (bits, range, precision, torch dtype)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    formats = list(mp.FORMATS.values())
    if args.json:
        print(json.dumps([_row(f) for f in formats], indent=2))
        return 0
    # A plain fixed-width table: every number stays whole in an 80-column terminal.
    header = f"{'name':6}{'bits':>4} {'e/m':>5} {'max':>10} {'min normal':>11} {'min subnorm':>12} {'eps':>7}"
    print(header + f" {'inf':>3}  torch dtype")
    print("-" * (len(header) + 19))
    for f in formats:
        print(
            f"{f.name:6}{f.bits:>4} {str(f.exponent_bits) + '/' + str(f.mantissa_bits):>5} "
            f"{_num(f.max):>10} {_num(f.min_normal):>11} {_num(f.min_subnormal):>12} "
            f"{_num(f.eps):>7} {'yes' if f.has_inf else 'no':>3}  {_dtype_name(f)}"
        )
    return 0


def _row(f: mp.Format) -> dict[str, object]:
    """One format's numbers, as ``--json`` prints them."""
    return {
        "name": f.name,
        "bits": f.bits,
        "exponent_bits": f.exponent_bits,
        "mantissa_bits": f.mantissa_bits,
        "max": f.max,
        "min_normal": f.min_normal,
        "min_subnormal": f.min_subnormal,
        "eps": f.eps,
        "inf": f.has_inf,
        "torch_dtype": _dtype_name(f),
    }


def _dtype_name(f: mp.Format) -> str:
    """The torch dtype that carries `f` (``"float16"``), or ``"-"`` where none does."""
    return str(f.torch_dtype).replace("torch.", "") if f.torch_dtype else "-"


def _num(value: float) -> str:
    """Short and exact enough: powers of two as 2^k, others in %g."""
    mantissa, exponent = math.frexp(value)
    if mantissa == 0.5 and abs(exponent - 1) > 4:
        return f"2^{exponent - 1}"
    if value.is_integer() and value < 1e7:
        return str(int(value))
    return f"{value:.4g}"
