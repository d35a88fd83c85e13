"""`mixprec formats`: the table of number formats."""

from __future__ import annotations

import argparse

import mixprec as mp

HELP = "Print the table of number formats (bits, range, precision, torch dtype)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": f.name,
            "bits": f.bits,
            "exponent_bits": f.exponent_bits,
            "mantissa_bits": f.mantissa_bits,
            "max": f.max,
            "min_normal": f.min_normal,
            "min_subnormal": f.min_subnormal,
            "eps": f.eps,
            "inf": f.has_inf,
            "torch_dtype": str(f.torch_dtype).replace("torch.", "") if f.torch_dtype else "-",
        }
        for f in mp.FORMATS.values()
    ]
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Number formats")
    for column in ("name", "bits", "e/m", "max", "min normal", "min subnormal", "eps", "inf", "torch dtype"):
        table.add_column(column, justify="left" if column in ("name", "torch dtype") else "right")
    for r in rows:
        table.add_row(
            r["name"], str(r["bits"]), f"{r['exponent_bits']}/{r['mantissa_bits']}",
            _num(r["max"]), _num(r["min_normal"]), _num(r["min_subnormal"]), _num(r["eps"]),
            "yes" if r["inf"] else "no", r["torch_dtype"],
        )
    Console().print(table)
    return 0


def _num(value: float) -> str:
    """Short and exact enough: powers of two as 2^k, others in %g."""
    import math

    mantissa, exponent = math.frexp(value)
    if mantissa == 0.5 and abs(exponent - 1) > 4:
        return f"2^{exponent - 1}"
    return f"{value:.6g}"
