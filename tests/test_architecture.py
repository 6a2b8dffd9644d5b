"""The dependency rule of the house (README, "Architecture"), read from every module's imports.

- ``launcher.{errors,atomic,rundir,processes,hashing,redact}`` <- anyone; ``spec`` -> those only; ``data`` -> spec;
  ``model`` -> spec; ``plan`` -> spec, model; ``report`` -> those only, and no third-party package
  (it reads finished run directories with the standard library); ``train`` -> spec, data, model,
  plan, report; ``backends`` -> spec, plan, train, and a backend never imports a sibling backend;
  ``sweep`` -> spec, plan, backends, train, report (never imported by a backend); ``cli`` -> the
  packages' faces.
- ``federated`` -> launcher's faces; the Flower apps never import ``federated.ops``; the launcher
  never imports ``federated``.
- A package's ``__init__`` is its face: another package imports the package, never its modules.
- No import cycle, counting imports inside functions (so those only keep heavy libraries off
  start-up paths): third-party ones are the heavy libraries below; Flotilla's own say why in a comment.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

ROOTS = ("launcher", "federated")
BASE = {
    "launcher",
    "launcher.errors",
    "launcher.atomic",
    "launcher.rundir",
    "launcher.processes",
    "launcher.hashing",
    "launcher.redact",
}
#: What each layer may import, besides itself and the base modules.
ALLOWED = {
    "spec": set(),
    "data": {"spec"},
    "model": {"spec"},
    "plan": {"spec", "model"},
    "report": set(),
    "train": {"spec", "data", "model", "plan", "report"},
    "backends": {"spec", "plan", "train"},
    "sweep": {"spec", "plan", "backends", "train", "report"},
    "cli": {"spec", "data", "model", "plan", "report", "train", "backends", "sweep"},
    "federated": {"spec", "data", "model", "plan", "report", "train", "backends"},
}
#: Packages with a face (their ``__init__``): other packages import only that.
FACED = (
    "launcher.spec",
    "launcher.data",
    "launcher.model",
    "launcher.plan",
    "launcher.report",
    "launcher.train",
    "launcher.backends",
    "launcher.sweep",
    "federated.strategy",
    "federated.ops",
)
BACKENDS = ("local", "deepspeed", "ray", "slurm")
FLOWER_APPS = ("federated.server_app", "federated.client_app")
#: Third-party libraries an import inside a function may name: slow or optional, off start-up paths.
HEAVY = {
    "ray",
    "deepspeed",
    "flwr",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "safetensors",
    "sklearn",
    "rouge_score",
    "sacrebleu",
    "mlflow",
}


@dataclass(frozen=True)
class Import:
    """One import statement's target as seen from a module."""

    source: str
    target: str
    line: int
    in_function: bool
    type_only: bool
    commented: bool


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules(root: Path) -> dict[str, Path]:
    """Every module of Flotilla's packages under ``root``, by dotted name."""
    return {
        module_name(path, root): path for package in ROOTS for path in sorted((root / package).rglob("*.py"))
    }


def read_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of every module (in functions and ``TYPE_CHECKING`` blocks too)."""
    found: list[Import] = []
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, in_function, type_only in _walk(tree, False, False):
            for target in _targets(node, package, modules):
                found.append(
                    Import(name, target, node.lineno, in_function, type_only, _commented(lines, node.lineno))
                )
    return found


def _walk(node: ast.AST, in_function: bool, type_only: bool):  # type: ignore[no-untyped-def]
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function, type_only
            continue
        inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        guarded = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
        yield from _walk(child, inner, guarded)


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, Path]) -> list[str]:
    """Dotted names imported: a module of ours, or a third-party top-level package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    return submodules or [base]


def _commented(lines: list[str], number: int) -> bool:
    """A comment on the import's line or in the block of imports and comments just above it."""
    index = number - 1
    while index >= 0:
        text = lines[index].strip()
        if "#" in text:
            return True
        if index < number - 1 and text and not text.startswith(("from ", "import ")):
            return False
        index -= 1
    return False


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module.startswith("federated"):
        return "federated"
    if module == "launcher.cli":
        return "cli"
    return module.split(".")[1]


def faced_package(module: str) -> str | None:
    """The innermost package with a face that holds ``module`` (None for a top-level module)."""
    holders = [p for p in FACED if module == p or module.startswith(p + ".")]
    return max(holders, key=len) if holders else None


def backend_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "backends" and parts[2] in BACKENDS else None


def ours(target: str) -> bool:
    return target.split(".")[0] in ROOTS


def violations(imports: list[Import]) -> list[str]:
    """Every import that breaks the rule, as ``module:line imports target: why``."""
    problems = []
    for imp in imports:
        where = f"{imp.source}:{imp.line} imports {imp.target}"
        if not ours(imp.target):
            top = imp.target.split(".")[0]
            if imp.in_function and top not in HEAVY and top not in sys.stdlib_module_names:
                problems.append(
                    f"{where}: only heavy libraries ({', '.join(sorted(HEAVY))}) are imported in functions"
                )
            elif imp.in_function and top in sys.stdlib_module_names:
                problems.append(f"{where}: a standard-library import belongs at the top of the module")
            continue
        problems += [f"{where}: {why}" for why in _why_not(imp)]
    return problems


def _why_not(imp: Import) -> list[str]:
    source, target = imp.source, imp.target
    mine, theirs = layer_of(source), layer_of(target)
    why = []
    if source.startswith("launcher") and target.startswith("federated"):
        why.append("the launcher never imports federated (it registers `flotilla fed` as a plugin)")
    elif theirs not in ("base", mine) and theirs not in ALLOWED.get(mine, set()):
        why.append(
            f"the {mine} layer may import only {sorted(ALLOWED.get(mine, set()))} and the base modules"
        )
    package = faced_package(target)
    if package and package != faced_package(source) and target != package:
        why.append(f"import the face {package}, not its module")
    if backend_of(source) and backend_of(target) and backend_of(source) != backend_of(target):
        why.append("a backend never imports a sibling backend")
    if source in FLOWER_APPS and target.startswith("federated.ops"):
        why.append("the Flower apps never import federated.ops")
    if imp.in_function and not imp.commented:
        why.append("an import of Flotilla's own inside a function says why in a comment (start-up cost)")
    return why


def cycles(modules: dict[str, Path], imports: list[Import]) -> list[list[str]]:
    """Import cycles at run time (``TYPE_CHECKING`` imports excluded; a package's face counts)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports:
        if imp.type_only or not ours(imp.target) or imp.target not in modules:
            continue
        parts = imp.target.split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            parent = ".".join(parts[:end])
            if parent != imp.source and parent in modules and not imp.source.startswith(parent + "."):
                graph[imp.source].add(parent)
    return [c for c in _strongly_connected(graph) if len(c) > 1]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def house() -> tuple[dict[str, Path], list[Import]]:
    modules = read_modules(REPO)
    return modules, read_imports(modules)


def test_every_import_follows_the_dependency_rule(house: tuple[dict[str, Path], list[Import]]) -> None:
    _, imports = house
    assert violations(imports) == []


def test_the_report_package_needs_only_the_standard_library(
    house: tuple[dict[str, Path], list[Import]],
) -> None:
    """``launcher.report`` reads finished run directories: no torch, numpy or rich on that path."""
    _, imports = house
    foreign = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in imports
        if imp.source.startswith("launcher.report")
        and not ours(imp.target)
        and imp.target.split(".")[0] not in sys.stdlib_module_names
    ]
    assert foreign == []


def test_no_import_cycle(house: tuple[dict[str, Path], list[Import]]) -> None:
    modules, imports = house
    assert cycles(modules, imports) == []


def test_every_process_flotilla_starts_is_a_main_module() -> None:
    from launcher.backends.commands import WORKER_MODULE
    from launcher.backends.ray.backend import job_entrypoint
    from launcher.backends.slurm.script import NODE_MODULE

    targets = [WORKER_MODULE, NODE_MODULE, job_entrypoint("/run").split()[2]]
    for target in targets:
        assert (REPO / target.replace(".", "/") / "__main__.py").is_file(), target


def test_the_rule_catches_what_it_forbids(tmp_path: Path) -> None:
    """The checker itself: a copy of the house with forbidden imports added is refused."""
    for package in ROOTS:
        for path in (REPO / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(REPO)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    wrong = {
        "launcher/spec/rules.py": "from launcher.plan import Plan",  # spec -> plan
        "launcher/data/read.py": "from launcher.model.load import load_model",  # data -> model, a module
        "launcher/backends/local.py": "from launcher.backends.deepspeed import BACKEND",  # sibling
        "launcher/backends/slurm/script.py": "from launcher.sweep import run_sweep",  # backends -> sweep
        "launcher/sweep/run.py": "from launcher.backends.ray.tune import tune_trials",  # not the face
        "launcher/cli.py": "from federated.ops.cli import add_commands",  # upward arrow
        "federated/client_app.py": "from federated.ops import deploy",  # app -> ops
        "launcher/plan/plan.py": "from launcher.plan.jobs import load_job",  # a cycle with jobs
    }
    for file, line in wrong.items():
        path = tmp_path / file
        path.write_text(f"{line}\n{path.read_text(encoding='utf-8')}", encoding="utf-8")
    modules = read_modules(tmp_path)
    imports = read_imports(modules)
    refused = {problem.split(":")[0] for problem in violations(imports)}
    assert refused >= {
        "launcher.spec.rules",
        "launcher.data.read",
        "launcher.backends.local",
        "launcher.backends.slurm.script",
        "launcher.sweep.run",
        "launcher.cli",
        "federated.client_app",
    }
    assert any({"launcher.plan.jobs", "launcher.plan.plan"} <= set(c) for c in cycles(modules, imports))
