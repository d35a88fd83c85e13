"""Tables for the terminal (rich, fit 80 columns) and for report.md (Markdown).

Example:
    >>> from mixprec.harness.training import compare
    >>> text = render(results_table(compare("tiny-updates", ["f32"], steps=5)))
    >>> max(map(len, text.splitlines())) <= 80
    True
"""

from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.table import Table

from mixprec.harness.training import Comparison

from .summary import format_bytes, format_metric, format_scale, short_policy, summarize, wrap_policy

MEMORY_COLUMNS = ("parameters", "masters", "gradients", "optimizer_state", "activations")  # mp.memory's categories
MEMORY_HEADERS = ("params", "masters", "grads", "optim", "activ", "total")
POLICY_WIDTH = 24  # a policy's lines in the terminal tables: its shortest form, broken after commas


def results_table(comparison: Comparison) -> Table:
    """Final metric (mean ± std over seeds) with its verdict, skipped steps, loss scale, speed, execution."""
    arrow = "↑" if comparison.higher_is_better else "↓"
    n = len(comparison.seeds)
    rows = summarize(comparison)
    ref = next(r["policy"] for r in rows if r["verdict"] == "reference")
    table = Table(title=f"{comparison.recipe}: {comparison.metric} {arrow}, {n} seed{'s' * (n > 1)}",
                  box=box.SIMPLE_HEAD, show_edge=False, title_justify="left",
                  collapse_padding=True, pad_edge=False)
    for header in ("policy", comparison.metric, f"vs {ref}", "skipped", "scale", "ms/step", "exec"):
        table.add_column(header, justify="left" if header in ("policy", f"vs {ref}", "exec") else "right",
                         no_wrap=header != "policy", overflow="fold")
    for row in rows:
        table.add_row(
            _policy_cell(row["policy"]), format_metric(row["mean"], row["std"], n, compact=True),
            row["verdict"].replace("reference", "ref"),
            f"{row['skipped_steps']:g}", format_scale(row["final_loss_scale"]),
            f"{1000 * row['seconds_per_step']:.1f}", _execution(row, short=True),
        )
    return table


def memory_table(comparison: Comparison) -> Table:
    """Bytes by category per policy, counted by `mp.memory` in the policy's formats (measured peak on CUDA)."""
    rows = summarize(comparison)
    source = _memory_source(rows)
    table = Table(title=f"{comparison.recipe}: training memory by category ({source})", box=box.SIMPLE_HEAD,
                  show_edge=False, title_justify="left", collapse_padding=True, pad_edge=False)
    extra = [k for k in rows[0]["memory"] if k not in MEMORY_COLUMNS]  # e.g. the measured CUDA peak
    for header in ("policy", *MEMORY_HEADERS, *extra):
        table.add_column(header.replace(" (measured)", ""), justify="left" if header == "policy" else "right",
                         overflow="fold")
    for row in rows:
        memory = row["memory"]
        total = sum(memory.get(k, 0) for k in MEMORY_COLUMNS)
        table.add_row(_policy_cell(row["policy"]), *(format_bytes(memory.get(k, 0)) for k in MEMORY_COLUMNS),
                      format_bytes(total), *(format_bytes(memory[k]) for k in extra))
    return table


def render(table: Table, width: int = 80) -> str:
    """A table as plain text, as an 80-column terminal shows it."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.export_text()


def markdown_tables(comparison: Comparison) -> str:
    """The same two tables in Markdown, with the min-max range and the verdict spelled out."""
    rows = summarize(comparison)
    n = len(comparison.seeds)
    lines = [
        f"| policy | {comparison.metric} (mean ± std) | min – max | verdict | skipped steps | final loss scale "
        "| ms/step | execution |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        name = short_policy(r["policy"])
        lines.append(
            f"| `{name}` | {format_metric(r['mean'], r['std'], n)} | {r['min']:.4g} – {r['max']:.4g} "
            f"| {r['verdict_text']} | {r['skipped_steps']:g} | {format_scale(r['final_loss_scale'])} "
            f"| {1000 * r['seconds_per_step']:.1f} | {_execution(r)} |"
        )
    memory_keys = list(next((r["memory"] for r in rows if r["memory"]), {}))
    lines += ["", f"Memory by category ({_memory_source(rows)}; bytes as the policy stores them):", "",
              "| policy | " + " | ".join(memory_keys) + " | total |",
              "|---|" + "---:|" * (len(memory_keys) + 1)]
    for r in rows:
        total = sum(r["memory"].get(k, 0) for k in MEMORY_COLUMNS)
        cells = [format_bytes(r["memory"][k]) if k in r["memory"] else "-" for k in memory_keys]  # "-": all diverged
        lines.append(f"| `{short_policy(r['policy'])}` | " + " | ".join(cells) + f" | {format_bytes(total)} |")
    shortened = [p for p in comparison.policies if short_policy(p) != p]
    if shortened:
        lines += ["", "Policies are shown as a preset with the keys that differ from it (each parses to the same "
                  "policy): " + "; ".join(f"`{short_policy(p)}` is `{p}`" for p in shortened) + "."]
    return "\n".join(lines)


def _policy_cell(policy: str) -> str:
    """A policy in a terminal table: its shortest form, on lines of at most `POLICY_WIDTH` characters."""
    return wrap_policy(short_policy(policy), POLICY_WIDTH)


def _memory_source(rows: list[dict]) -> str:
    """The runs' memory sources, the most detailed one when native and emulated runs mix ("counted" and
    "counted; emulated: policy's formats": emulated rows are in their policy's formats)."""
    return max((r["memory_source"] for r in rows), key=len)


def _execution(row: dict, short: bool = False) -> str:
    """"native", or "emulated (per op)" / "emulated (module boundaries)"; short: "native", "emul", "emul/mod"."""
    if row["execution"] == "native":
        return "native"
    emulation = row.get("emulation") or "per op"
    if short:
        return "emul" if emulation == "per op" else "emul/mod"
    return f"emulated ({emulation})"
