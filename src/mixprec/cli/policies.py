"""`mixprec policies`: the preset precision policies, or what one policy string means."""

from __future__ import annotations

import argparse
import json
import textwrap

import mixprec as mp
from mixprec.recipes import get_recipe

HELP = "List the preset precision policies (or check one policy string) with what each one sets."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", nargs="?", help="a policy string to check and show, e.g. "
                                                  "'f16-master,rule=lm_head:fp32' (default: list the presets)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--recipe", help="with a policy: what it gives each module of this recipe's model, and why "
                                         "(policy.explain), e.g. 'mixprec policies fp8-tensorwise --recipe gpt'")


def _row(name: str, policy: mp.Policy, description: str) -> dict:
    return {
        "name": name,
        "params": policy.params.name,
        "compute": policy.compute.name,
        "output": policy.output.name,
        "master": policy.master_mode if policy.master is not None else None,
        # the weight and what keeps its master, for parameters in the policy's default format
        "bytes_per_param": policy.weight_bytes,
        "scaling": policy.scaling,
        "execution": policy.execution,
        "rules": [str(r) for r in policy.rules],
        "fp8": None if policy.fp8 is None else str(policy.fp8),  # Linear matmuls on scaled FP8 operands
        "description": description,
    }


def run(args: argparse.Namespace) -> int:
    if args.recipe is not None and args.policy is None:
        raise ValueError("--recipe shows what a policy gives a recipe's model: name the policy too, e.g. "
                         f"'mixprec policies fp8-tensorwise --recipe {args.recipe}'")
    if args.policy is not None:
        policy = mp.Policy.parse(args.policy)  # a ValueError here is printed as one line, exit 2
        if args.recipe is not None:
            print(policy.explain(get_recipe(args.recipe).make_model()))
            return 0
        rows = [_row(str(policy), policy, mp.PRESETS.get(str(policy), "custom policy"))]
    else:
        rows = [_row(name, mp.Policy.parse(name), text) for name, text in mp.PRESETS.items()]
    if args.json:
        print(json.dumps(rows if args.policy is None else rows[0], indent=2))
        return 0
    # A plain fixed-width table (like `mixprec formats`): it reads the same in any 80-column terminal.
    if args.policy is not None:
        print(f"policy {rows[0]['name']}")
        rows[0]["name"] = ""
    width = max(len(r["name"]) for r in rows) + 2 if args.policy is None else 0
    print(f"{'name' if width else '':{width}}{'params':7}{'compute':9}{'output':7}{'master':11}{'B/param':8}scaling")
    print("-" * 78)
    for r in rows:
        compute = f"fp8/{r['compute']}" if r["fp8"] else r["compute"]
        print(f"{r['name']:{width}}{r['params']:7}{compute:9}{r['output']:7}{r['master'] or '-':11}"
              f"{r['bytes_per_param']:<8g}{r['scaling']}")
        if r["fp8"]:
            print(f"    fp8 matmuls: {r['fp8']} (Linear layers; --recipe NAME shows which)")
        for number, rule in enumerate(r["rules"], start=1):
            print(f"    rule {number}: {rule}")
        print(textwrap.fill(r["description"], width=78, initial_indent="    ", subsequent_indent="    "))
    if args.policy is None:
        print("\nNorm layers, softmax and losses run in FP32 unless a rule says otherwise.")
        print("B/param: bytes of a weight and its master (without optimizer state, gradients).")
        print("fp8/bf16: Linear matmuls on scaled FP8 operands, the rest in bf16 (docs/fp8.md).")
        print("Override any field: 'f16-master,scaling=static:1024,rule=lm_head:fp32'.")
    return 0
