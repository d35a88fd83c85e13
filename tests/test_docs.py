"""Every ```python block of README.md and docs/*.md, run as a test (one test per block, id ``file:line``).

A page's blocks run in order, each in a fresh working directory, in a namespace that holds what the
page's fragments use without defining it (`fresh_namespace`, below: a tiny model, a few batches, an
optimizer...). An HTML comment on the line above a block (blank lines between are allowed) changes
that:

* ``<!-- doctest: skip (why) -->``: the block cannot run here by its nature (it needs CUDA, or several
  processes under torchrun); the test is reported as skipped, with that reason.
* ``<!-- doctest: continue -->``: the block goes on from the namespace the page's previous ```python
  block left (a class defined there, a model trained there).
* ``<!-- doctest: prepared -->``: the block runs in the middle of a training step: the namespace's
  model, optimizer and scaler come from ``mp.prepare`` and one ``scaler.scale(loss).backward()`` ran
  (`prepared_namespace`).
* ``<!-- doctest: output -->`` above the plain ``` block that follows a ```python block: that block is
  what the python block prints last (its standard output must end with that text, after trailing
  spaces are stripped from each line; a library's progress output may come before it).

A plain ``` block whose first line is a command at a prompt, ``$ mixprec ...``, is a transcript: the
command runs (in this process, through ``mixprec.cli.main``) and must print the rest of the block.

A block whose first line is a file name (``# my_tasks.py``) is also written into the working
directory of every block of its page, under that name, so that later blocks import it.
Blocks that are not meant to run (sample outputs, shell commands) are ``` or ```text, not ```python.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DIRECTIVE = re.compile(r"<!--\s*doctest:\s*(skip|continue|prepared|output)\s*(?:\((.*)\))?\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
FILE_NAME = re.compile(r"^#\s*([\w./-]+\.py)\s*$")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@dataclass(frozen=True)
class Block:
    """One ```python block of a page and what its directive asks."""

    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    directive: str | None  # "skip", "continue", "prepared" or None
    reason: str
    output: str | None  # the text it must print last, from an "output" block after it

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"

    @property
    def file_name(self) -> str | None:
        """The file the block is (its first line names it), or None."""
        first = self.code.split("\n", 1)[0]
        match = FILE_NAME.match(first)
        return match.group(1) if match else None


@dataclass(frozen=True)
class _Fence:
    line: int
    lang: str
    text: str
    directive: str | None
    reason: str


def _fences(page: Path) -> list[_Fence]:
    """Every fenced block of a page, with the directive in the comment above it."""
    lines = page.read_text().splitlines()
    fences: list[_Fence] = []
    directive: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        found = DIRECTIVE.search(lines[i])
        if found:
            directive = (found.group(1), found.group(2) or "")
        elif match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            name, reason = directive or (None, "")
            fences.append(_Fence(i + 1, match.group(1), "\n".join(lines[i + 1:end]), name, reason))
            directive, i = None, end
        elif lines[i].strip():
            directive = None  # a directive applies to the block right below it
        i += 1
    return fences


def page_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks, each with its directive and the output block that follows it."""
    fences = _fences(page)
    blocks = []
    for k, fence in enumerate(fences):
        if fence.lang != "python":
            if fence.directive == "output" and not (k and fences[k - 1].lang == "python"):
                raise ValueError(f"{page.name}:{fence.line}: an output block must follow a python block")
            continue
        after = fences[k + 1] if k + 1 < len(fences) else None
        output = after.text if after is not None and after.directive == "output" else None
        blocks.append(Block(page, fence.line, fence.text, fence.directive, fence.reason, output))
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def page_transcripts(page: Path) -> list[tuple[str, list[str], str]]:
    """The page's ``$ mixprec ...`` transcripts: (id, the command's arguments, what it prints)."""
    found = []
    for fence in _fences(page):
        first, _, rest = fence.text.partition("\n")
        if fence.lang in ("", "text", "console") and first.startswith("$ mixprec "):
            found.append((f"{page.relative_to(ROOT)}:{fence.line}", first.split()[2:], rest))
    return found


ALL_TRANSCRIPTS = [t for page in PAGES for t in page_transcripts(page)]


class MyModel(nn.Module):
    """The model the pages' fragments train: 8 features -> 4 classes, a LayerNorm (an FP32 island)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.LayerNorm(32))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fresh_namespace() -> dict[str, Any]:
    """What the fragments use, before ``mp.prepare``: ``model`` (a `MyModel`), ``optimizer`` (AdamW
    over it), ``lr_scheduler`` (= ``scheduler``, over that optimizer), ``data`` (= ``loader`` =
    ``batches``: 3 batches of 16 rows), one batch ``x, y``, ``loss_fn`` (cross-entropy), ``policy``
    (f16-master), ``device`` ("cpu"), ``path`` (a checkpoint file name), and ``torch``, ``mp``, ``F``."""
    torch.manual_seed(0)
    model = MyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    batches = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(3)]
    x, y = batches[0]
    return {"torch": torch, "F": F, "mp": mp, "MyModel": MyModel, "model": model, "optimizer": optimizer,
            "lr_scheduler": scheduler, "scheduler": scheduler, "data": batches, "loader": batches,
            "batches": batches, "x": x, "y": y, "loss_fn": F.cross_entropy,
            "policy": mp.Policy.parse("f16-master"), "device": "cpu", "path": "checkpoint.pt"}


def prepared_namespace() -> dict[str, Any]:
    """`fresh_namespace` in the middle of a training step: ``model, optimizer, scaler`` from
    ``mp.prepare`` (f16-master), one scaled backward done, ``step`` (0), and ``save_checkpoint(...)``
    (saves model, optimizer and scaler to ``path``)."""
    ns = fresh_namespace()
    model, optimizer, scaler = mp.prepare(ns["model"], ns["optimizer"], ns["policy"])
    assert optimizer is not None
    with mp.autocast(model):
        loss = F.cross_entropy(model(ns["x"]), ns["y"])
    scaler.scale(loss).backward()

    def save_checkpoint(*args: Any, **kwargs: Any) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict()}, ns["path"])

    ns.update(model=model, optimizer=optimizer, scaler=scaler, step=0, save_checkpoint=save_checkpoint)
    return ns


@contextlib.contextmanager
def in_folder(folder: Path, page: Path) -> Iterator[None]:
    """Run in `folder` (imports from it too), with the page's file blocks written there and the data
    file docs/experiments.md's recipe reads (``my_data.pt``: 10,000 rows, 20 features, 5 classes)."""
    names = {}
    for block in page_blocks(page):
        if block.file_name:
            (folder / block.file_name).write_text(block.code + "\n")
            names[Path(block.file_name).stem] = True
    if "my_tasks" in names:
        generator = torch.Generator().manual_seed(0)
        torch.save((torch.randn(10_000, 20, generator=generator),
                    torch.randint(0, 5, (10_000,), generator=generator)), folder / "my_data.pt")
    here = os.getcwd()
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        os.chdir(here)
        sys.path.remove(str(folder))
        for name in names:
            sys.modules.pop(name, None)


def _reset_process_state() -> None:
    """What blocks leave in process-wide state: Accelerate's singletons (which refuse another setting
    once made) and torch.compile's caches."""
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


_LEFT: dict[str, dict[str, Any]] = {}  # block id -> the namespace it left (for a "continue" block)


def run_block(block: Block, folder: Path) -> tuple[dict[str, Any], str]:
    """Run `block` (and, for a "continue" block, the blocks it goes on from, unless they ran already):
    the namespace it leaves and what it printed."""
    if block.directive == "continue":
        before = [b for b in page_blocks(block.page) if b.line < block.line]
        if not before:
            raise ValueError(f"{block.id}: a 'doctest: continue' block needs a python block above it")
        previous = before[-1]
        if previous.id not in _LEFT:
            run_block(previous, folder)
        namespace = dict(_LEFT[previous.id])
    else:
        namespace = prepared_namespace() if block.directive == "prepared" else fresh_namespace()
    printed = io.StringIO()
    _reset_process_state()
    try:
        with in_folder(folder, block.page), contextlib.redirect_stdout(printed):
            exec(compile(block.code, block.id, "exec"), namespace)  # noqa: S102 (the docs' own code)
    finally:
        _reset_process_state()
    _LEFT[block.id] = namespace
    return namespace, printed.getvalue()


def _trimmed(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[block.id for block in ALL_BLOCKS])
def test_docs_code_block_runs(block: Block, tmp_path: Path) -> None:
    if block.directive == "skip":
        pytest.skip(block.reason or "marked doctest: skip")
    with torch.random.fork_rng():  # the namespaces seed torch: other tests keep their random state
        _, printed = run_block(block, tmp_path)
    if block.output is not None:
        assert _trimmed(printed).endswith(_trimmed(block.output)), (
            f"{block.id} printed:\n{printed}\nThe page says it prints:\n{block.output}")


@pytest.mark.parametrize(("where", "argv", "expected"), ALL_TRANSCRIPTS, ids=[t[0] for t in ALL_TRANSCRIPTS])
def test_docs_command_transcript_is_what_it_prints(where: str, argv: list[str], expected: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cli = pytest.importorskip("mixprec.cli")
    assert cli.main(argv) == 0
    assert _trimmed(capsys.readouterr().out) == _trimmed(expected), where


def test_directives_are_read(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("intro\n\n<!-- doctest: skip (needs CUDA) -->\n```python\nimport nothing_here\n```\n\n"
                    "<!-- doctest: prepared -->\n\n```python\nprint(1 + 1)\n```\n\n<!-- doctest: output -->\n"
                    "```\n2\n```\n\n<!-- doctest: continue -->\ntext between\n```python\n# my_mod.py\nX = 1\n```\n")
    skipped, prepared, plain = page_blocks(page)
    assert (skipped.directive, skipped.reason, skipped.line) == ("skip", "needs CUDA", 4)
    assert (prepared.directive, prepared.output) == ("prepared", "2")
    assert (plain.directive, plain.file_name) == (None, "my_mod.py")  # the text between cancels it


def test_a_block_that_prints_something_else_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(2 + 2)\n```\n<!-- doctest: output -->\n```\n5\n```\n")
    (block,) = page_blocks(page)
    _, printed = run_block(block, tmp_path)
    assert printed == "4\n" and not _trimmed(printed).endswith(_trimmed(block.output or ""))


def test_every_page_with_code_is_collected() -> None:
    pages = {block.page.name for block in ALL_BLOCKS}
    assert {"README.md", "loss-scaling-and-masters.md", "numerics.md", "integrations.md"} <= pages
    assert any(block.output is not None for block in ALL_BLOCKS) and ALL_TRANSCRIPTS
