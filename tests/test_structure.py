"""The architecture as tests (docs/architecture.md): layers and their direction, no cycles, small files, the API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mixprec as mp

SRC = Path(mp.__file__).parent

# docs/architecture.md: the layers, lowest first. A module imports only from its own layer or lower ones
# (a name stands for a module or a whole package: "numerics" is numerics/*). The library is the layers up
# to "__init__"; above it are its first users, which import it only as `import mixprec as mp`.
LAYERS = [
    ["formats", "versions", "master_modes", "hardware", "fp8.recipe"],
    ["quantize", "nonfinite", "skips", "wrapper", "fp8.scales"],
    ["gradients", "scaling", "precisions"],  # scaling is scaling/*: the scalers carry the step's skip record (skips)
    ["policy", "master"],  # policy names its scaler through scaling (make_scaler)
    ["execution.hooks", "state", "outcome", "stepped", "fp8.linear"],
    ["execution.native", "execution.emulated", "execution.emulated_module", "execution", "distributed", "memory",
     "step", "fp32_view", "ema", "wrapping", "fp8.install", "fp8"],
    ["apply"],
    ["numerics"],
    ["__init__"],
    ["integrations", "recipes"],
    ["harness"],
    ["report"],
    ["cli"],
    ["__main__"],
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
NEVER = {("scaling", "master"), ("master", "scaling")}  # step composes them
LIBRARY_LEVEL = LEVEL["__init__"]
MAX_FILE_LINES = 400


def module_name(path: Path) -> str:
    """The dotted module name of a file under src/mixprec, relative to mixprec ('execution.hooks', 'cli')."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_name(module: str) -> str:
    """The LAYERS entry a module belongs to: the longest entry that is the module or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LEVEL:
            return ".".join(parts[:n])
    raise KeyError(module)


def mixprec_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module relative to mixprec, '' for mixprec itself; line; inside a function?) per import."""
    tree = ast.parse(path.read_text())
    here = ["mixprec", *path.relative_to(SRC).with_suffix("").parts]
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
                if node.module is None:  # from . import x
                    names = [".".join(base + [a.name]) for a in node.names]
                elif all((SRC.joinpath(*base[1:], *node.module.split("."), a.name + ".py")).exists()
                         for a in node.names):  # from .execution import hooks, native
                    names = [f"{names[0]}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
                if node.module and all(SRC.joinpath(*node.module.split(".")[1:], a.name + ".py").exists()
                                       for a in node.names):
                    names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mixprec":
                found.append((".".join(parts[1:]), node.lineno, id(node) in in_function))
    return found


def library_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    unknown = set()
    for path in library_files():
        try:
            layer_name(module_name(path))
        except KeyError:
            unknown.add(module_name(path))
    assert not unknown, f"add these to LAYERS (and docs/architecture.md): {unknown}"


def test_dependency_direction():
    problems = []
    for path in library_files():
        me = layer_name(module_name(path))
        for target, line, _ in mixprec_imports(path):
            where = f"{path.relative_to(SRC)}:{line} imports mixprec.{target}"
            if target == "":
                if LEVEL[me] <= LIBRARY_LEVEL and me != "__init__":
                    problems.append(where + " (the library imports its modules, not the package)")
                continue
            them = layer_name(target)
            if them == me:
                continue
            if (me.split(".")[0], them.split(".")[0]) in NEVER:
                problems.append(where + " (scaling and master never import each other)")
            elif LEVEL[them] > LEVEL[me]:
                problems.append(where + f" (layer {LEVEL[them]} above {LEVEL[me]})")
            elif LEVEL[me] > LIBRARY_LEVEL and LEVEL[them] < LIBRARY_LEVEL:
                problems.append(where + " (integrations, recipes, the harness, report and cli use only "
                                        "`import mixprec as mp`)")
    assert not problems, "\n".join(problems)


def import_graph(level_of: callable) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in library_files():
        me = level_of(module_name(path))
        for target, _, _ in mixprec_imports(path):
            if target and level_of(target) != me:
                graph.setdefault(me, set()).add(level_of(target))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt, path + [node]):
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node, []):
            return cycle
    return None


def test_no_import_cycles_between_modules_or_packages():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
    assert find_cycle(import_graph(lambda m: m)) is None
    assert find_cycle(import_graph(lambda m: m.split(".")[0])) is None


def test_no_mixprec_imports_inside_functions():
    inside = [f"{path.relative_to(SRC)}:{line} imports mixprec.{target}"
              for path in library_files() for target, line, in_function in mixprec_imports(path) if in_function]
    assert not inside, "import at the top of the module (a cycle means a module is in the wrong layer):\n" + \
        "\n".join(inside)


def test_every_file_is_small():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in library_files()}
    long = {name: n for name, n in sizes.items() if n > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by responsibility): {long}"


def test_import_mixprec_does_not_import_the_cli_or_the_tools_above_it():
    code = "import sys, mixprec; print(sorted(m for m in sys.modules if m.startswith('mixprec')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for above in ("mixprec.cli", "mixprec.recipes", "mixprec.report", "mixprec.harness"):
        assert above not in out, out


def test_public_api_contract_names():
    for name in ["F32", "F16", "BF16", "E4M3", "E5M2", "Format", "quantize", "Policy", "PRESETS",
                 "NoScaler", "StaticScaler", "DynamicScaler", "prepare", "autocast", "step", "StepInfo",
                 "MasterWeights"]:
        assert hasattr(mp, name), name
        assert name in mp.__all__, name


def test_init_only_reexports():
    tree = ast.parse((SRC / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds  # docstring, re-exports, __all__/__version__


def test_the_package_ships_its_type_hints():
    assert (SRC / "py.typed").exists()


BLOCK_EXTRAS = """
import importlib.abc, importlib.machinery, sys
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # As if not installed: importing raises ModuleNotFoundError, and find_spec (which torch._dynamo calls for
    # the libraries it skips) finds no file.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"matplotlib", "sklearn", "tensorboard", "rich"}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
"""


def test_import_mixprec_needs_only_torch_and_numpy():
    # The report/CLI dependencies (the `cli` extra) made unimportable: the library and its
    # distributed part still import and prepare a model.
    code = BLOCK_EXTRAS + (
        "import torch, mixprec as mp, mixprec.distributed\n"
        "m, o, s = mp.prepare(torch.nn.Linear(2, 2), None, 'f16-master')\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in {'rich', 'matplotlib', 'sklearn'}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_cli_without_its_extras_says_what_to_install():
    code = BLOCK_EXTRAS + "from mixprec.cli import main\nsys.exit(main(['formats']))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pip install 'mixprec[cli]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_heavy_dependencies_are_extras_not_requirements():
    import tomllib

    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]
    required = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert required == {"torch", "numpy"}
    cli = {d.split(">")[0].strip() for d in project["optional-dependencies"]["cli"]}
    assert {"rich", "matplotlib", "scikit-learn", "tensorboard"} <= cli
    assert "mixprec[cli,lightning,hf,fp8]" in project["optional-dependencies"]["dev"]  # make test installs them
