"""report.md: what ran where, a section per comparison with its tables and plots, and how to read it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixprec.harness.training import Comparison

from .summary import reference_policy, short_policy, summarize, verdict_sentence
from .tables import markdown_tables

READING = """\
How to read this: each policy trained the same model on the same data from the same seeds. *matches*
means the mean final metric is within a tolerance of the reference's mean: the reference's spread over
seeds, or 2% of its gain from the initial metric where that is larger (one seed, or seeds that agree
closely), so a policy can match while its mean is outside the reference's own min–max; *stalled* means
it got less than half of the reference's gain.
Execution *emulated* means values were rounded onto the format's grid with FP32 arithmetic (as the
paper did to study FP16 without FP16 hardware); memory, counted from the real tensors by `mp.memory`,
is then given in the policy's formats: the bytes the same tensors take natively (`memory_held` in
results.json has the FP32 bytes emulation held). Time per step of an emulated run measures the
emulation, not FP16 speed.
"""


def report_markdown(comparisons: list[Comparison], plots: dict[str, list[Path]], env: dict[str, Any],
                    title: str = "mixprec comparison") -> str:
    lines = [f"# {title}", "", _environment_line(env), "", READING]
    for comparison in comparisons:
        description = comparison.description
        runs = comparison.runs[0]
        lines += [f"## {comparison.recipe}", ""]
        if description:
            lines += [f"{description}.", ""]
        lines += [f"{runs.steps} steps, seeds {', '.join(map(str, comparison.seeds))}, reference "
                  f"`{reference_policy(comparison)}`. {_data_line(runs.data_info)}", ""]
        lines += [markdown_tables(comparison), ""]
        lines += _findings(comparison)
        for path in plots.get(comparison.recipe, []):
            lines += [f"![{path.stem}]({path.name})", ""]
    return "\n".join(lines)


def _environment_line(env: dict[str, Any]) -> str:
    commit = env.get("git_commit") or "unknown commit"
    return (f"Measured {env['date']} on {env['device']} ({env['device_name']}), torch {env['torch']}, "
            f"Python {env['python']}, mixprec {env['mixprec']} ({commit}), {env['cpu_threads']} CPU thread(s).")


def _data_line(info: dict[str, Any]) -> str:
    if "corpus_sha256" in info:
        return f"Corpus: {info['corpus_bytes']:,} bytes, sha256 `{info['corpus_sha256'][:16]}…`."
    if "dataset" in info:
        return f"Data: `{info['dataset']}`."
    return ""


def _findings(comparison: Comparison) -> list[str]:
    """One sentence per policy, in words, so the point of the table is not left to the reader."""
    rows = summarize(comparison)
    ref = next(r for r in rows if r["verdict"] == "reference")
    out = [f"- `{short_policy(row['policy'])}`: {verdict_sentence(row, ref)}."
           for row in rows if row["verdict"] != "reference"]
    return out + [""] if out else []
